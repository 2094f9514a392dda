"""Adapter checkpoints: safetensors with the state, plus a JSON manifest carrying its sha256.

The safetensors file holds everything that defines the adapter (parameters, running basis usage,
config, base-model identity, the applied edits) and nothing time-dependent, so identical states
give identical bytes and one content hash.

Sealed blocks never change, so each is stored once, as a segment file named by its own sha256
in a segments directory that checkpoints can share (`segments.py`): the adapter file lists its
segments in order, each with its CRC-32.

A checkpoint may name a parent (format 6): the checkpoint whose state it extends, found in the
directory beside its own named by the parent's sha256. It then holds only what it adds: the
edits after the parent's, the segments after the parent's, and the tensors that differ from the
parent's. A service keeping one checkpoint per version so stores each version in proportion to
what it adds, not to every edit before it (which grows with the square of the number of edits).
A trainable block that holds no edit (the fresh block after a seal) is stored as the random
generator's state it was drawn from (5 KB, not the block's 500 KB) and drawn again on load."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import save_file

from .attach import InterventionSet
from .config import EditConfig
from .data import EditRequest
from .segments import SegmentReader, as_changes, segment_checksum, segment_state_keys, write_segments
from .tensor_files import CheckpointError, atomic_write, read_bytes, read_pieces, read_verified

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
# safetensors writes its metadata map in hash-map order, which varies from one save to the next:
# everything goes under this one key, as canonical JSON, so that identical states give identical bytes.
METADATA_KEY = "baft"
MANIFEST_FILE = "manifest.json"
# 3: segments carry their edits' route keys (format-2 segments load as blocks without keys,
# which routing leaves open). 4: routing reads its own layer with its own standardisation, and
# each key names its edit (format 3 routed at the first edited layer, one key per edit in order).
# 5: segments carry their block's answer window (older ones load as blocks without a window).
# 6: a checkpoint may name its parent and hold only what it adds; a trainable block without
# edits may be stored as the generator state it was drawn from. 7: that state is the block's own
# generator's (`InterventionSet.block_generator`), not the global one's; a format-6 draw state
# loads as another empty block (the identity either way). 8: a sealed basis holds its change
# C = A - R (`blocks.py`), and an ungated block only its `sealed_rank` strongest directions (older
# sealed rows load as C = A - R, every basis kept).
# 9: route keys read up to `route_tokens` subject tokens (a segment holds each key's count, the
# earlier tokens' states and which of them each key reads); older keys read their last token alone.
# 10: segments carry their block's relation check (its edits' prompt states and their probes',
# relations.py); older blocks have none and are never shut by it. An ungated block's rows are
# fp16 (older fp32 rows load as fp16).
# 11: a block's relation states are int8 with one scale a row (older fp16 states are quantised as
# they load, to what a seal would have made of them).
# 12: route keys may spell their subject (routing.py): a segment whose keys do holds the
# spellings and which of them each key reads; older keys spell nothing.
# 13: a segment's relation check keeps its edits' subjects as token ids (whether a prompt spells
# the subject, relations.py); older blocks keep none and hold every prompt to the plain rule.
FORMAT_VERSION = 13
SEGMENTS_DIR = "segments"
_DRAW_STATE = "draw.generator_state"  # the trainable block's draw, in place of its parameters


@dataclass
class Checkpoint:
    interventions: InterventionSet
    config: EditConfig
    history: list[EditRequest]
    manifest: dict  # as saved; "sha256" names the adapter file (and the checkpoint)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _parse(data: bytearray, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """`read_pieces` as tensors, the metadata unpacked."""
    metadata, pieces = read_pieces(data, path)
    if METADATA_KEY in metadata:  # else the earlier layout, one metadata entry per field
        metadata = json.loads(metadata[METADATA_KEY])
    return metadata, {name: piece.tensor() for name, piece in pieces.items()}


def read_metadata(path: str | Path) -> dict:
    """An adapter file's metadata: "history" and "segments" (JSON lists) are what it adds to its
    "parent" (a sha256, absent for a checkpoint that holds its whole state)."""
    path = Path(path)
    return _parse(read_bytes(path, "adapter"), path)[0]


def _own_state(interventions: InterventionSet) -> dict[str, torch.Tensor]:
    """The state an adapter file holds: all but the sealed blocks' (their segments hold those)."""
    sealed = segment_state_keys(interventions.layers)
    return {k: v.detach().cpu().contiguous() for k, v in interventions.state_dict().items() if k not in sealed}


def _drawn_keys(interventions: InterventionSet) -> set[str]:
    """The trainable block's parameters: what a fresh draw sets (its gate standardisation is
    copied from the block before, not drawn)."""
    return {name for name, _ in interventions.by_layer.named_parameters(prefix="by_layer")}


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)


def _draw(interventions: InterventionSet, state: torch.Tensor, threads: int) -> dict[str, torch.Tensor]:
    """The trainable block's parameters as drawn from generator state `state`, with `threads`
    threads: the QR that makes the bases orthonormal gives other last bits with another count."""
    generator = torch.Generator()
    generator.set_state(state)
    with _threads(threads):
        blocks = interventions._fresh_blocks(generator)
    return {
        f"by_layer.{layer}.{name}": value.detach()
        for layer, block in blocks.items()
        for name, value in block.named_parameters()
    }


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(tensors[k].numpy().tobytes() for k in sorted(tensors))).hexdigest()


def _as_draw(interventions: InterventionSet) -> tuple[torch.Tensor, dict] | None:
    """(generator state, {"threads", "sha256" of the drawn values}) when the trainable block is
    exactly what that state draws in this process, else None (it holds edits)."""
    state = getattr(interventions, "draw_state", None)
    if state is None:
        return None
    threads = torch.get_num_threads()
    drawn = _draw(interventions, state, threads)
    live = dict(interventions.by_layer.named_parameters(prefix="by_layer"))
    if live.keys() != drawn.keys() or any(not torch.equal(live[k].detach().cpu(), v) for k, v in drawn.items()):
        return None
    return state, {"threads": threads, "sha256": _digest(drawn)}


def _same(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def save_checkpoint(
    directory: str | Path,
    interventions: InterventionSet,
    config: EditConfig,
    base_model: str,
    history: list[EditRequest],
    segments: str | Path | None = None,
    parent: Checkpoint | None = None,
) -> dict:
    """Writes adapter.safetensors and manifest.json into `directory`, sealed blocks into
    `segments` (default: `directory/segments`); returns the manifest. With `parent` (a checkpoint
    this state extends, saved in a directory beside `directory`) the adapter file holds only what
    the state adds to it; without, the whole state."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    segments = Path(segments) if segments else directory / SEGMENTS_DIR
    # The parent's segments are there: it loaded, or was saved, with them.
    known = len(parent.interventions.segment_ids) if parent is not None else 0
    segment_ids, written = write_segments(interventions, segments, known)
    tensors, drawn_keys = _own_state(interventions), _drawn_keys(interventions)
    first = interventions[interventions.layers[0]]
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "base_model": base_model,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "layers": json.dumps(interventions.layers),
        "routing_layer": str(interventions.routing_layer),
        "relation_layer": str(interventions.relations.layer),
        "hidden_size": str(first.hidden_size),
        "rank": str(first.rank),
        "gated": json.dumps(first.gated),
        "edits": str(len(history)),
        "sealed_blocks": str(len(segment_ids)),
    }
    own_history, own_segments = list(history), segment_ids
    if parent is not None:
        edits, blocks = len(parent.history), len(parent.interventions.segment_ids)
        if list(history[:edits]) != list(parent.history) or segment_ids[:blocks] != parent.interventions.segment_ids:
            raise CheckpointError(f"the state does not extend its parent checkpoint {parent.manifest['sha256'][:12]}...")
        own_history, own_segments = own_history[edits:], segment_ids[blocks:]
        inherited = _own_state(parent.interventions)
        # The trainable block is always stored whole (or as its draw): a draw replaces it at once.
        tensors = {k: v for k, v in tensors.items() if k in drawn_keys or not _same(v, inherited.get(k))}
        metadata["parent"] = parent.manifest["sha256"]
    draw = _as_draw(interventions)
    if draw is not None:
        tensors = {k: v for k, v in tensors.items() if k not in drawn_keys}
        tensors[_DRAW_STATE] = draw[0]
        metadata["draw"] = json.dumps(draw[1], sort_keys=True)
    metadata["history"] = json.dumps([r.to_dict() for r in own_history], sort_keys=True)
    metadata["segments"] = json.dumps(own_segments)
    # Loading checks segments against these (5 GB in 1 s, where sha256 took 4 s); each was
    # computed from bytes that match the segment's sha256, and this file's own hash covers them.
    metadata["segment_crc32"] = json.dumps([segment_checksum(segments, i, written) for i in own_segments])
    adapter = directory / ADAPTER_FILE
    packed = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    atomic_write(adapter, lambda tmp: save_file(tensors, tmp, metadata=packed))
    manifest = {
        "format_version": FORMAT_VERSION,
        "sha256": _sha256(adapter),
        "parent": metadata.get("parent"),
        "base_model": base_model,
        "method": config.method,
        "layers": interventions.layers,
        "rank": first.rank,
        "edits": len(history),
        "sealed_blocks": len(segment_ids),
        "created_at": datetime.now(UTC).isoformat(),
    }
    atomic_write(directory / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return manifest


def _lineage(directory: Path, metadata: dict, tensors: dict) -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
    """The checkpoint's own (metadata, tensors), then each ancestor's, newest first, each
    ancestor's file hash-checked against the name its child gives it."""
    yield metadata, tensors
    while parent := metadata.get("parent"):
        path = directory.parent / parent / ADAPTER_FILE
        metadata, tensors = _parse(read_verified(path, parent, "parent checkpoint"), path)
        yield metadata, tensors


def _fold(
    directory: Path, metadata: dict, tensors: dict, drawn_keys: set[str]
) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, dict] | None, list[dict], list[tuple[str, int | None]]]:
    """A checkpoint and its ancestors as one state: (tensors, the trainable block's draw if that
    is how the newest checkpoint that sets it stores it, history entries, (segment id, CRC-32 or
    None)). Newest
    first, so a tensor is the newest checkpoint's that holds it."""
    state: dict[str, torch.Tensor] = {}
    draw, block_set = None, False
    histories, segment_lists = [], []
    edits_left = int(metadata["edits"]) if "edits" in metadata else None
    blocks_left = int(metadata["sealed_blocks"]) if "sealed_blocks" in metadata else None
    for own_metadata, own in _lineage(directory, metadata, tensors):
        history, segment_ids = json.loads(own_metadata["history"]), json.loads(own_metadata.get("segments", "[]"))
        # Formats before 6 name their segments by sha256 alone.
        checksums = json.loads(own_metadata.get("segment_crc32", "null")) or [None] * len(segment_ids)
        if edits_left is not None:
            assert blocks_left is not None  # checkpoints write "sealed_blocks" with "edits"
            if own_metadata.get("edits", str(edits_left)) != str(edits_left) or own_metadata.get(
                "sealed_blocks", str(blocks_left)
            ) != str(blocks_left):
                raise CheckpointError(f"the lineage of {directory} does not add up: an ancestor holds other edits")
            edits_left, blocks_left = edits_left - len(history), blocks_left - len(segment_ids)
        histories.append(history)
        segment_lists.append(list(zip(segment_ids, checksums)))
        generator_state = own.pop(_DRAW_STATE, None)
        if generator_state is not None and not block_set:
            draw = generator_state.clone(), json.loads(own_metadata["draw"])
        for key, value in own.items():
            if not (block_set and key in drawn_keys):
                state.setdefault(key, value)
        block_set = block_set or generator_state is not None or not drawn_keys.isdisjoint(own)
    if edits_left not in (None, 0) or blocks_left not in (None, 0):
        raise CheckpointError(f"the lineage of {directory} does not add up: its root lacks edits or segments")
    history = [entry for part in reversed(histories) for entry in part]
    return state, draw, history, [segment for part in reversed(segment_lists) for segment in part]


def load_checkpoint(
    directory: str | Path,
    base_model: str | None = None,
    device: str | torch.device = "cpu",
    segments: str | Path | None = None,
) -> Checkpoint:
    """Reads a checkpoint with its ancestors, checking every file's and every segment's hash and,
    if given, the base model identity. `segments` as given to save_checkpoint."""
    directory = Path(directory)
    adapter, manifest_path = directory / ADAPTER_FILE, directory / MANIFEST_FILE
    if not adapter.is_file() or not manifest_path.is_file():
        raise CheckpointError(f"no checkpoint in {directory} (need {ADAPTER_FILE} and {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {err}") from None
    data = read_bytes(adapter, "adapter")
    actual = hashlib.sha256(data).hexdigest()
    if manifest.get("sha256") != actual:
        raise CheckpointError(
            f"{adapter} is corrupt: sha256 {actual[:16]}... does not match the manifest's "
            f"{str(manifest.get('sha256'))[:16]}..."
        )
    metadata, tensors = _parse(data, adapter)
    if base_model is not None and metadata["base_model"] != base_model:
        raise CheckpointError(
            f"checkpoint was made for base model {metadata['base_model']}, not {base_model}"
        )
    config_data = json.loads(metadata["config"])
    # Adapters from before routing were trained for sealed blocks that keep their gates, and
    # those before format 8 sealed every basis.
    config_data.setdefault("sealed_gates", True)
    config_data.setdefault("sealed_rank", None)
    config_data.setdefault("route_tokens", 1)  # before format 9 a key read its subject's last token
    config_data.setdefault("relation_threshold", 0.0)  # before format 10 no relation check
    # Saved before the gap: its earlier subject tokens within as many positions as they are, the
    # nearest to the tokens in a row that such a key read then.
    config_data.setdefault("route_prefix_gap", 0)
    config_data.setdefault("route_spelling", False)  # before format 12 no key spelled its subject
    # Saved before these options: a key needed all its earlier subject tokens, no edit keyed other
    # spellings, and spellings compared token ids.
    config_data.setdefault("route_prefix_needed", None)
    config_data.setdefault("route_name_variants", False)
    config_data.setdefault("route_spelling_normalised", False)
    config_data.setdefault("route_prefix_word", False)  # saved before it: any earlier token would do
    config = EditConfig.from_dict(config_data)
    layers = json.loads(metadata["layers"])
    routing_layer = int(metadata.get("routing_layer", layers[0]))
    interventions = InterventionSet(
        int(metadata["hidden_size"]),
        layers,
        int(metadata["rank"]),
        json.loads(metadata["gated"]),
        route_threshold=config.route_threshold if config.block_edits else 0.0,
        sealed_gates=config.sealed_gates,
        routing_layer=routing_layer,
        seed=config.seed,
        sealed_rank=config.sealed_rank,
        route_tokens=config.route_tokens,
        route_prefix_threshold=config.route_prefix_threshold,
        route_prefix_gap=config.route_prefix_gap,
        route_prefix_needed=config.route_prefix_needed,
        route_spelling_normalised=config.route_spelling_normalised,
        route_prefix_word=config.route_prefix_word,
        relation_layer=int(metadata.get("relation_layer", routing_layer)),
        relation_threshold=config.relation_threshold if config.block_edits and config.route_threshold else 0.0,
        relation_margin=config.relation_margin,
        relation_other_name_ratio=config.relation_other_name_ratio,
    )
    tensors, draw, history_entries, segments_held = _fold(directory, metadata, tensors, _drawn_keys(interventions))
    tensors = as_changes(tensors)
    segment_ids = [segment_id for segment_id, _ in segments_held]
    interventions.draw_state = None  # unknown for a block stored whole: it is then stored whole again
    if draw is not None:
        generator_state, recorded = draw
        drawn = _draw(interventions, generator_state, recorded["threads"])
        if _digest(drawn) != recorded["sha256"]:
            # A block without edits acts as the identity, drawn either way: this state differs
            # from the saved one only in its next edit's starting point (other last bits of the
            # QR on another machine, or another draw from a checkpoint older than format 7).
            log.warning("%s: this machine draws the empty trainable block differently", directory)
        tensors.update(drawn)
        interventions.draw_state = generator_state
    # Checkpoints of format 1 predate sealed blocks, those of format 2 routing: what they lack
    # keeps its empty default (no routing threshold: every block's gates decide alone).
    missing, unexpected = interventions.load_state_dict(tensors, strict=False)
    if segment_ids:
        sealed = SegmentReader(
            Path(segments) if segments else directory / SEGMENTS_DIR, segments_held, interventions.sealed_gates
        ).read()
        for key, value in sealed.items():  # taken as they are: load_state_dict would copy 5 GB again
            module, name = key.rsplit(".", 1)
            setattr(interventions.get_submodule(module), name, value)
        missing = [key for key in missing if key not in sealed]
    if unexpected or any(not key.startswith(("sealed.", "router.", "relations.")) for key in missing):
        raise CheckpointError(
            f"{adapter} does not match its metadata: missing {missing}, unexpected {unexpected}"
        )
    interventions.segment_ids.extend(segment_ids)
    interventions.router.read_last_tokens_only()
    history = [EditRequest.from_dict(r) for r in history_entries]
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
