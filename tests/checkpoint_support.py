"""Rewriting a saved checkpoint the way an older format wrote it (tests of backward compatibility)."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, load_file, save, save_file

from baft_core.checkpoint import ADAPTER_FILE, MANIFEST_FILE, METADATA_KEY, SEGMENTS_DIR

Change = Callable[[dict, dict[str, torch.Tensor]], tuple[dict, dict[str, torch.Tensor]]]


def rewrite_adapter(directory: Path, change: Change) -> None:
    """Applies `change(metadata, tensors)` to the adapter file and re-signs the manifest."""
    adapter = directory / ADAPTER_FILE
    with safe_open(adapter, framework="pt") as handle:
        metadata = json.loads(handle.metadata()[METADATA_KEY])
    metadata, tensors = change(metadata, load_file(adapter))
    save_file(tensors, adapter, metadata={METADATA_KEY: json.dumps(metadata)})
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["sha256"] = hashlib.sha256(adapter.read_bytes()).hexdigest()
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def strip_segments(directory: Path, metadata: dict, names: tuple[str, ...]) -> dict:
    """Rewrites each segment listed in `metadata` without the tensors `names` (under its new
    hash), and returns the metadata listing the new segments."""
    segment_ids = []
    for segment_id in json.loads(metadata["segments"]):
        path = directory / SEGMENTS_DIR / f"{segment_id}.safetensors"
        data = save({k: v for k, v in load(path.read_bytes()).items() if k not in names})
        segment_ids.append(hashlib.sha256(data).hexdigest())
        (directory / SEGMENTS_DIR / f"{segment_ids[-1]}.safetensors").write_bytes(data)
    # Formats before 6 named segments by their sha256 alone, without a CRC-32 beside.
    return {**{k: v for k, v in metadata.items() if k != "segment_crc32"}, "segments": json.dumps(segment_ids)}
