"""The frozen products of a training step, kernel against kernel: every linear weight of the
bundled model's edited span (the first edited layer up, and the output head) multiplied by a
few rows, forward (x W^T) and backward (g W), as fp32, plain bf16, fp16 weights in FBGEMM's
packing, and bf16 and fp32 in oneDNN's. The weights are walked in turn, as a step does, so that
they come from memory, not from a cache still warm with the same weight. Kernels interleaved,
in one run.

    .venv/bin/python bench/packed_products.py --out bench/results/packed_products.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from baft_core import EditConfig, find_decoder_layers, load_model
from baft_core.packed_linears import (
    Bf16Linear,
    Fp16Linear,
    Fp32Linear,
    bf16_supported,
    fp16_supported,
    fp32_supported,
)
from baft_core.precision import ISA_LIMITS


def walk_seconds(linears: list[nn.Module], rows: int, dtype: torch.dtype) -> float:
    """One pass over `linears`: each multiplies `rows` rows forward and its gradient backward."""
    xs = [torch.randn(rows, linear.in_features, dtype=dtype, requires_grad=True) for linear in linears]
    start = time.perf_counter()
    for linear, x in zip(linears, xs):
        linear(x).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(dtype="float32").model
    layers = find_decoder_layers(model)
    first = EditConfig().resolved_layers(len(layers))[0]
    plain = [m for layer in layers[first:] for m in layer.modules() if type(m) is nn.Linear]
    plain.append(model.get_output_embeddings())
    for linear in plain:
        linear.requires_grad_(False)
    kernels = {"float32": (plain, torch.float32)}
    kernels["bfloat16"] = ([copy.deepcopy(m).bfloat16() for m in plain], torch.bfloat16)
    if fp16_supported():
        kernels["fp16-weights (FBGEMM)"] = ([Fp16Linear(m) for m in plain], torch.float32)
    if bf16_supported():
        kernels["bfloat16 packed (oneDNN)"] = ([Bf16Linear(copy.deepcopy(m).bfloat16()) for m in plain], torch.bfloat16)
    if fp32_supported():
        kernels["float32 packed (oneDNN)"] = ([Fp32Linear(m) for m in plain], torch.float32)
    capabilities = torch.cpu.get_capabilities()
    results = []
    for rows in args.rows:
        times = {name: [] for name in kernels}
        for repeat in range(args.repeats + 1):
            order = list(kernels) if repeat % 2 == 0 else list(kernels)[::-1]
            for name in order:
                linears, dtype = kernels[name]
                seconds = walk_seconds(linears, rows, dtype)
                if repeat:  # the first pass warms up
                    times[name].append(seconds)
        medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
        results.append({
            "rows": rows,
            "median_ms": {name: round(ms, 2) for name, ms in medians.items()},
            "over_fp32": {name: round(ms / medians["float32"], 3) for name, ms in medians.items()},
        })
        print(json.dumps(results[-1]), flush=True)
    result = {
        "command": "python bench/packed_products.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "cpu": capabilities.get("cpu_name"),
        "cpu_features": {k: bool(capabilities.get(k)) for k in ("avx2", "avx512_bf16", "amx_bf16")},
        "isa_limits": {name: os.environ[name] for name in ISA_LIMITS if name in os.environ},
        "weights": f"the {len(plain)} linear weights of layers {first}-{len(layers) - 1} and the output head",
        "results": results,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
