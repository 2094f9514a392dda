"""Helpers for the service tests: settings on the tiny model, an isolated PostgreSQL schema,
server and worker subprocesses, a throwaway Redis."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from app.client import Client
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
TINY_EDIT_CONFIG = {"max_steps": 8, "max_steps_batched": 8, "layers": [1, 2], "rank": 4}


def tiny_settings(tiny_dir: Path, data_dir: Path, **overrides) -> Settings:
    values = dict(
        model=str(tiny_dir),
        data_dir=data_dir,
        # beside the tiny model, not the checkout's var/models: `auto` keeps its measurement there
        models_dir=Path(tiny_dir).parent / "models",
        device="cpu",
        edit_config=TINY_EDIT_CONFIG,
        batch_wait_ms=300,
        restore_wait_s=30,
        poll_interval_s=0.2,
    )
    values.update(overrides)
    return Settings(**values)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_ready(client, timeout: float = 120.0) -> None:
    wait_until(lambda: client.get("/ready").status_code == 200, timeout, what="/ready")


@contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A fresh schema for one test; the URL sets it as the search path."""
    schema = f"svc_{uuid.uuid4().hex[:12]}"
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{url}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(plain, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "API_KEYS", "READ_API_KEYS")}
    env.update(settings)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "app", *args], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT
    )


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def server(env: dict[str, str], log: Path, port: int | None = None) -> Iterator[Client]:
    """`python -m app` on a free loopback port; yields a ready client."""
    port = port or free_port()
    process = start(["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], env, log)
    client = Client(f"http://127.0.0.1:{port}", timeout=120)
    try:
        wait_until(lambda: client.ready() or process.poll() is not None, 240, 0.2, "the server")
        assert process.poll() is None, f"server exited: {log.read_text()[-3000:]}"
        yield client
    finally:
        client.close()
        stop(process)


@contextmanager
def throwaway_redis(port: int) -> Iterator[subprocess.Popen]:
    """Our own redis-server (no persistence), so a test may kill it without touching the shared one."""
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(up, 10, what=f"redis-server on {port}")
    try:
        yield process
    finally:
        stop(process, signal.SIGKILL)


def free_port_in(low: int = 8200, high: int = 8300) -> int:
    """A free loopback port in [low, high): the range this project's test servers keep to."""
    for port in range(low, high):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high - 1}")


def tiny_server_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of `python -m app` for tiny-model settings (embedded mode)."""
    import json

    return service_env({
        "MODEL": settings.model,
        "MODELS_DIR": str(settings.models_dir),
        "DATA_DIR": str(settings.data_dir),
        "DEVICE": "cpu",
        "EDIT_CONFIG": json.dumps(settings.edit_config),
        "EVALUATE_ON_APPLY": "false",
        **extra,
    })
