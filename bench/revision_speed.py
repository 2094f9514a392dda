"""The editor of this checkout against the editor of an earlier git revision, single edits timed
edit by edit in one run, each revision with its own defaults: what a user's edit costs now
against what it cost then, on the same machine under the same load.

    .venv/bin/python bench/revision_speed.py --revision 63b7880 --threads 1 --out bench/results/revision_speed.json

Each revision runs in a child process of its own, importing `baft_core` from its own tree (the
earlier one from a temporary `git worktree`), and loads the bundled model in the dtype its own
`auto` picks. The parent hands both children the same edit in turn (which one goes first
alternates) and only one computes at a time. Each edit is on a fresh adapter; the unrelated
pool is the bench's `--unrelated heldout`. Ratios come with 95% intervals from a paired
bootstrap over the edits (paired_speed.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WARM = 2  # the first edits warm up the kernels


def child(root: str, data: list[str], data_format: str, edits: int, threads: int) -> None:
    """Serve edits of one revision: read a record index a line, answer its edit's seconds and
    steps as JSON."""
    protocol = os.fdopen(os.dup(1), "w")  # the parent reads only this; whatever else prints goes to stderr
    os.dup2(2, 1)
    sys.path.insert(0, root)
    import torch

    from baft_core import EditConfig, Editor, load_model
    from baft_core.bench import unrelated_pool
    from baft_core.data import load_edits

    torch.set_num_threads(threads)
    records = [r for path in data for r in load_edits(path, data_format, skip_invalid=True)]
    edited, rest = records[: edits + WARM], records[edits + WARM :]
    loaded = load_model(dtype="auto", cache_dir=Path(root) / "var" / "models")
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig(), unrelated_pool("heldout", 200, 0, edited, rest))
    editor.prepare()  # what the first edit would compute once, outside the timings
    print(json.dumps({"dtype": loaded.precision}), file=protocol, flush=True)
    for line in sys.stdin:
        result = editor.edit(edited[int(line)])
        editor.reset()
        print(json.dumps({"seconds": result.seconds, "steps": result.steps}), file=protocol, flush=True)


class Revision:
    """A child process editing with one revision's code."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root = root
        command = [
            sys.executable, __file__, "--child", str(root), "--format", args.format,
            "--edits", str(args.edits), "--threads", str(args.threads), "--data", *args.data,
        ]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.dtype = self.read()["dtype"]

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the child editing with {self.root} stopped")
        return json.loads(line)

    def edit(self, index: int) -> dict:
        self.process.stdin.write(f"{index}\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--revision", help="the earlier git revision (a commit or tag)")
    parser.add_argument(
        "--data",
        nargs="+",
        default=["../shared/data/zsre/zsre_eval_portability_dev.json", "../shared/data/zsre/zsre_train_1k.json"],
    )
    parser.add_argument("--format", default="zsre")
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the tree a child process edits with
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.format, args.edits, args.threads)
        return
    if not args.revision or not args.out:
        parser.error("--revision and --out are required")
    sys.path.insert(0, str(HERE))
    from paired_speed import bootstrap_ratio

    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.revision], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    head = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / commit
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True, capture_output=True)
        try:
            revisions = {"today": Revision(ROOT, args), commit: Revision(tree, args)}
            timings: dict[str, list[dict]] = {name: [] for name in revisions}
            for index in range(args.edits + WARM):
                order = list(revisions) if index % 2 == 0 else list(revisions)[::-1]
                for name in order:
                    started = time.perf_counter()
                    timed = revisions[name].edit(index)
                    timed["wall"] = time.perf_counter() - started
                    if index >= WARM:
                        timings[name].append(timed)
            for revision in revisions.values():
                revision.close()
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    seconds = {name: [t["seconds"] for t in timings[name]] for name in timings}
    summary = {
        name: {
            "dtype": revisions[name].dtype,
            "edit_median_s": round(statistics.median(seconds[name]), 3),
            "edit_mean_s": round(statistics.mean(seconds[name]), 3),
            "steps_mean": round(statistics.mean(t["steps"] for t in timings[name]), 2),
        }
        for name in timings
    }
    import torch

    result = {
        "command": "python " + " ".join(sys.argv),
        "today_commit": head,
        "revision": commit,
        "format": args.format,
        "edits": args.edits,
        "threads": args.threads,
        "cpu": torch.cpu.get_capabilities().get("cpu_name"),
        **summary,
        "today_over_revision_edit_median": round(summary["today"]["edit_median_s"] / summary[commit]["edit_median_s"], 2),
        "today_over_revision_edit_median_95": bootstrap_ratio(seconds["today"], seconds[commit], statistics.median),
        "today_over_revision_edit_mean": round(summary["today"]["edit_mean_s"] / summary[commit]["edit_mean_s"], 2),
        "today_over_revision_edit_mean_95": bootstrap_ratio(seconds["today"], seconds[commit], statistics.mean),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    with open(Path(args.out).with_suffix(".edits.jsonl"), "w") as out:
        for pair in zip(*(timings[name] for name in timings)):
            out.write(json.dumps({f"{name}_{key}": round(value, 4) for name, t in zip(timings, pair) for key, value in t.items()}) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
