"""Service settings, read from the environment (and a .env file if present)."""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", protected_namespaces=())

    data_dir: Path = Path("var")
    database_url: str | None = None  # None: SQLite at DATA_DIR/baft.db
    redis_url: str | None = None  # None: API and worker in one process, the SQL rows are the queue
    redis_stream: str = "baft:edits"  # wakes the worker at once; the SQL rows are the queue
    redis_stream_maxlen: int = Field(default=10_000, ge=100)  # the stream is trimmed to about this
    # Unique per process by default (a container's hostname differs under --scale): the name the
    # trainer lease and the logs show.
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    lease_ttl_s: float = Field(default=15.0, gt=0)  # a trainer silent this long is replaced by a standby
    poll_interval_s: float = Field(default=1.0, gt=0)  # how often a worker looks for work without a wake-up
    checkpoint_storage: Literal["local", "database"] = "local"  # database: every replica reaches it

    model: str = "smollm2"  # the bundled model, or a local Hugging Face model directory
    models_dir: Path = Path("var/models")
    device: str = "auto"
    dtype: str | None = None
    edit_config: dict[str, Any] = Field(default_factory=dict)  # JSON: overrides of EditConfig

    api_keys: str = ""  # comma-separated keys that may do everything
    read_api_keys: str = ""  # comma-separated keys that may only read and generate
    allow_unauthenticated: bool = False  # serve without keys on a non-loopback address anyway

    batch_size: int = Field(default=8, ge=1, le=256)
    batch_wait_ms: int = Field(default=500, ge=0)
    evaluate_on_apply: bool = True  # measure each edit's metrics right after it is applied

    host: str = "127.0.0.1"
    port: int = 8000
    max_new_tokens: int = 256
    decode_batch_size: int = Field(default=32, ge=1, le=1024)  # generations decoded together (scheduler.py)
    restore_wait_s: float = 60.0  # POST /versions/{v}/restore waits this long for the worker
    max_body_bytes: int = Field(default=1_048_576, ge=1024)  # larger request bodies get 413
    max_queue: int = Field(default=10_000, ge=1)  # edits waiting (queued or applying) before POST /edits gets 429
    shutdown_grace_s: float = Field(default=60.0, ge=0)  # SIGTERM: finish the edit or request in hand this long
    metrics_port: int = Field(default=0, ge=0, le=65535)  # the stand-alone worker's /metrics (0: none)

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
