#!/bin/sh
# Wait for the database, migrate, then start the API (`serve`) or the worker (`worker`).
set -eu
python - <<'PY'
import sys, time
from sqlalchemy import create_engine, text
from app.settings import get_settings

url = get_settings().db_url
deadline = time.monotonic() + 120
while True:
    try:
        with create_engine(url).connect() as connection:
            connection.execute(text("SELECT 1"))
        break
    except Exception as err:  # any driver error: not up yet
        if time.monotonic() > deadline:
            sys.exit(f"database not reachable after 120 s: {err}")
        print(f"waiting for the database: {type(err).__name__}", flush=True)
        time.sleep(2)
PY
python -m app migrate
case "${1:-serve}" in
    serve) shift || true; exec python -m app serve --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@" ;;
    worker) exec python -m app worker ;;
    *) exec "$@" ;;
esac
