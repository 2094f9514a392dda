"""Bytes under DATA_DIR per applied edit, through the API on the embedded default (bundled model,
SQLite, in-process worker), continual edits, one version each.

    .venv/bin/python bench/service_storage.py [--edits 40] [--checkout DIR] [--name NAME]

Starts `python -m app` from `--checkout` (default: this one; another checkout measures its code
with this script) on a free 127.0.0.1 port with its own DATA_DIR, sends CounterFact edits (subject,
relation template, new object, its rephrase and locality prompt) one by one and measures the files
under DATA_DIR after each 10 (sealed segments, version checkpoints, the database) and once more
after the server stopped; per-edit figures compare that last one with the base version's. Writes
bench/results/service/storage-NAME.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from app.client import Client  # noqa: E402

DATA = Path(os.environ.get("BAFT_DATA", "/work/shared/data")) / "counterfact" / "counterfact_train.json"
OUT = REPO / "bench" / "results" / "service"


def usage(data_dir: Path) -> dict[str, dict[str, int]]:
    """{part: {"bytes": file sizes, "disk": allocated blocks, "files": count}} under DATA_DIR."""
    parts: dict[str, dict[str, int]] = {}
    for path in data_dir.rglob("*"):
        if not path.is_file():
            continue
        relative = path.relative_to(data_dir).parts
        if relative[0] == "checkpoints":
            part = "segments" if relative[1] == "segments" else "versions"
        else:
            part = "database" if relative[0].startswith("baft.db") else "other"
        stat = path.stat()
        entry = parts.setdefault(part, {"bytes": 0, "disk": 0, "files": 0})
        entry["bytes"] += stat.st_size
        entry["disk"] += stat.st_blocks * 512
        entry["files"] += 1
    return parts


def measure(data_dir: Path) -> dict[str, dict[str, int]]:
    parts = usage(data_dir)
    parts["database"]["pages"] = database_pages(data_dir)
    return parts


def database_pages(data_dir: Path) -> int:
    """The database's own size, write-ahead log folded in: its pages times the page size."""
    connection = sqlite3.connect(f"file:{data_dir / 'baft.db'}?mode=ro", uri=True)
    try:
        return connection.execute("PRAGMA page_count").fetchone()[0] * connection.execute("PRAGMA page_size").fetchone()[0]
    finally:
        connection.close()


def total(parts: dict[str, dict[str, int]], key: str) -> int:
    return sum(entry[key] for entry in parts.values())


def edits(count: int) -> list[dict]:
    records = json.loads(DATA.read_text())[:count]
    return [
        {
            "subject": r["subject"],
            "relation": r["prompt"].replace(r["subject"], "{subject}", 1),
            "object": r["target_new"],
            "rephrases": [r["rephrase_prompt"]],
            "locality": [{"prompt": r["locality_prompt"], "answer": r["locality_ground_truth"]}],
        }
        for r in records
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=40)
    parser.add_argument("--checkout", type=Path, default=REPO)
    parser.add_argument("--name", default="storage")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    data = Path(tempfile.mkdtemp(prefix="service-storage-"))
    log_path = Path(tempfile.mkdtemp(prefix="service-storage-log-")) / "server.log"
    port = args.port or 18500 + os.getpid() % 1000
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "API_KEYS")},
        "PYTHONPATH": str(checkout),
        "DATA_DIR": str(data),
        "MODELS_DIR": os.environ.get("MODELS_DIR", str(REPO / "var" / "models")),
        "DEVICE": "cpu",
        # Storage does not depend on how long an edit trains: few steps keep the run short (the
        # relation check's probes stay: their states are part of each sealed segment). Without
        # measuring on apply the database holds no metrics, so the ratio below is if anything
        # higher than with them.
        "EDIT_CONFIG": json.dumps({"max_steps": 5}),
        "EVALUATE_ON_APPLY": "false",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port), "--log-level", "warning"],
        cwd=checkout, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
    )
    points = []
    try:
        client = Client(f"http://127.0.0.1:{port}", timeout=300)
        client.wait_ready(600)
        points.append({"edits": 0, "parts": measure(data)})
        for i, body in enumerate(edits(args.edits), 1):
            subject, relation, obj = body.pop("subject"), body.pop("relation"), body.pop("object")
            applied = client.wait(client.edit(subject, relation, obj, **body)["id"], timeout=1800)
            assert applied["status"] == "applied", applied
            if i % 10 == 0 or i == args.edits:
                points.append({"edits": i, "version": applied["version"], "parts": measure(data)})
                print(i, total(points[-1]["parts"], "bytes"), flush=True)
    finally:
        server.terminate()
        server.wait(120)
    # A running SQLite keeps a write-ahead log of up to about 4 MB beside the database file, which
    # the last connection to close folds in: the database counts as its pages.
    base, last = ({**p["parts"], "database": {"bytes": p["parts"]["database"]["pages"]}} for p in (points[0], points[-1]))
    grown = {part: last.get(part, {}).get("bytes", 0) - base.get(part, {}).get("bytes", 0) for part in last}
    added = total(last, "bytes") - total(base, "bytes")
    report = {
        "command": f"python bench/service_storage.py {' '.join(sys.argv[1:])}",
        "checkout": f"{checkout} ({subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=checkout, capture_output=True, text=True).stdout.strip()})",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "settings": {"model": "smollm2 (bundled, CPU)", "edit_config": env["EDIT_CONFIG"], "mode": "continual",
                     "evaluate_on_apply": False, "edits": args.edits, "data": "counterfact_train.json, first records"},
        "bytes_per_edit": round(added / args.edits),
        "bytes_per_edit_beside_segments": round((added - grown.get("segments", 0)) / args.edits),
        "grown_bytes_by_part": grown,
        # The bound: everything added over what must be kept, the sealed segments and the
        # edit log (the database: edit rows, versions, checkpoint rows).
        "ratio_to_segments_and_database": round(added / (grown.get("segments", 0) + grown.get("database", 0)), 3),
        "points": points,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "points"}, indent=2))


if __name__ == "__main__":
    main()
