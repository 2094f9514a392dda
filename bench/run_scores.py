"""A continual bench run's records and one of its per-edit scores, for the scripts that split a
run's locality by what its prompts are (locality_by_subject.py, locality_by_wording.py)."""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_run(description: str) -> Path:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("run", type=Path, help="a bench output folder (summary.json, edits.jsonl.gz)")
    return parser.parse_args().run


def run_scores(run: Path, metric: str, data_kind: str) -> tuple[list[dict], dict[int, float]]:
    """The run's edits as records of its data file, in order, and `metric` of each edit that has
    it, by index. `data_kind` names the data in the error for a run that is not continual over one
    file."""
    summary = json.loads((run / "summary.json").read_text())
    if summary["mode"] != "continual" or len(summary["data"]) != 1:
        raise SystemExit(f"a continual run over one {data_kind} file")
    data = Path(summary["data"][0])
    records = json.loads((data if data.is_absolute() else REPO / data).read_text())[: summary["edits"]]
    scores = {}
    with gzip.open(run / "edits.jsonl.gz", "rt") as handle:
        for line in handle:
            row = json.loads(line)
            if row.get(metric) is not None:
                scores[row["index"]] = row[metric]
    return records, scores


def group_means(groups: dict[str, list[float]], count_key: str, mean_key: str) -> dict:
    """Each group's size (`count_key`) and mean score (`mean_key`, None for an empty group)."""
    return {
        name: {count_key: len(values), mean_key: sum(values) / len(values) if values else None}
        for name, values in groups.items()
    }


def replace_entry(out: Path, entry: dict) -> None:
    """Writes `entry` into the list of sets in `out`, in place of the entry of the same data and
    edits, and prints it."""
    entries = json.loads(out.read_text()) if out.exists() else []
    entries = [e for e in entries if (e["data"], e["edits"]) != (entry["data"], entry["edits"])] + [entry]
    out.write_text(json.dumps(entries, indent=2) + "\n")
    print(json.dumps(entry, indent=2))


def write_result(run: Path, name: str, result: dict) -> None:
    """Writes a split of the run into its folder as `name` and prints it."""
    (run / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def set_parser(description: str, out_name: str) -> argparse.ArgumentParser:
    """The arguments of a script that measures the first `--edits` records of one set and writes
    its entry in bench/results/`out_name` (`replace_entry`)."""
    from baft_core.data import FORMATS

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, nargs="+")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--edits", type=int, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / out_name)
    return parser


def set_records(args: argparse.Namespace) -> list:
    """The first `--edits` valid records of `--data` (`set_parser`)."""
    from baft_core.data import load_edits

    return [e for path in args.data for e in load_edits(path, args.format, skip_invalid=True)][: args.edits]
