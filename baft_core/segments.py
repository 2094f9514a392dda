"""Segment files: a sealed block's rows at every layer, its route keys, relation states and answer
window, stored once in a directory that checkpoints share and named by its own sha256
(`write_segments`), and read back for a whole history into arrays sized for all blocks
(`SegmentReader`)."""
from __future__ import annotations

import hashlib
import os
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from .attach import InterventionSet
from .blocks import GATE_ROWS
from .relations import quantized
from .routing import UNLIMITED
from .tensor_files import CheckpointError, Piece, atomic_write, read_bytes, read_pieces, read_verified

_SEALED_ROWS = ("rotation", "change_weight", "gate_weight", "change_bias", "gate_bias")
_ROUTE_KEYS, _KEY_THRESHOLD, _KEY_BLOCK = "router.keys", "router.key_threshold", "router.key_block"
_KEY_EDIT, _BLOCK_SPAN = "router.key_edit", "router.block_span"
_KEY_TOKENS, _KEY_PREFIX, _PREFIXES = "router.key_tokens", "router.key_prefix", "router.prefixes"
_KEY_SPELLING, _SPELLINGS = "router.key_spelling", "router.spellings"
_RELATION_KEYS, _RELATION_KEY_BLOCK = "relations.keys", "relations.key_block"
_RELATION_PROBES, _PROBE_BLOCK = "relations.probes", "relations.probe_block"
_RELATION_KEY_SCALE, _PROBE_SCALE = "relations.key_scale", "relations.probe_scale"
_RELATION_SUBJECTS, _SUBJECT_BLOCK = "relations.subjects", "relations.subject_block"
# A segment's int8 relation states and the tensor of their scales (one a row).
_SEGMENT_SCALES = {"relation_keys": "relation_key_scales", "relation_probes": "relation_probe_scales"}


def _sealed_key(layer: int, name: str) -> str:
    return f"sealed.{layer}.{name}"


def _segment_bytes(interventions: InterventionSet, block: int) -> bytes:
    """One sealed block's rows at every layer, serialised deterministically."""
    rows = slice(block * interventions.sealed_rank, (block + 1) * interventions.sealed_rank)
    tensors = {
        f"{layer}.{name}": getattr(interventions.sealed[str(layer)], name)[rows].detach().cpu().contiguous()
        for layer in interventions.layers
        for name in _SEALED_ROWS
        if interventions.sealed_gates or name not in GATE_ROWS
    }
    router = interventions.router
    own = router.key_block == block
    if own.any():
        tensors["route_keys"] = router.keys[own].detach().cpu().contiguous()
        tensors["route_thresholds"] = router.key_threshold[own].detach().cpu().contiguous()
        tensors["route_key_edits"] = router.key_edit[own].detach().cpu().contiguous()
        tensors["route_key_tokens"] = router.key_tokens[own].detach().cpu().contiguous()
        prefix_rows, local = _block_rows(router.key_prefix[own])
        tensors["route_key_prefixes"] = local.detach().cpu().contiguous()
        tensors["route_prefixes"] = router.prefixes[prefix_rows].detach().cpu().contiguous()
        spelling_rows, local = _block_rows(router.key_spelling[own])
        if len(spelling_rows):
            tensors["route_key_spellings"] = local.detach().cpu().contiguous()
            tensors["route_spellings"] = router.spellings[spelling_rows].detach().cpu().contiguous()
    relations = interventions.relations
    if (relations.probe_block == block).any():
        keys, probes = relations.key_block == block, relations.probe_block == block
        tensors["relation_keys"] = relations.keys[keys].detach().cpu().contiguous()
        tensors["relation_key_scales"] = relations.key_scale[keys].detach().cpu().contiguous()
        tensors["relation_probes"] = relations.probes[probes].detach().cpu().contiguous()
        tensors["relation_probe_scales"] = relations.probe_scale[probes].detach().cpu().contiguous()
        subjects = relations.subject_block == block
        if subjects.any():
            tensors["relation_subjects"] = relations.subjects[subjects].detach().cpu().contiguous()
    tensors["answer_span"] = router.block_span[block : block + 1].detach().cpu().contiguous()
    return save(tensors)


def write_segments(
    interventions: InterventionSet, segments: Path, start: int = 0
) -> tuple[list[str], dict[str, int]]:
    """Stores the sealed blocks from `start` on that `segments` lacks; returns every block's
    segment id (sha256), and the CRC-32 of those it wrote. Ids already computed are kept on the
    adapter, so a save serialises and hashes only new blocks (and blocks whose file this
    directory lacks)."""
    ids, checksums = interventions.segment_ids, {}
    del ids[interventions.sealed_blocks :]  # a restored, shorter state keeps only its own
    segments.mkdir(parents=True, exist_ok=True)
    for block in range(min(start, len(ids)), interventions.sealed_blocks):
        path = segments / f"{ids[block]}.safetensors" if block < len(ids) else None
        if path is not None and path.exists():
            continue
        data = _segment_bytes(interventions, block)
        segment_id = hashlib.sha256(data).hexdigest()
        atomic_write(segments / f"{segment_id}.safetensors", lambda tmp, data=data: Path(tmp).write_bytes(data))
        checksums[segment_id] = zlib.crc32(data)
        # A block loaded from an older format serialises otherwise now: it takes the new id.
        ids[block : block + 1] = [segment_id]
    return list(ids), checksums


def as_changes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sealed rows as format 8 holds them: those of older formats held A ("source_weight") and b
    ("source_bias") where format 8 holds C = A - R and b ("change_weight", "change_bias")."""
    for key in [k for k in tensors if k.endswith(".source_weight")]:
        prefix = key.removesuffix("source_weight")
        tensors[prefix + "change_weight"] = tensors.pop(key) - tensors[prefix + "rotation"]
        tensors[prefix + "change_bias"] = tensors.pop(prefix + "source_bias")
    return tensors


def segment_checksum(segments: Path, segment_id: str, written: dict[str, int]) -> int:
    """A segment's CRC-32, from bytes that match its sha256."""
    if segment_id not in written:
        path = segments / f"{segment_id}.safetensors"
        written[segment_id] = zlib.crc32(read_verified(path, segment_id, "segment"))
    return written[segment_id]


def _as_torch(pieces: dict[str, Piece], convert) -> dict[str, Piece]:
    """`convert` (a function of torch tensors, for older formats) applied to `pieces`."""
    return {name: Piece.of(value) for name, value in convert({k: p.tensor() for k, p in pieces.items()}).items()}


_OWN_PIECES = (  # a segment's pieces that are its own block's (the rest: its sealed rows)
    "route_keys", "route_thresholds", "route_key_edits", "route_key_tokens", "route_key_prefixes",
    "route_prefixes", "route_key_spellings", "route_spellings",
    "relation_keys", "relation_key_scales", "relation_probes", "relation_probe_scales", "relation_subjects",
)
# Of each piece's rows, the block they belong to: under that column's name.
_BLOCK_OF = {
    "route_keys": "route_key_blocks", "relation_keys": "relation_key_blocks", "relation_probes": "relation_probe_blocks",
    "relation_subjects": "relation_subject_blocks",
}
# The state key each column loads as.
_STATE_KEYS = {
    "route_keys": _ROUTE_KEYS, "route_key_blocks": _KEY_BLOCK, "route_thresholds": _KEY_THRESHOLD,
    "route_key_edits": _KEY_EDIT, "answer_span": _BLOCK_SPAN, "route_key_tokens": _KEY_TOKENS,
    "route_key_prefixes": _KEY_PREFIX, "route_prefixes": _PREFIXES,
    "route_key_spellings": _KEY_SPELLING, "route_spellings": _SPELLINGS,
    "relation_keys": _RELATION_KEYS, "relation_key_blocks": _RELATION_KEY_BLOCK, "relation_key_scales": _RELATION_KEY_SCALE,
    "relation_probes": _RELATION_PROBES, "relation_probe_blocks": _PROBE_BLOCK, "relation_probe_scales": _PROBE_SCALE,
    "relation_subjects": _RELATION_SUBJECTS, "relation_subject_blocks": _SUBJECT_BLOCK,
}


class _Column:
    """One tensor's rows from every block, in block order, copied into one array as each block
    is read: a copy each, where copying each piece and joining them at the end made two (and
    touched twice the fresh pages). The array reserves room it may not fill; untouched room
    costs address space, not memory."""

    def __init__(self, reserve: int):
        self.reserve = reserve  # rows to make room for at the first piece, in pieces of its size
        self.values: np.ndarray | None = None
        self.bf16 = False
        self.count = 0  # rows filled

    def append(self, piece: Piece, path: Path) -> None:
        rows = piece.values
        if self.values is None:
            self.values = np.empty((self.reserve * max(len(rows), 1), *rows.shape[1:]), rows.dtype)
            self.bf16 = piece.bf16
        if rows.shape[1:] != self.values.shape[1:] or rows.dtype != self.values.dtype or piece.bf16 != self.bf16:
            raise CheckpointError(f"segment {path} holds pieces of another shape or type than the first segment's")
        if self.count + len(rows) > len(self.values):
            grown = np.empty((max(2 * len(self.values), self.count + len(rows)), *rows.shape[1:]), rows.dtype)
            grown[: self.count] = self.values[: self.count]
            self.values = grown
        self.values[self.count : self.count + len(rows)] = rows
        self.count += len(rows)

    def tensor(self) -> torch.Tensor:
        assert self.values is not None
        return Piece(self.values[: self.count], self.bf16).tensor()


class SegmentReader:
    """Reads segments into arrays sized for all blocks: each segment's sealed rows (every segment
    holds the same rows, a block's share of each) into place, its route keys and relation states
    appended to theirs (`_Column`). Threads read and check several files at once (reading and
    checksums release the GIL); the calling thread copies their pieces into place."""

    SEGMENTS_PER_TASK = 32
    # Tasks read ahead of the one being placed, at most: bounds the bytes held in flight.
    TASKS_AHEAD = 8
    # Indices into rows of a segment's own, made global as they are appended (`_keyed_rows`).
    _INDEXED = {"route_key_prefixes": "route_prefixes", "route_key_spellings": "route_spellings"}

    def __init__(self, segments: Path, held: list[tuple[str, int | None]], gates: bool):
        """`held`: each segment's id and CRC-32 (None: check its sha256). `gates`: keep the
        blocks' gate rows (segments written before ungated blocks dropped them still hold them)."""
        self.segments, self.held, self.gates = segments, held, gates
        self.rows: dict[str, np.ndarray] = {}
        # Held as `SealedBases` holds them: ungated rows in fp16, whatever a segment holds.
        self.row_dtype = np.float32 if gates else np.float16
        # Room for twice the first block's rows in every block: few histories need to grow.
        self.columns = {name: _Column(2 * len(held)) for name in (*_OWN_PIECES, "answer_span", *_BLOCK_OF.values())}
        self.all_keys_read_tokens = True  # every keyed block holds its keys' token counts (format 9)

    def _checked_bytes(self, blocks: range) -> list[tuple[Path, bytearray]]:
        """The blocks' segment files, each checked against its CRC-32 or sha256 (in a reading
        thread)."""
        read = []
        for block in blocks:
            segment_id, checksum = self.held[block]
            path = self.segments / f"{segment_id}.safetensors"
            data = read_bytes(path, "segment")
            if checksum is not None:
                intact = zlib.crc32(data) == checksum
            else:
                intact = hashlib.sha256(data).hexdigest() == segment_id
            if not intact:
                raise CheckpointError(f"segment {path} is corrupt: its checksum does not match")
            read.append((path, data))
        return read

    def _append_own(self, block: int, own: dict[str, Piece], path: Path) -> None:
        """Appends the block's route keys (with their thresholds, edits, token counts, earlier
        tokens and spellings), relation states and answer window to theirs."""
        columns = self.columns
        for name, scales in _SEGMENT_SCALES.items():
            if name in own and own[name].values.dtype.kind == "f":  # format 10: fp16 unit rows
                rows, scale = quantized(own[name].tensor())
                own[name], own[scales] = Piece.of(rows), Piece.of(scale)
        if "route_keys" in own:
            self.all_keys_read_tokens &= "route_key_tokens" in own
            for index, indexed in self._INDEXED.items():
                # Each key's row of the segment's `indexed` rows, or -1 (also for every key of a
                # segment without them), made a row of the joined ones.
                local = own.pop(index).values if index in own else np.full(len(own["route_keys"].values), -1)
                columns[index].append(Piece(np.where(local >= 0, local + columns[indexed].count, -1)), path)
        for name, piece in own.items():
            columns[name].append(piece, path)
        for name, blocks in _BLOCK_OF.items():
            if name in own:
                columns[blocks].append(Piece(np.full(len(own[name].values), block, dtype=np.int64)), path)

    def _place(self, block: int, path: Path, data: bytearray) -> None:
        """Copies the block's sealed rows into place and appends the rest to their columns."""
        pieces = read_pieces(data, path)[1]
        names = {key.split(".", 1)[-1] for key in pieces}
        if "source_weight" in names:
            pieces = _as_torch(pieces, as_changes)
        if not self.gates and not names.isdisjoint(GATE_ROWS):
            pieces = {k: v for k, v in pieces.items() if k.split(".", 1)[-1] not in GATE_ROWS}
        own = {name: pieces.pop(name) for name in _OWN_PIECES if name in pieces}
        own["answer_span"] = pieces.pop("answer_span") if "answer_span" in pieces else Piece(np.array([UNLIMITED]))
        self._append_own(block, own, path)
        if block == 0:
            for key, piece in pieces.items():
                layer, name = key.split(".", 1)
                shape = (len(self.held) * len(piece.values), *piece.values.shape[1:])
                self.rows[_sealed_key(int(layer), name)] = np.empty(shape, self.row_dtype)
        if len(pieces) != len(self.rows):
            raise CheckpointError(f"segment {path} holds other rows than the first segment")
        for key, piece in pieces.items():
            layer, name = key.split(".", 1)
            target = self.rows.get(_sealed_key(int(layer), name))
            step = 0 if target is None else len(target) // len(self.held)
            if target is None or piece.values.shape != (step, *target.shape[1:]) or piece.values.dtype.kind != "f":
                raise CheckpointError(f"segment {path}: {key} does not match the first segment's")
            values = piece.tensor().to(torch.float32).numpy() if piece.bf16 else piece.values
            target[block * step : (block + 1) * step] = values

    def read(self) -> dict[str, torch.Tensor]:
        """The sealed rows of every layer, the route keys with their blocks and each block's
        answer window, in block order, each segment checked against its CRC-32 or sha256."""
        placed = 0

        def place(read: list[tuple[Path, bytearray]]) -> None:
            nonlocal placed
            for path, data in read:
                self._place(placed, path, data)  # block 0 sizes the rows
                placed += 1

        tasks = [range(s, min(s + self.SEGMENTS_PER_TASK, len(self.held))) for s in range(0, len(self.held), self.SEGMENTS_PER_TASK)]
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            pending: deque[Future] = deque()
            for task in tasks:
                pending.append(pool.submit(self._checked_bytes, task))
                if len(pending) > self.TASKS_AHEAD:
                    place(pending.popleft().result())
            while pending:
                place(pending.popleft().result())
        state = {key: torch.from_numpy(values) for key, values in self.rows.items()}
        for name, key in _STATE_KEYS.items():
            column = self.columns[name]
            if column.values is None:
                continue
            if name in ("route_key_tokens", "route_key_prefixes", "route_prefixes") and not self.all_keys_read_tokens:
                continue  # keys before format 9 read their last token alone: the router's default
            state[key] = column.tensor()
        return state


def segment_state_keys(layers: list[int]) -> set[str]:
    """The adapter's state keys that segments hold (an adapter file holds the rest)."""
    keys = {_sealed_key(layer, name) for layer in layers for name in _SEALED_ROWS}
    return keys | set(_STATE_KEYS.values())


def _block_rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's keys' rows of a shared buffer (`index`, -1: none): the rows they read, sorted,
    and each key's place among them (-1: none), as its segment stores them."""
    rows = index[index >= 0].unique()
    return rows, torch.where(index >= 0, torch.searchsorted(rows, index), -1)
