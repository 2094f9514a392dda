"""`python -m app [--host H] [--port P]` serves the API (with the worker inside when REDIS_URL is
unset); `python -m app worker` runs the stand-alone worker; `python -m app migrate` migrates."""
from __future__ import annotations

import argparse
import logging

from .settings import get_settings


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "worker", "migrate"])
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # per-plugin set-up lines on every start

    if args.command == "worker":
        from .runtime import Runtime
        from .worker import run_worker

        run_worker(Runtime(settings, train=True))
    elif args.command == "migrate":
        from .db import migrate

        migrate(settings.db_url)
    else:
        import uvicorn

        from .main import create_app

        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
