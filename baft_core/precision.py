"""The number format the frozen model runs in: the caller's choice, bf16 on CUDA, and on a CPU
whichever candidate runs a training step fastest on this host, measured once and remembered.

`auto` does not read a table of CPU features: which format wins depends on more than the
features say (packed bf16 beat fp16 weights on a CPU with AMX and lost on one with AVX512-BF16;
fp16 weights halved an fp32 edit on some CPUs and gained nothing on others). It times the real
thing: the decoder layers a step runs and the output head, in the model's own architecture,
randomly initialised (speed does not depend on the values), each candidate packed as
`load_model` packs it, running a training step's forward and backward on a few rows. Every
operation counts, not only the products: bf16 that a CPU emulates is slow in all of them. It
takes a few seconds, once per host, model shape, torch version, thread count, instruction-set
cap and kernel set; the timings and the choice stay in a JSON file beside the model cache.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import packed_linears
from .config import EditConfig
from .prefix_cache import attention_context, training_attention

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# fp32 models whose frozen linear layers are packed (packed_linears.py): holding fp16 weights,
# multiplied by FBGEMM, or fp32 weights in oneDNN's layout
FP16_WEIGHTS = "fp16-weights"
FP32_PACKED = "fp32-packed"
PRECISIONS = ("auto", "float32", "bfloat16", "float16", FP16_WEIGHTS, FP32_PACKED)
# Each one's packed kind, whether this CPU runs it (looked up when asked), and what it needs
_PACKED = {
    FP16_WEIGHTS: (
        packed_linears.Fp16Linear, lambda: packed_linears.fp16_supported(), "a CPU that FBGEMM supports (x86 with AVX2)"
    ),
    FP32_PACKED: (
        packed_linears.Fp32Linear, lambda: packed_linears.fp32_supported(), "a CPU and a torch build with oneDNN"
    ),
}

# The kernel libraries' instruction-set caps (FBGEMM's, ATen's, MKL's, oneDNN's): set, they run
# this CPU's kernels as a smaller CPU's would, and so change what is fastest.
ISA_LIMITS = ("FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")

log = logging.getLogger(__name__)

PROBE_ROWS = 10  # a training step's tokens: the last prompt positions and a short target
PROBE_MAX_LAYER_BYTES = 1 << 30  # fewer layers than a step runs where they would hold more (in fp32)
PROBE_REPEATS = 15  # rounds of every candidate, each round 0.1-0.2 s on SmolLM2
PROBE_PRUNE = 2.0  # a candidate this many times the fastest after one round is out


def cpu_candidates() -> list[str]:
    """The precisions this CPU can run the frozen model in (fp16 arithmetic on a CPU is not one)."""
    return ["float32", "bfloat16"] + [name for name, (_, supported, _) in _PACKED.items() if supported()]


def load_dtype(precision: str) -> torch.dtype:
    """The dtype the model is loaded in: fp32 under the packed fp32 precisions, packed after."""
    return torch.float32 if precision in _PACKED else getattr(torch, precision)


def pack_frozen(model: nn.Module, precision: str, device: torch.device) -> None:
    """Pack a loaded model's frozen linear layers for the precision's CPU kernel, if it has one."""
    if precision in _PACKED:
        packed_linears.pack_linears(model, _PACKED[precision][0])
    elif precision == "bfloat16" and device.type == "cpu" and packed_linears.bf16_supported():
        packed_linears.pack_linears(model, packed_linears.Bf16Linear)


def resolve_precision(dtype: str | None, device: torch.device, config=None, cache_dir: str | Path | None = None) -> str:
    """`dtype` if given; else (None or "auto") bf16 on CUDA and, on a CPU, the fastest candidate
    for a model of `config` on this host, measured once and kept under `cache_dir`."""
    if dtype not in (None, "auto"):
        if dtype not in PRECISIONS:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(PRECISIONS)}")
        if dtype in _PACKED:
            _, supported, what = _PACKED[dtype]
            if device.type != "cpu" or not supported():
                raise ValueError(f"dtype {dtype} needs {what}")
        return dtype
    if device.type == "cuda":
        return "bfloat16"
    if config is None or cache_dir is None:
        raise ValueError("choosing a CPU precision measures the model: pass its config and a cache directory")
    return measured_choice(config, Path(cache_dir))["choice"]


def measured_choice(config, cache_dir: Path) -> dict:
    """The record of this host's measurement for `config` ({"key", "seconds", "choice"}): read
    from `cache_dir`, or measured now and written there. One process measures at a time, so that
    two starting together (the service's web process and worker) neither measure twice nor slow
    each other's measurement."""
    model = json.loads(config.to_json_string(use_diff=False))
    model.pop("_name_or_path", None)  # the same model elsewhere runs as fast
    capabilities = torch.cpu.get_capabilities()
    key = {
        # the CPU's name, caches and cores, and its instruction-set features
        "cpu": {name: value for name, value in capabilities.items() if not isinstance(value, bool)},
        "features": sorted(name for name, present in capabilities.items() if present is True),
        "isa_limits": {name: os.environ[name] for name in ISA_LIMITS if name in os.environ},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "candidates": cpu_candidates(),
        # which kernels the candidates run: a new one makes old timings wrong
        "kernels": [kind.kernel for kind in packed_linears.KINDS],
        "probe": {"layers": probe_layers(config), "rows": PROBE_ROWS, "repeats": PROBE_REPEATS},
        "model": model,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir / f"precision-{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return json.loads(path.read_text())
        try:
            seconds = measure_candidates(config, key["candidates"])
        except Exception as error:  # the probe only picks a speed: a model it cannot cut still runs
            log.warning("timing the precisions failed (%r): running float32, not remembered; DTYPE chooses", error)
            return {"key": key, "seconds": {}, "choice": "float32", "error": repr(error)}
        record = {"key": key, "seconds": seconds, "choice": min(seconds, key=seconds.__getitem__)}
        staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
        staging.write_text(json.dumps(record, indent=1, default=str))
        staging.rename(path)
    return record


def measure_candidates(config, candidates: list[str], repeats: int = PROBE_REPEATS) -> dict[str, float]:
    """Seconds of a probe step per candidate, the fastest of `repeats` rounds: a neighbour's load
    on a shared machine only ever adds time, and comes in bursts that a median of few rounds can
    sit in. The candidates alternate within each round, so that such a burst falls on all alike.
    One far behind after the first round runs no more (bf16 that a CPU emulates took 19x as long
    as fp16 weights, bench/results/precision_probe*.json)."""
    reference = probe_model(config)
    probes = {name: _prepared(reference, name) for name in candidates}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    running = list(candidates)
    for repeat in range(repeats + 1):
        for name in running if repeat % 2 == 0 else running[::-1]:
            seconds = probe_step_seconds(probes[name], load_dtype(name))
            if repeat:  # the first round warms up
                times[name].append(seconds)
        if repeat == 1:
            fastest = min(times[name][0] for name in running)
            running = [name for name in running if times[name][0] <= PROBE_PRUNE * fastest]
    return {name: round(min(values), 6) for name, values in times.items()}


def probe_model(config) -> PreTrainedModel:
    """The model of `config` cut to `probe_layers` decoder layers, randomly initialised, in fp32."""
    from transformers import AutoModelForCausalLM

    layers = probe_layers(config)
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = layers
    if isinstance(getattr(cut, "layer_types", None), list):  # per-layer attention kinds (Gemma, Qwen2)
        cut.layer_types = cut.layer_types[:layers]
    model = AutoModelForCausalLM.from_config(cut, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def probe_layers(config) -> int:
    """As many decoder layers as a training step runs with the default edited layers (from the
    first edited one up: 13 of SmolLM2's 30), so that the output head weighs in the probe as in a
    step; fewer where they would hold over PROBE_MAX_LAYER_BYTES (one at least). With 4 layers
    the probe ranked fp32 in oneDNN's layout ahead of fp16 weights where whole edits put it 1.11x
    behind; with 13 its step took as long as a real one (29 ms on fp16 weights)."""
    span = config.num_hidden_layers - EditConfig().resolved_layers(config.num_hidden_layers)[0]
    layer_bytes = 4 * _layer_parameters(config)
    return max(1, min(span, PROBE_MAX_LAYER_BYTES // layer_bytes))


def probe_step_seconds(model: PreTrainedModel, dtype: torch.dtype) -> float:
    """One training step's worth of work: PROBE_ROWS positions forward through every layer and
    the head, and the gradient back to the input, as the editor's steps run (attention kernel
    included)."""
    hidden = torch.randn(1, PROBE_ROWS, model.config.hidden_size, dtype=dtype, requires_grad=True)
    start = time.perf_counter()
    with attention_context(training_attention(dtype, torch.device("cpu"))):
        logits = model(inputs_embeds=hidden, use_cache=False).logits
        logits.float().logsumexp(-1).sum().backward()
    return time.perf_counter() - start


def _prepared(reference: PreTrainedModel, precision: str) -> PreTrainedModel:
    # transformers wraps `to` in functools.wraps(nn.Module.to), typed as the unbound function
    model = copy.deepcopy(reference).to(load_dtype(precision))  # type: ignore[arg-type]
    pack_frozen(model, precision, torch.device("cpu"))
    return model


def _layer_parameters(config) -> int:
    """Roughly a decoder layer's weights: attention (4 d^2) and a gated MLP (3 d x intermediate)."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return 4 * hidden * hidden + 3 * hidden * intermediate
