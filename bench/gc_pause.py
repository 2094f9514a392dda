"""What one full garbage collection costs a service process, with the objects it made at start-up
in the collector's reach and frozen out of it (`app.runtime.freeze_heap`).

    .venv/bin/python bench/gc_pause.py [--repeats 5]

Loads the embedded default as `python -m app` does (bundled model on the CPU, SQLite in a
temporary DATA_DIR, the trainer prepared as the in-process worker prepares it), then times
`gc.collect()` with every object back in the collector's reach (`gc.unfreeze`), and again after
`freeze_heap`. A full collection holds the GIL throughout: while it runs, no request, decoding
step or training step of the process moves. Writes bench/results/service/gc_pause.json."""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from app.runtime import Runtime, freeze_heap  # noqa: E402
from app.settings import Settings  # noqa: E402

OUT = REPO / "bench" / "results" / "service" / "gc_pause.json"


def full_collections(repeats: int) -> dict:
    """The median time of `repeats` full collections, and the objects each walks."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - start)
    return {"walked_objects": len(gc.get_objects()), "median_ms": round(statistics.median(times) * 1000, 1),
            "max_ms": round(max(times) * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="gc-pause-")), models_dir=REPO / "var" / "models", device="cpu")
    runtime = Runtime(settings, train=True)
    runtime.migrate()
    runtime.load()
    runtime.loaded_trainer.prepare()
    runtime.close()
    gc.unfreeze()
    reachable = full_collections(args.repeats)
    freeze_heap()
    frozen = full_collections(args.repeats)
    result = {
        "command": " ".join(["python bench/gc_pause.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "frozen_objects": gc.get_freeze_count(),
        "start_up_objects_reachable": reachable,
        "start_up_objects_frozen": frozen,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
