"""Time per edit along a continual run: the median seconds of each window of edits, in order, and
the last window's median against the first's.

Whether an edit costs more once thousands are stored is a question of one run: two runs on a
shared machine differ by more than the growth. The edits of one run saw the same load only roughly
(another job may start or stop during it), so the ratio is an indication; `bench/edit_time_growth.py`
is the paired measurement on synthetic adapters.

python bench/edit_time_by_position.py bench/results/counterfact-continual-10000-baft --window 1000
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_scores import write_result  # noqa: E402


def windows(seconds: list[float], size: int) -> list[dict]:
    """The median of each consecutive `size` edits (the last window may be shorter)."""
    return [
        {"edits": f"{start + 1}-{min(start + size, len(seconds))}", "sec_per_edit_median": statistics.median(seconds[start : start + size])}
        for start in range(0, len(seconds), size)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a bench output folder (edits.jsonl.gz)")
    parser.add_argument("--window", type=int, default=1000, help="edits per window")
    args = parser.parse_args()
    if args.window < 1:
        raise SystemExit("--window must be >= 1")
    with gzip.open(args.run / "edits.jsonl.gz", "rt") as handle:
        rows = sorted((json.loads(line) for line in handle), key=lambda row: row["index"])
    seconds = [row["seconds"] for row in rows]
    if len(seconds) < 2 * args.window:
        raise SystemExit(f"{len(seconds)} edits: fewer than two windows of {args.window}")
    first, last = statistics.median(seconds[: args.window]), statistics.median(seconds[-args.window :])
    result = {
        "command": "python bench/edit_time_by_position.py " + " ".join(sys.argv[1:]),
        "edits": len(seconds),
        "window": args.window,
        "first_window_median": first,
        "last_window_median": last,
        "last_over_first": last / first,
        "windows": windows(seconds, args.window),
    }
    write_result(args.run, "edit_time.json", result)


if __name__ == "__main__":
    main()
