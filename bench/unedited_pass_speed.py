"""The fixed part of an edit's training batch (`CachedBatch`: one unedited pass over prompt +
answer, then one single-token decoding step per token kept after the answer) against the number
of tokens kept (`continuation_tokens`), interleaved edit by edit in one run, and, for scale, one
training step (forward + backward) on the batch with the most tokens kept.

    .venv/bin/python bench/unedited_pass_speed.py --out bench/results/unedited_pass_speed.json
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
from baft_core.objective import target_cross_entropy
from baft_core.prefix_cache import CachedBatch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/zsre/zsre_eval_portability_dev.json")
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--tokens", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model()
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig(), unrelated_prompts=[])
    eos = loaded.tokenizer.eos_token_id
    seconds: dict[int, list[float]] = {count: [] for count in args.tokens}
    steps: list[float] = []
    for request in load_edits(args.data, "zsre", limit=args.edits + 2):
        example = [editor.encode(request.prompt, request.target)]
        for count in args.tokens:
            start = time.perf_counter()
            with torch.no_grad():
                batch = CachedBatch(
                    editor.model, editor.attachment, editor.interventions, example, 3, editor.pad_id, count, eos
                )
            seconds[count].append(time.perf_counter() - start)
        start = time.perf_counter()
        logits, _, _ = batch.forward()
        target_cross_entropy(logits, batch.targets).backward()
        steps.append(time.perf_counter() - start)
    warm = slice(2, None)  # the first two edits warm up the kernels
    result = {
        "command": "python " + " ".join(sys.argv),
        "edits": args.edits,
        "threads": args.threads,
        "dtype": loaded.precision,
        "unedited_pass_median_ms": {
            str(count): round(statistics.median(values[warm]) * 1000, 1) for count, values in seconds.items()
        },
        "training_step_median_ms": round(statistics.median(steps[warm]) * 1000, 1),
        "training_step_tokens_after_answer": args.tokens[-1],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
