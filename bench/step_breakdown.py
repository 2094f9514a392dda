"""Where a training step's time goes on this host: its frozen products (the packed linear layers'
kernels, forward and backward, wall time around each call) against the whole step (forward and
backward of single ZsRE edits on the bundled model, as `CachedBatch` runs them), and the cost of
one small operation here (an 8 x 576 add, the size of a step's elementwise work), which is what
the rest of a step is made of.

    .venv/bin/python bench/step_breakdown.py --out bench/results/ablation/step_breakdown-<host>.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from paired_speed import training_batch, training_step  # the step paired_speed times

from baft_core import EditConfig, Editor, load_model
from baft_core.data import load_edits
from baft_core.packed_linears import KINDS


class ProductClock:
    """Adds up the wall time of every packed product while installed."""

    def __init__(self) -> None:
        self.seconds, self.calls, self.originals = 0.0, 0, {}

    def __enter__(self) -> ProductClock:
        # the classes that define a product (the oneDNN kinds share their base's)
        owners = {klass for kind in KINDS for klass in kind.__mro__ if "product" in klass.__dict__}
        for owner in owners:
            self.originals[owner] = owner.__dict__["product"]
            original = self.originals[owner].__func__

            def timed(x, packed, bias, original=original):
                start = time.perf_counter()
                try:
                    return original(x, packed, bias)
                finally:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1

            owner.product = staticmethod(timed)
        return self

    def __exit__(self, *exc) -> None:
        for owner, original in self.originals.items():
            owner.product = original


def small_op_microseconds(repeats: int = 20000) -> float:
    a, b = torch.ones(8, 576), torch.ones(8, 576)
    start = time.perf_counter()
    for _ in range(repeats):
        a + b
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--data",
        nargs="+",
        default=["../shared/data/zsre/zsre_eval_portability_dev.json"],
    )
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each edit's batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model()
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig(), [])
    records = [r for path in args.data for r in load_edits(path, "zsre", skip_invalid=True)][: args.edits]
    steps, products, calls = [], [], []
    for request in records:
        batch = training_batch(editor, editor.encode(request.prompt, request.target))
        for repeat in range(args.steps + 1):
            with ProductClock() as clock:
                start = time.perf_counter()
                training_step(batch)
                seconds = time.perf_counter() - start
            if repeat:  # the first step of a batch warms up
                steps.append(seconds)
                products.append(clock.seconds)
                calls.append(clock.calls)
    step_ms, product_ms = 1000 * statistics.median(steps), 1000 * statistics.median(products)
    capabilities = torch.cpu.get_capabilities()
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": loaded.identity,
        "precision": loaded.precision,
        "threads": args.threads,
        "cpu": capabilities.get("cpu_name"),
        "cpu_features": {name: bool(capabilities.get(name)) for name in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")},
        "steps_timed": len(steps),
        "step_median_ms": round(step_ms, 1),
        "products_median_ms": round(product_ms, 1),
        "products_share": round(sum(products) / sum(steps), 3),
        "product_calls_per_step": statistics.median(calls),
        "small_op_us": round(min(small_op_microseconds() for _ in range(3)), 2),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
