"""Adapter checkpoints: safetensors with the state, plus a JSON manifest carrying its sha256.

The safetensors file holds everything that defines the adapter (parameters, running basis usage,
config, base-model identity, the applied edits used for replay) and nothing time-dependent, so
identical states give identical bytes and one content hash."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .attach import InterventionSet
from .config import EditConfig
from .data import EditRequest

ADAPTER_FILE = "adapter.safetensors"
# safetensors writes its metadata map in hash-map order, which varies from one save to the next:
# everything goes under this one key, as canonical JSON, so that identical states give identical bytes.
METADATA_KEY = "baft"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or made for another base model."""


@dataclass
class Checkpoint:
    interventions: InterventionSet
    config: EditConfig
    history: list[EditRequest]
    manifest: dict


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    directory: str | Path,
    interventions: InterventionSet,
    config: EditConfig,
    base_model: str,
    history: list[EditRequest],
) -> dict:
    """Writes adapter.safetensors and manifest.json into `directory`; returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in interventions.state_dict().items()}
    first = interventions[interventions.layers[0]]
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "base_model": base_model,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "layers": json.dumps(interventions.layers),
        "hidden_size": str(first.hidden_size),
        "rank": str(first.rank),
        "gated": json.dumps(first.gated),
        "history": json.dumps([r.to_dict() for r in history], sort_keys=True),
    }
    adapter = directory / ADAPTER_FILE
    packed = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    _atomic_write(adapter, lambda tmp: save_file(tensors, tmp, metadata=packed))
    manifest = {
        "format_version": FORMAT_VERSION,
        "sha256": _sha256(adapter),
        "base_model": base_model,
        "method": config.method,
        "layers": interventions.layers,
        "rank": first.rank,
        "edits": len(history),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    _atomic_write(directory / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return manifest


def load_checkpoint(
    directory: str | Path, base_model: str | None = None, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Reads a checkpoint, checking the file's hash and, if given, the base model identity."""
    directory = Path(directory)
    adapter, manifest_path = directory / ADAPTER_FILE, directory / MANIFEST_FILE
    if not adapter.is_file() or not manifest_path.is_file():
        raise CheckpointError(f"no checkpoint in {directory} (need {ADAPTER_FILE} and {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {err}") from None
    actual = _sha256(adapter)
    if manifest.get("sha256") != actual:
        raise CheckpointError(
            f"{adapter} is corrupt: sha256 {actual[:16]}... does not match the manifest's "
            f"{str(manifest.get('sha256'))[:16]}..."
        )
    try:
        with safe_open(adapter, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(adapter)
        if METADATA_KEY in metadata:  # else the earlier layout, one metadata entry per field
            metadata = json.loads(metadata[METADATA_KEY])
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{adapter} cannot be read: {err}") from None
    if base_model is not None and metadata["base_model"] != base_model:
        raise CheckpointError(
            f"checkpoint was made for base model {metadata['base_model']}, not {base_model}"
        )
    config = EditConfig.from_dict(json.loads(metadata["config"]))
    interventions = InterventionSet(
        int(metadata["hidden_size"]),
        json.loads(metadata["layers"]),
        int(metadata["rank"]),
        json.loads(metadata["gated"]),
    )
    interventions.load_state_dict(tensors)
    history = [EditRequest.from_dict(r) for r in json.loads(metadata["history"])]
    return Checkpoint(interventions.to(device), config, history, manifest)
