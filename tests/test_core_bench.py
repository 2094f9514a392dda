"""The benchmark CLI end to end on the tiny model: every output it promises is written."""
from __future__ import annotations

import json

from baft_core import bench

from conftest import DATA


def test_continual_bench_writes_its_outputs(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = bench.parse_args(
        [
            "--data", str(DATA / "zsre" / "zsre_eval_portability_dev.json"),
            "--format", "zsre", "--mode", "continual", "--edits", "3", "--model", str(tiny_dir),
            "--unrelated", "builtin", "--dtype", "float32", "--set", "max_steps=3", "gate_polish_steps=5", "--out", str(out),
        ]
    )
    summary = bench.run(args)
    assert {p.name for p in out.iterdir()} >= {"summary.json", "edits.jsonl", "report.md", "curve.png", "basis_weights.png"}
    written = json.loads((out / "summary.json").read_text())
    assert written["edits"] == 3 and written["dtype"] == "float32" and "cpu" in written
    assert [point["edits"] for point in summary["curve"]] == [1, 3]
    assert summary["sealed_blocks"] == 3 and summary["config"]["block_edits"] == 1
    assert summary["generation_speed_ratio"] > 0
    shares = summary["gates_open"]
    assert shares and all(0 <= v <= 1 for per_layer in shares.values() for v in per_layer.values())
    assert len((out / "edits.jsonl").read_text().splitlines()) == 3
