"""Alembic migrations up and down on SQLite and PostgreSQL, and the schema matches the models."""
from __future__ import annotations

import multiprocessing
from collections.abc import Iterator

import pytest
from service_support import postgres_schema
from sqlalchemy import create_engine, inspect

from app.db import downgrade, migrate
from app.models import Base

TABLES = {"checkpoints", "versions", "edits", "restores", "chain", "blobs"}


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _columns(url: str) -> dict[str, set[str]]:
    engine = create_engine(url)
    try:
        found = inspect(engine)
        return {table: {c["name"] for c in found.get_columns(table)} for table in TABLES}
    finally:
        engine.dispose()


def _up_down_up(url: str) -> None:
    migrate(url)
    assert _tables(url) == TABLES
    expected = {t.name: {c.name for c in t.columns} for t in Base.metadata.sorted_tables}
    assert _columns(url) == expected
    downgrade(url)
    assert _tables(url) == set()
    migrate(url)
    migrate(url)  # idempotent: already at head
    assert _tables(url) == TABLES


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path) -> Iterator[str]:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db.sqlite'}"
        return
    with postgres_schema(request.getfixturevalue("postgres_url")) as url:
        yield url


def test_migrations_up_down_up(database):
    _up_down_up(database)


def _migrate_on_signal(start, url: str) -> None:
    start.wait()
    migrate(url)


def _migrate_together(url: str, processes: int = 4) -> None:
    """The API and a stand-alone worker start together on an empty database: each migrates, one
    does the work and the others find the schema at head; none fails."""
    context = multiprocessing.get_context("spawn")  # separate processes, as in a deployment
    start = context.Barrier(processes)
    workers = [context.Process(target=_migrate_on_signal, args=(start, url)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0] * processes
    assert _tables(url) == TABLES


def test_concurrent_migrations(database):
    _migrate_together(database)
