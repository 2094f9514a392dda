"""Collects every bench/results/*/summary.json into bench/results/README.md.

    .venv/bin/python bench/summarize.py
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COLUMNS = ("rel", "gen", "loc", "por", "rel_em", "gen_em")


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    rows = []
    for path in sorted(RESULTS.glob("*/summary.json")):
        s = json.loads(path.read_text())
        data = Path(s["data"][0]).stem
        rows.append(
            f"| [{path.parent.name}]({path.parent.name}/report.md) | {data} | {s['method']} | {s['mode']} "
            f"| {s['edits']} | " + " | ".join(fmt(s[c]) for c in COLUMNS)
            + f" | {s['sec_per_edit_median']:.3f} | {s['steps_mean']:.1f} | {s['config']['replay_size']} |"
        )
    lines = [
        "# Benchmark results",
        "",
        "Bundled SmolLM2-135M-Instruct (bf16 on this CPU, interventions fp32), two CPU cores unless a",
        "summary says `threads: 1` (runs made side by side). Every run's exact command is in its",
        "`summary.json` and `report.md`; `bench/run.sh` re-runs them all. Regenerate this table with",
        "`.venv/bin/python bench/summarize.py`.",
        "",
        "| run | data | method | mode | edits | " + " | ".join(COLUMNS) + " | s/edit | steps | replay |",
        "|" + "---|" * (len(COLUMNS) + 8),
        *rows,
    ]
    speed = RESULTS / "prefix_cache_speedup.json"
    if speed.is_file():
        s = json.loads(speed.read_text())
        lines += [
            "",
            f"Cached-prefix training step vs a plain full forward + backward, interleaved in one run "
            f"(`{s['command']}`): {s['full_step_median_s'] * 1000:.1f} ms vs "
            f"{s['cached_step_median_s'] * 1000:.1f} ms per step, **{s['speedup']:.2f}x** "
            f"(layers {s['layers']}, {s['dtype']}).",
        ]
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
