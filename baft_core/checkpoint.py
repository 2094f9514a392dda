"""Adapter checkpoints: safetensors with the state, plus a JSON manifest carrying its sha256.

The safetensors file holds everything that defines the adapter (parameters, running basis usage,
config, base-model identity, the applied edits) and nothing time-dependent, so identical states
give identical bytes and one content hash.

Sealed blocks never change, so each is stored once, as a segment file named by its own sha256
in a segments directory that checkpoints can share: the adapter file lists its segments in
order. A service keeping one checkpoint per version then stores each edit's block once, not once
per later version (which would grow with the square of the number of edits)."""
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
from safetensors.torch import load, load_file, save, save_file

from .attach import InterventionSet
from .config import EditConfig
from .data import EditRequest
from .routing import UNLIMITED

ADAPTER_FILE = "adapter.safetensors"
# safetensors writes its metadata map in hash-map order, which varies from one save to the next:
# everything goes under this one key, as canonical JSON, so that identical states give identical bytes.
METADATA_KEY = "baft"
MANIFEST_FILE = "manifest.json"
# 3: segments carry their edits' route keys (format-2 segments load as blocks without keys,
# which routing leaves open). 4: routing reads its own layer with its own standardisation, and
# each key names its edit (format 3 routed at the first edited layer, one key per edit in order).
# 5: segments carry their block's answer window (older ones load as blocks without a window).
FORMAT_VERSION = 5
SEGMENTS_DIR = "segments"
_SEALED_ROWS = ("rotation", "source_weight", "gate_weight", "source_bias", "gate_bias")
_ROUTE_KEYS, _KEY_THRESHOLD, _KEY_BLOCK = "router.keys", "router.key_threshold", "router.key_block"
_KEY_EDIT, _BLOCK_SPAN = "router.key_edit", "router.block_span"


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


def _sealed_key(layer: int, name: str) -> str:
    return f"sealed.{layer}.{name}"


def _segment_bytes(interventions: InterventionSet, block: int) -> bytes:
    """One sealed block's rows at every layer, serialised deterministically."""
    rows = slice(block * interventions.rank, (block + 1) * interventions.rank)
    tensors = {
        f"{layer}.{name}": getattr(interventions.sealed[str(layer)], name)[rows].detach().cpu().contiguous()
        for layer in interventions.layers
        for name in _SEALED_ROWS
    }
    router = interventions.router
    own = router.key_block == block
    if own.any():
        tensors["route_keys"] = router.keys[own].detach().cpu().contiguous()
        tensors["route_thresholds"] = router.key_threshold[own].detach().cpu().contiguous()
        tensors["route_key_edits"] = router.key_edit[own].detach().cpu().contiguous()
    tensors["answer_span"] = router.block_span[block : block + 1].detach().cpu().contiguous()
    return save(tensors)


def _write_segments(interventions: InterventionSet, segments: Path) -> list[str]:
    """Stores the sealed blocks missing from `segments`; returns every block's segment id
    (sha256). Ids already computed are kept on the adapter, so a save serialises and hashes only
    new blocks (and blocks whose file this directory lacks)."""
    ids = interventions.segment_ids
    del ids[interventions.sealed_blocks :]  # a restored, shorter state keeps only its own
    segments.mkdir(parents=True, exist_ok=True)
    for block in range(interventions.sealed_blocks):
        path = segments / f"{ids[block]}.safetensors" if block < len(ids) else None
        if path is not None and path.exists():
            continue
        data = _segment_bytes(interventions, block)
        segment_id = hashlib.sha256(data).hexdigest()
        _atomic_write(segments / f"{segment_id}.safetensors", lambda tmp: Path(tmp).write_bytes(data))
        if block == len(ids):
            ids.append(segment_id)
    return list(ids)


def _read_segments(segments: Path, ids: list[str], layers: list[int]) -> dict[str, torch.Tensor]:
    """The sealed rows of every layer, the route keys with their blocks and each block's answer
    window, concatenated in block order, each segment hash-checked."""
    parts: dict[str, list[torch.Tensor]] = {_sealed_key(l, n): [] for l in layers for n in _SEALED_ROWS}
    parts[_ROUTE_KEYS], parts[_KEY_THRESHOLD], parts[_KEY_BLOCK], parts[_KEY_EDIT] = [], [], [], []
    parts[_BLOCK_SPAN] = []
    for block, segment_id in enumerate(ids):
        path = segments / f"{segment_id}.safetensors"
        if not path.is_file():
            raise CheckpointError(f"segment {path} is missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != segment_id:
            raise CheckpointError(f"segment {path} is corrupt: its sha256 does not match its name")
        tensors = load(data)
        parts[_BLOCK_SPAN].append(tensors.pop("answer_span", torch.tensor([UNLIMITED])))
        for key, value in tensors.items():
            if key == "route_keys":
                parts[_ROUTE_KEYS].append(value)
                parts[_KEY_BLOCK].append(torch.full((len(value),), block, dtype=torch.long))
                continue
            if key == "route_thresholds":
                parts[_KEY_THRESHOLD].append(value)
                continue
            if key == "route_key_edits":
                parts[_KEY_EDIT].append(value)
                continue
            layer, name = key.split(".", 1)
            parts[_sealed_key(int(layer), name)].append(value)
    return {key: torch.cat(values) for key, values in parts.items() if values}


def save_checkpoint(
    directory: str | Path,
    interventions: InterventionSet,
    config: EditConfig,
    base_model: str,
    history: list[EditRequest],
    segments: str | Path | None = None,
) -> dict:
    """Writes adapter.safetensors and manifest.json into `directory`, sealed blocks into
    `segments` (default: `directory/segments`); returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    segment_ids = _write_segments(interventions, Path(segments) if segments else directory / SEGMENTS_DIR)
    sealed_rows = {_sealed_key(l, n) for l in interventions.layers for n in _SEALED_ROWS}
    sealed_rows |= {_ROUTE_KEYS, _KEY_THRESHOLD, _KEY_BLOCK, _KEY_EDIT, _BLOCK_SPAN}  # stored in the segments
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in interventions.state_dict().items() if k not in sealed_rows
    }
    first = interventions[interventions.layers[0]]
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "base_model": base_model,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "layers": json.dumps(interventions.layers),
        "routing_layer": str(interventions.routing_layer),
        "hidden_size": str(first.hidden_size),
        "rank": str(first.rank),
        "gated": json.dumps(first.gated),
        "history": json.dumps([r.to_dict() for r in history], sort_keys=True),
        "segments": json.dumps(segment_ids),
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
        "sealed_blocks": len(segment_ids),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    _atomic_write(directory / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return manifest


def load_checkpoint(
    directory: str | Path,
    base_model: str | None = None,
    device: str | torch.device = "cpu",
    segments: str | Path | None = None,
) -> Checkpoint:
    """Reads a checkpoint, checking the file's and every segment's hash and, if given, the base
    model identity. `segments` as given to save_checkpoint."""
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
    config_data = json.loads(metadata["config"])
    # Adapters from before routing were trained for sealed blocks that keep their gates.
    config_data.setdefault("sealed_gates", True)
    config = EditConfig.from_dict(config_data)
    layers = json.loads(metadata["layers"])
    interventions = InterventionSet(
        int(metadata["hidden_size"]),
        layers,
        int(metadata["rank"]),
        json.loads(metadata["gated"]),
        route_threshold=config.route_threshold if config.block_edits else 0.0,
        sealed_gates=config.sealed_gates,
        routing_layer=int(metadata.get("routing_layer", layers[0])),
    )
    segment_ids = json.loads(metadata.get("segments", "[]"))
    if segment_ids:
        segments = Path(segments) if segments else directory / SEGMENTS_DIR
        tensors.update(_read_segments(segments, segment_ids, layers))
    # Checkpoints of format 1 predate sealed blocks, those of format 2 routing: what they lack
    # keeps its empty default (no routing threshold: every block's gates decide alone).
    missing, unexpected = interventions.load_state_dict(tensors, strict=False)
    if unexpected or any(not key.startswith(("sealed.", "router.")) for key in missing):
        raise CheckpointError(
            f"{adapter} does not match its metadata: missing {missing}, unexpected {unexpected}"
        )
    interventions.segment_ids.extend(segment_ids)
    history = [EditRequest.from_dict(r) for r in json.loads(metadata["history"])]
    if "router.center" not in tensors and interventions.gated:
        _route_like_format_3(interventions, len(history))
    return Checkpoint(interventions.to(device), config, history, manifest)


def _route_like_format_3(interventions: InterventionSet, edits: int) -> None:
    """Format 3 standardised route keys like the first edited layer's gates, and left one key
    per edit, in edit order: the sealed ones, then the trainable block's."""
    router, first = interventions.router, interventions[interventions.layers[0]]
    router.center, router.scale = first.gate_center.clone(), first.gate_scale.clone()
    block_start = edits - int(interventions.edit_count)
    router.key_edit = torch.arange(block_start - len(router.keys), block_start)
    router.pending_edit = torch.arange(block_start, block_start + len(router.pending))
