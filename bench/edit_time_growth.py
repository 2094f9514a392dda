"""Whether the time an edit takes grows with the edits before it: continual CounterFact edits on
an adapter that already holds `--small` sealed edits and on one that holds `--large` (CounterFact
val records on both), alternated
edit by edit in one run (so that both see the same machine load), one thread.

    .venv/bin/python bench/edit_time_growth.py [--small 10] [--large 10000] [--edits 40]

The earlier edits are synthetic (`routing_cost.synthetic`: random sealed blocks of the defaults'
sizes and six random route keys each, with CounterFact records as their history): training
10,000 real edits takes hours, and what their number costs each new edit is the work that grows
with the blocks and keys (routing, sealing, the sealed forward), not their values. Random keys
open no block and make no neighbour, so the replay of the sealed edits that share a new edit's
route, which real data adds, is not in this figure (the 10,000-edit benchmark run has it). Each
variant's first edit is not timed: it copies the synthetic rows into room to grow, once. Writes
bench/results/edit_time_growth.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from paired_speed import bootstrap_ratio  # noqa: E402
from routing_cost import synthetic  # noqa: E402

from baft_core import EditConfig, Editor, EditRequest, load_model  # noqa: E402
from baft_core.data import load_edits  # noqa: E402

DATA = Path(os.environ.get("BAFT_DATA", REPO.parent / "shared" / "data")) / "counterfact"
OUT = REPO / "bench" / "results" / "edit_time_growth.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--edits", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    def requests(name: str) -> list[EditRequest]:
        return [EditRequest(r.prompt, r.target, r.subject) for r in load_edits(DATA / name, "counterfact", skip_invalid=True)]

    history, new = requests("counterfact_train.json"), requests("counterfact_val.json")[: args.edits + 1]
    loaded = load_model("smollm2", device="cpu")
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig())
    editor.prepare()
    template = editor.new_interventions()
    variants = {
        name: [synthetic(template, count), (history * (count // len(history) + 1))[:count]]
        for name, count in (("small", args.small), ("large", args.large))
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for i, request in enumerate(new):
        for name, state in variants.items():
            editor.load_state(*state)
            start = time.perf_counter()
            editor.edit(request)
            if i:  # the first edit copies the synthetic rows into room to grow
                seconds[name].append(time.perf_counter() - start)
            state[:] = [editor.interventions, editor.history]
    large, small = seconds["large"], seconds["small"]
    report = {
        "command": "python bench/edit_time_growth.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "dtype": str(loaded.precision),
        "settings": {"small": args.small, "large": args.large, "timed_edits": len(large), "threads": 1},
        "sealed_blocks_after": {name: state[0].sealed_blocks for name, state in variants.items()},
        "seconds_median": {"small": round(statistics.median(small), 4), "large": round(statistics.median(large), 4)},
        "large_over_small_median": round(statistics.median(large) / statistics.median(small), 3),
        "large_over_small_median_95": bootstrap_ratio(large, small, statistics.median),
        "large_over_small_mean": round(statistics.mean(large) / statistics.mean(small), 3),
        "seconds": {name: [round(s, 4) for s in values] for name, values in seconds.items()},
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "seconds"}, indent=2))


if __name__ == "__main__":
    main()
