"""Service settings, read from the environment (and a .env file if present)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    data_dir: Path = Path("var")
    database_url: str | None = None  # None: SQLite at DATA_DIR/baft.db
    redis_url: str | None = None  # None: API and worker in one process, the SQL rows are the queue
    redis_stream: str = "baft:edits"
    redis_group: str = "baft-workers"
    worker_name: str = "worker-1"  # stable, so that a restarted worker finds its pending entries

    model: str = "smollm2"  # the bundled model, or a local Hugging Face model directory
    models_dir: Path = Path("var/models")
    device: str = "auto"
    dtype: str | None = None
    edit_config: dict[str, Any] = Field(default_factory=dict)  # JSON: overrides of EditConfig

    api_keys: str = ""  # comma-separated keys that may do everything
    read_api_keys: str = ""  # comma-separated keys that may only read and generate

    batch_size: int = Field(8, ge=1, le=256)
    batch_wait_ms: int = Field(500, ge=0)
    evaluate_on_apply: bool = True  # measure each edit's metrics right after it is applied

    host: str = "127.0.0.1"
    port: int = 8000
    max_new_tokens: int = 256
    decode_batch_size: int = Field(32, ge=1, le=1024)  # generations decoded together (scheduler.py)
    sweep_interval_s: float = 2.0  # how often queued rows missing from the stream are re-published
    requeue_after_s: float = 300.0  # a published but still queued row is re-published after this
    restore_wait_s: float = 60.0  # POST /versions/{v}/restore waits this long for the worker

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'baft.db').resolve()}"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def write_keys(self) -> set[str]:
        return {k.strip() for k in self.api_keys.split(",") if k.strip()}

    @property
    def read_keys(self) -> set[str]:
        return {k.strip() for k in self.read_api_keys.split(",") if k.strip()}


@lru_cache
def get_settings() -> Settings:
    return Settings()
