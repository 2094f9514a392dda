"""Next-token logits the way transformers computes them with `logits_to_keep=1` (the head on a
3-D slice `hidden[:, -1:]`) against `final_logits` on the 2-D rows `hidden[:, -1]`, as
`generation.stream` does, interleaved in one run on the same hidden states, with the model frozen
as the editor freezes it. On a CPU, with a head that does not require grad, torch's matmul copies
the whole (vocab x d) head before multiplying a 3-D slice.

    .venv/bin/python bench/output_head_speed.py --out bench/results/output_head_speed.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from baft_core import load_model
from baft_core.attach import final_logits


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=16, help="prompt length")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model()
    model = loaded.model
    model.requires_grad_(False)  # as `Editor` leaves it: this is what sends matmul down the slow path
    head = model.get_output_embeddings()
    dtype = next(model.parameters()).dtype
    rows = []
    for batch in args.batch:
        hidden = torch.randn(batch, args.tokens, model.config.hidden_size, dtype=dtype)
        assert torch.equal(head(hidden[:, -1:])[:, -1], final_logits(model, hidden[:, -1]))
        sliced, flat = [], []
        for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
            sliced.append(timed(lambda hidden=hidden: head(hidden[:, -1:])))
            flat.append(timed(lambda hidden=hidden: final_logits(model, hidden[:, -1])))
        rows.append({
            "batch": batch,
            "sliced_3d_median_ms": 1000 * statistics.median(sliced),
            "rows_2d_median_ms": 1000 * statistics.median(flat),
            "speedup": statistics.median(sliced) / statistics.median(flat),
        })
    result = {
        "command": "python bench/output_head_speed.py " + " ".join(sys.argv[1:]),
        "model": loaded.identity,
        "dtype": loaded.precision,
        "threads": args.threads,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
