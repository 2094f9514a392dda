"""The bundled model in bf16 against fp32 on this CPU, in one run: whole single edits (ZsRE, the
defaults) alternating between the two models edit by edit, and one training step (forward and
backward) on the same batch. Records the CPU's bf16 features, which `resolve_dtype` reads.

    .venv/bin/python bench/dtype_speed.py --out bench/results/dtype_speed.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from baft_core import EditConfig, Editor, load_model
from baft_core.data import load_edits
from baft_core.models import NATIVE_BF16, resolve_dtype
from baft_core.objective import target_cross_entropy
from baft_core.prefix_cache import CachedBatch

DTYPES = ("bfloat16", "float32")


def training_step_seconds(editor: Editor, example) -> float:
    with torch.no_grad():
        batch = CachedBatch(
            editor.model, editor.attachment, editor.interventions, [example], editor.config.prompt_positions, editor.pad_id
        )
    start = time.perf_counter()
    step = batch.forward()
    target_cross_entropy(step.logits, batch.targets).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/zsre/zsre_eval_portability_dev.json")
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    editors = {}
    for dtype in DTYPES:
        loaded = load_model(dtype=dtype)
        editors[dtype] = Editor(loaded.model, loaded.tokenizer, EditConfig())
        editors[dtype].unrelated_features()  # built once, outside the timings
    edits = {dtype: [] for dtype in DTYPES}
    steps = {dtype: [] for dtype in DTYPES}
    warm = 2  # the first edits warm up the kernels
    for index, request in enumerate(load_edits(args.data, "zsre", limit=args.edits + warm)):
        order = DTYPES if index % 2 == 0 else DTYPES[::-1]  # neither dtype always runs first
        for dtype in order:
            editor = editors[dtype]
            result = editor.edit(request)
            editor.reset()
            step = training_step_seconds(editor, editor.encode(request.prompt, request.target))
            if index >= warm:
                edits[dtype].append((result.seconds, result.steps))
                steps[dtype].append(step)
    capabilities = torch.cpu.get_capabilities()
    summary = {
        dtype: {
            "edit_median_s": round(statistics.median(s for s, _ in edits[dtype]), 3),
            "steps_mean": round(statistics.mean(n for _, n in edits[dtype]), 2),
            "seconds_per_step": round(sum(s for s, _ in edits[dtype]) / sum(n for _, n in edits[dtype]), 4),
            "training_step_median_ms": round(statistics.median(steps[dtype]) * 1000, 1),
        }
        for dtype in DTYPES
    }
    result = {
        "command": "python " + " ".join(sys.argv),
        "edits": args.edits,
        "threads": args.threads,
        "cpu": capabilities.get("cpu_name"),
        "cpu_bf16_features": {name: bool(capabilities.get(name)) for name in NATIVE_BF16},
        "auto_dtype": str(resolve_dtype(None, torch.device("cpu"))),
        **summary,
        "bf16_over_fp32_training_step": round(
            summary["bfloat16"]["training_step_median_ms"] / summary["float32"]["training_step_median_ms"], 2
        ),
        "bf16_over_fp32_edit_median": round(
            summary["bfloat16"]["edit_median_s"] / summary["float32"]["edit_median_s"], 2
        ),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
