"""Alembic environment: the URL comes from the caller (app.db.migrate) or DATABASE_URL."""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from app.models import Base

config = context.config
url = config.attributes.get("url")
if url is None:
    from app.settings import get_settings

    url = get_settings().db_url

connectable = create_engine(url)
with connectable.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
    )
    with context.begin_transaction():
        context.run_migrations()
connectable.dispose()
