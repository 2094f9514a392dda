"""Alembic migrations up and down on SQLite and PostgreSQL, and the schema matches the models."""
from __future__ import annotations

from sqlalchemy import create_engine, inspect

from app.db import downgrade, migrate
from app.models import Base
from service_support import postgres_schema

TABLES = {"checkpoints", "versions", "edits", "restores"}


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


def test_sqlite_migrations(tmp_path):
    _up_down_up(f"sqlite:///{tmp_path / 'db.sqlite'}")


def test_postgres_migrations(postgres_url):
    with postgres_schema(postgres_url) as url:
        _up_down_up(url)
