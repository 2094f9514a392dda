"""`python -m app [--host H] [--port P]` serves the API (with a worker inside when REDIS_URL is
unset); `python -m app worker` runs a stand-alone worker; `python -m app migrate` migrates;
`python -m app audit` checks the history's invariants (exit status 1 on a problem)."""
from __future__ import annotations

import argparse
import ipaddress
import logging

from .settings import get_settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a hostname: it may resolve anywhere
        return False


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "worker", "migrate", "audit"])
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
    elif args.command == "audit":
        import json
        import sys

        from .audit import audit
        from .db import make_engine, make_sessionmaker

        engine = make_engine(settings.db_url)
        with make_sessionmaker(engine)() as session:
            report = audit(session, settings.checkpoints_dir)
        engine.dispose()
        print(json.dumps(report, indent=2))
        sys.exit(0 if report["ok"] else 1)
    elif args.command == "migrate":
        from .db import migrate

        migrate(settings.db_url)
    else:
        if not is_loopback(args.host) and not (settings.write_keys or settings.read_keys):
            if not settings.allow_unauthenticated:
                parser.exit(
                    2,
                    f"refusing to serve on {args.host} without API keys: anyone who reaches it could edit "
                    "the model. Set API_KEYS (and READ_API_KEYS), bind to 127.0.0.1, or set "
                    "ALLOW_UNAUTHENTICATED=true.\n",
                )
            logging.warning("serving on %s without API keys (ALLOW_UNAUTHENTICATED)", args.host)
        import uvicorn

        from .main import create_app

        uvicorn.run(
            create_app(settings),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            # SIGTERM: in-flight requests finish. uvicorn types it int; it takes seconds as a float
            # (asyncio.timeout)
            timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]
        )


if __name__ == "__main__":
    main()
