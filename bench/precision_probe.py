"""What `auto` measures on this host (baft_core/precision.py), several times over: the probe
step's seconds per candidate precision, the choice, and how long the probe took. Run it with
the instruction-set caps of precision.ISA_LIMITS to see the choice a smaller CPU would get,
and compare with a paired whole-edit run under the same caps.

    .venv/bin/python bench/precision_probe.py --out bench/results/precision_probe.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from baft_core import packed_linears
from baft_core.models import model_directory
from baft_core.precision import ISA_LIMITS, cpu_candidates, measure_candidates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path, identity = model_directory()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    runs = []
    for _ in range(args.runs):
        start = time.perf_counter()
        seconds = measure_candidates(config, cpu_candidates())
        runs.append({
            "probe_seconds": round(time.perf_counter() - start, 2),
            "step_ms": {name: round(1000 * value, 2) for name, value in seconds.items()},
            "choice": min(seconds, key=seconds.get),
        })
        print(json.dumps(runs[-1]), flush=True)
    capabilities = torch.cpu.get_capabilities()
    result = {
        "command": "python bench/precision_probe.py " + " ".join(sys.argv[1:]),
        "model": identity,
        "threads": args.threads,
        "cpu": capabilities.get("cpu_name"),
        "cpu_features": {k: bool(capabilities.get(k)) for k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")},
        "isa_limits": {name: os.environ[name] for name in ISA_LIMITS if name in os.environ},
        "bf16_packed_by_onednn": packed_linears.bf16_supported(),
        "choices": sorted({run["choice"] for run in runs}),
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
