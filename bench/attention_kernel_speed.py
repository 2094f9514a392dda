"""Training steps (cached-prefix forward and backward) with torch's flash attention against its
math kernel, interleaved in one run on the same edits, for each precision given: on a CPU the
flash kernel's backward is built for long sequences, and an edit's step attends a few tokens.

    .venv/bin/python bench/attention_kernel_speed.py --out bench/results/attention_kernel_speed.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

from baft_core import EditConfig, Editor, load_edits, load_model
from baft_core.objective import target_cross_entropy
from baft_core.prefix_cache import CachedBatch

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def step_seconds(batch: CachedBatch, kernel: SDPBackend) -> float:
    batch.attention_kernel = kernel
    start = time.perf_counter()
    step = batch.forward()
    target_cross_entropy(step.logits, batch.targets).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/zsre/zsre_eval_portability_dev.json")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "fp16-weights"])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = load_edits(args.data, "zsre", skip_invalid=True)
    edited, unrelated = records[: args.edits], [r.prompt for r in records[args.edits : args.edits + 100]]
    rows = []
    for dtype in args.dtypes:
        loaded = load_model(dtype=dtype)
        editor = Editor(loaded.model, loaded.tokenizer, EditConfig(), unrelated)
        editor.edit(edited[0])  # a trained adapter (gates, a sealed routed block), as edits meet
        with torch.no_grad():
            batches = [
                CachedBatch(editor.model, editor.attachment, editor.interventions, [editor.encode(r.prompt, r.target)],
                            editor.config.prompt_positions, editor.pad_id)
                for r in edited
            ]
        editor.interventions.train()
        times = {name: [] for name in KERNELS}
        for repeat in range(args.repeats + 1):
            order = list(KERNELS) if repeat % 2 == 0 else list(KERNELS)[::-1]
            for batch in batches:
                for name in order:
                    seconds = step_seconds(batch, KERNELS[name])
                    if repeat:  # the first round warms up
                        times[name].append(seconds)
        medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
        rows.append({
            "dtype": loaded.precision,
            "step_median_ms": {name: round(ms, 1) for name, ms in medians.items()},
            "math_over_flash": round(medians["math"] / medians["flash"], 3),
        })
        print(json.dumps(rows[-1]), flush=True)
    capabilities = torch.cpu.get_capabilities()
    result = {
        "command": "python bench/attention_kernel_speed.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "cpu": capabilities.get("cpu_name"),
        "cpu_features": {k: bool(capabilities.get(k)) for k in ("avx2", "avx512_bf16", "amx_bf16")},
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
