"""The benchmark CLI end to end on the tiny model: every output it promises is written."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from conftest import DATA

from baft_core import EditConfig, bench


def test_continual_bench_writes_its_outputs(tiny_dir, tmp_path):
    out = tmp_path / "run"
    args = bench.parse_args(
        [
            "--data", str(DATA / "zsre" / "zsre_eval_portability_dev.json"),
            "--format", "zsre", "--mode", "continual", "--edits", "3", "--model", str(tiny_dir),
            "--unrelated", "builtin", "--dtype", "float32", "--piqa", str(DATA / "locality" / "piqa_valid.jsonl"),
            "--piqa-items", "4", "--set", "max_steps=3", "gate_polish_steps=5", "--out", str(out),
        ]
    )
    summary = bench.run(args)
    assert {p.name for p in out.iterdir()} >= {"summary.json", "edits.jsonl.gz", "report.md", "curve.png", "basis_weights.png"}
    written = json.loads((out / "summary.json").read_text())
    assert written["edits"] == 3 and written["dtype"] == "float32" and "cpu" in written
    assert written["unrelated"] == "builtin" and written["unrelated_count"] > 0
    assert [point["edits"] for point in summary["curve"]] == [1, 3]
    assert summary["sealed_blocks"] == 3 and summary["config"]["block_edits"] == 1
    assert summary["generation_speed_ratio"] > 0
    shares = summary["gates_open"]
    assert shares and all(0 <= v <= 1 for per_layer in shares.values() for v in per_layer.values())
    assert len(read_lines(out)) == 3
    piqa = written["piqa"]
    assert piqa["items"] == 4 and 0 <= piqa["pick_changed"] <= 1 and 0 <= piqa["accuracy_edited"] <= 1
    assert "PIQA" in (out / "report.md").read_text()


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress((out / "edits.jsonl.gz").read_bytes()).decode().splitlines()]


@pytest.mark.parametrize(
    "assignments, message",
    [(["rnk=3"], "no field 'rnk'"), (["rank=3x"], "not JSON"), (["rank=0"], "rank must be"), (["route_contexts=[1]"], "route_contexts"),
     (["max_steps=0"], "max_steps and max_steps_batched must be >= 1"),
     (["route_prefix_needed=0"], "route_prefix_needed must be")],
)
def test_bad_overrides_are_named(assignments, message):
    with pytest.raises(ValueError, match=message):
        bench.apply_overrides(EditConfig(), assignments)


def test_overrides_take_json_values():
    config = bench.apply_overrides(EditConfig(), ["rank=16", 'route_contexts=["Notes:"]', "route_margin=null"])
    assert (config.rank, config.route_contexts, config.route_margin) == (16, ["Notes:"], None)


def test_heldout_negatives_must_exist(tmp_path):
    """`--unrelated heldout` with every record edited has no negatives: an error naming the way
    out, before any model is loaded; otherwise summary.json counts them."""
    records = [
        {"subject": f"S{i}", "src": f"What is S{i}?", "alt": "x", "rephrase": f"S{i} is what?",
         "loc": f"nq question: who wrote book {i}", "loc_ans": "someone"}
        for i in range(3)
    ]
    data = tmp_path / "three.json"
    data.write_text(json.dumps(records))
    base = ["--data", str(data), "--format", "zsre", "--model", "/nonexistent", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match="no negatives left.*--unrelated builtin"):
        bench.run(bench.parse_args([*base, "--edits", "3"]))
    edited, rest = bench.load_edits(str(data), "zsre")[:2], bench.load_edits(str(data), "zsre")[2:]
    assert len(bench.unrelated_pool("heldout", 200, 0, edited, rest)) == 1
    assert bench.unrelated_pool("builtin", 200, 0, edited, rest) is None


def test_a_sample_of_the_edits_is_measured_on_request(tiny_dir, tmp_path):
    """`--evaluate N` measures a seeded sample of N edits on the final model (the curve: every
    edit so far up to N, then the sample's share), and the others' lines carry no metrics."""
    out = tmp_path / "run"
    args = bench.parse_args(
        [
            "--data", str(DATA / "zsre" / "zsre_eval_portability_dev.json"),
            "--format", "zsre", "--mode", "continual", "--edits", "12", "--evaluate", "4", "--model", str(tiny_dir),
            "--unrelated", "builtin", "--dtype", "float32", "--set", "max_steps=2", "--out", str(out),
        ]
    )
    summary = bench.run(args)
    sample = sorted(random.Random(0).sample(range(12), 4))  # the bench's --seed 0
    assert summary["evaluated"] == 4
    assert [(p["edits"], p["evaluated"]) for p in summary["curve"]] == [(1, 1), (10, sum(i < 10 for i in sample)), (12, 4)]
    lines = read_lines(out)
    assert len(lines) == 12 and [line["index"] for line in lines if "rel" in line] == sample
    with pytest.raises(SystemExit, match="--evaluate"):
        bench.run(bench.parse_args([*args_list(tmp_path), "--mode", "single", "--evaluate", "2"]))


def args_list(tmp_path) -> list[str]:
    return ["--data", str(DATA / "zsre" / "zsre_eval_portability_dev.json"), "--format", "zsre",
            "--edits", "3", "--model", "/nonexistent", "--unrelated", "builtin", "--out", str(tmp_path / "single")]


def test_locality_is_split_by_whether_its_prompt_names_an_edited_subject():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "locality_by_subject.py"
    spec = importlib.util.spec_from_file_location("locality_by_subject", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def record(subject, truth, locality_prompt, locality_truth):
        return {
            "subject": subject,
            "ground_truth": truth,
            "locality_prompt": locality_prompt,
            "locality_ground_truth": locality_truth,
        }

    records = [
        record("Jean-Baptiste Say", "French", "The native language of Pierre Curie is", "French"),
        record("Toko Yasuda", "guitar", "The native language of Jean-Baptiste Say is", "French"),
        record("Danielle Darrieux", "French", "Jean-Baptiste Say worked in", "Paris"),
    ]
    groups = module.split(records, {0: 1.0, 1: 0.0, 2: 0.5})
    assert groups["other_subjects"] == {"prompts": 1, "loc": 1.0}
    assert groups["edited_subject"] == {"prompts": 2, "loc": 0.25}
    assert groups["rewritten_fact"] == {"prompts": 1, "loc": 0.0}  # Say's native language, which record 0 edits


def test_relation_specificity_is_split_by_whether_a_subject_ending_recurs():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "locality_by_subject_ending.py"
    spec = importlib.util.spec_from_file_location("locality_by_subject_ending", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def record(subject, prompt, *kept):
        return {"subject": subject, "prompt": prompt, "locality": {"Relation_Specificity": [{"prompt": p} for p in kept]}}

    records = [
        record("A women's doubles", "The country of A women's doubles is", "A women's doubles follows"),
        record("B women's doubles", "The country of B women's doubles is", "B women's doubles follows"),
        record("Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "Danielle Darrieux is a citizen of"),
        record("Danielle Darrieux", "Danielle Darrieux is a citizen of", "The gender of Danielle Darrieux is"),
    ]
    endings = [(7, 8, 9), (7, 8, 9), (4, 5, 6), (4, 5, 6)]
    groups = module.split(records, {0: 0.0, 1: 0.5, 2: 0.0, 3: 1.0}, endings)
    assert groups["rewritten_fact"] == {"edits": 1, "Relation_Specificity": 0.0}  # record 3 edits what 2 keeps
    assert groups["same_subject"] == {"edits": 1, "Relation_Specificity": 1.0}
    assert groups["ending_shared"] == {"edits": 2, "Relation_Specificity": 0.25}
    assert groups["ending_unique"] == {"edits": 0, "Relation_Specificity": None}


def test_spelled_edits_are_those_whose_subject_ends_like_an_earlier_ones(tiny):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "spelled_edits.py"
    spec = importlib.util.spec_from_file_location("spelled_edits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    subjects = ["Danielle Darrieux", "Norway", "Norway", "Marie Darrieux", None, "Danielle Darrieux", "Darrieux"]
    # "Marie Darrieux" ends like the first, and "Danielle Darrieux" again like "Marie Darrieux";
    # the same subject alone and the end of an earlier one have nothing to spell.
    assert module.spelled(subjects, tiny.tokenizer, 3) == [3, 5]
