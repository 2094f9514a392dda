"""Adapter checkpoints: safetensors with the state, plus a JSON manifest carrying its sha256.

The safetensors file holds everything that defines the adapter (parameters, running basis usage,
config, base-model identity, the applied edits) and nothing time-dependent, so identical states
give identical bytes and one content hash.

Sealed blocks never change, so each is stored once, as a segment file named by its own sha256
in a segments directory that checkpoints can share: the adapter file lists its segments in
order.

A checkpoint may name a parent (format 6): the checkpoint whose state it extends, found in the
directory beside its own named by the parent's sha256. It then holds only what it adds: the
edits after the parent's, the segments after the parent's, and the tensors that differ from the
parent's. A service keeping one checkpoint per version so stores each version in proportion to
what it adds, not to every edit before it (which grows with the square of the number of edits).
A trainable block that holds no edit (the fresh block after a seal) is stored as the random
generator's state it was drawn from (5 KB, not the block's 500 KB) and drawn again on load. A
segment holds its block's sealed rows (`blocks.SealedBases`) and route keys, about 123 KiB with the
defaults."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save, save_file

from .attach import InterventionSet
from .blocks import GATE_ROWS
from .config import EditConfig
from .data import EditRequest
from .relations import quantized
from .routing import UNLIMITED

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
FORMAT_VERSION = 12
SEGMENTS_DIR = "segments"
_SEALED_ROWS = ("rotation", "change_weight", "gate_weight", "change_bias", "gate_bias")
_ROUTE_KEYS, _KEY_THRESHOLD, _KEY_BLOCK = "router.keys", "router.key_threshold", "router.key_block"
_KEY_EDIT, _BLOCK_SPAN = "router.key_edit", "router.block_span"
_KEY_TOKENS, _KEY_PREFIX, _PREFIXES = "router.key_tokens", "router.key_prefix", "router.prefixes"
_KEY_SPELLING, _SPELLINGS = "router.key_spelling", "router.spellings"
_RELATION_KEYS, _RELATION_KEY_BLOCK = "relations.keys", "relations.key_block"
_RELATION_PROBES, _PROBE_BLOCK = "relations.probes", "relations.probe_block"
_RELATION_KEY_SCALE, _PROBE_SCALE = "relations.key_scale", "relations.probe_scale"
# A segment's int8 relation states and the tensor of their scales (one a row).
_SEGMENT_SCALES = {"relation_keys": "relation_key_scales", "relation_probes": "relation_probe_scales"}
_DRAW_STATE = "draw.generator_state"  # the trainable block's draw, in place of its parameters


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or made for another base model."""


@dataclass
class Checkpoint:
    interventions: InterventionSet
    config: EditConfig
    history: list[EditRequest]
    manifest: dict  # as saved; "sha256" names the adapter file (and the checkpoint)


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


def _read(path: Path, what: str) -> bytearray:
    """A file's bytes, writable (tensors are views of them). CheckpointError if missing."""
    try:
        with open(path, "rb") as handle:
            data = bytearray(os.fstat(handle.fileno()).st_size)
            handle.readinto(data)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    return data


def _read_verified(path: Path, sha256: str, what: str) -> bytearray:
    data = _read(path, what)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{what} {path} is corrupt: its sha256 does not match its name")
    return data


# Reading 10,000 segments places about 200,000 small pieces: numpy does each in well under a
# microsecond, where a torch view, copy or conversion costs several (and torch runs a copy above
# its grain size on its intra-op threads, each waiting for a core where other processes keep them
# busy). So segments are read as numpy arrays, bfloat16 (which numpy lacks) as its int16 bits,
# and become tensors once, joined.
_NUMPY = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass
class _Piece:
    """A tensor of a segment as numpy holds it: `values`, bfloat16 as int16 bits (`bf16`)."""

    values: np.ndarray
    bf16: bool = False

    def tensor(self) -> torch.Tensor:
        tensor = torch.from_numpy(self.values)
        return tensor.view(torch.bfloat16) if self.bf16 else tensor

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _Piece:
        bf16 = tensor.dtype == torch.bfloat16
        return cls((tensor.view(torch.int16) if bf16 else tensor).numpy(), bf16)


def _pieces(data: bytearray, path: Path) -> tuple[dict, dict[str, _Piece]]:
    """The metadata and tensors of a safetensors file read into memory, the tensors as views of
    `data`: reading 10,000 segments, a parser that copies each tensor costs a copy of them all."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + size]))
        metadata = header.pop("__metadata__", None) or {}
        pieces = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = np.dtype(_NUMPY[info["dtype"]])
            values = np.frombuffer(data, dtype, (end - begin) // dtype.itemsize, 8 + size + begin)
            pieces[name] = _Piece(values.reshape(info["shape"]), info["dtype"] == "BF16")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    return metadata, pieces


def _parse(data: bytearray, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """`_pieces` as tensors, the metadata unpacked."""
    metadata, pieces = _pieces(data, path)
    if METADATA_KEY in metadata:  # else the earlier layout, one metadata entry per field
        metadata = json.loads(metadata[METADATA_KEY])
    return metadata, {name: piece.tensor() for name, piece in pieces.items()}


def read_metadata(path: str | Path) -> dict:
    """An adapter file's metadata: "history" and "segments" (JSON lists) are what it adds to its
    "parent" (a sha256, absent for a checkpoint that holds its whole state)."""
    path = Path(path)
    return _parse(_read(path, "adapter"), path)[0]


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
    tensors["answer_span"] = router.block_span[block : block + 1].detach().cpu().contiguous()
    return save(tensors)


def _write_segments(
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
        _atomic_write(segments / f"{segment_id}.safetensors", lambda tmp, data=data: Path(tmp).write_bytes(data))
        checksums[segment_id] = zlib.crc32(data)
        # A block loaded from an older format serialises otherwise now: it takes the new id.
        ids[block : block + 1] = [segment_id]
    return list(ids), checksums


def _as_changes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sealed rows as format 8 holds them: those of older formats held A ("source_weight") and b
    ("source_bias") where format 8 holds C = A - R and b ("change_weight", "change_bias")."""
    for key in [k for k in tensors if k.endswith(".source_weight")]:
        prefix = key.removesuffix("source_weight")
        tensors[prefix + "change_weight"] = tensors.pop(key) - tensors[prefix + "rotation"]
        tensors[prefix + "change_bias"] = tensors.pop(prefix + "source_bias")
    return tensors


def _checksum(segments: Path, segment_id: str, written: dict[str, int]) -> int:
    """A segment's CRC-32, from bytes that match its sha256."""
    if segment_id not in written:
        path = segments / f"{segment_id}.safetensors"
        written[segment_id] = zlib.crc32(_read_verified(path, segment_id, "segment"))
    return written[segment_id]


def _as_torch(pieces: dict[str, _Piece], convert) -> dict[str, _Piece]:
    """`convert` (a function of torch tensors, for older formats) applied to `pieces`."""
    return {name: _Piece.of(value) for name, value in convert({k: p.tensor() for k, p in pieces.items()}).items()}


_OWN_PIECES = (  # a segment's pieces that are its own block's (the rest: its sealed rows)
    "route_keys", "route_thresholds", "route_key_edits", "route_key_tokens", "route_key_prefixes",
    "route_prefixes", "route_key_spellings", "route_spellings",
    "relation_keys", "relation_key_scales", "relation_probes", "relation_probe_scales",
)
# Of each piece's rows, the block they belong to: under that column's name.
_BLOCK_OF = {"route_keys": "route_key_blocks", "relation_keys": "relation_key_blocks", "relation_probes": "relation_probe_blocks"}
# The state key each column loads as.
_STATE_KEYS = {
    "route_keys": _ROUTE_KEYS, "route_key_blocks": _KEY_BLOCK, "route_thresholds": _KEY_THRESHOLD,
    "route_key_edits": _KEY_EDIT, "answer_span": _BLOCK_SPAN, "route_key_tokens": _KEY_TOKENS,
    "route_key_prefixes": _KEY_PREFIX, "route_prefixes": _PREFIXES,
    "route_key_spellings": _KEY_SPELLING, "route_spellings": _SPELLINGS,
    "relation_keys": _RELATION_KEYS, "relation_key_blocks": _RELATION_KEY_BLOCK, "relation_key_scales": _RELATION_KEY_SCALE,
    "relation_probes": _RELATION_PROBES, "relation_probe_blocks": _PROBE_BLOCK, "relation_probe_scales": _PROBE_SCALE,
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

    def append(self, piece: _Piece, path: Path) -> None:
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
        return _Piece(self.values[: self.count], self.bf16).tensor()


class _SegmentReader:
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
            data = _read(path, "segment")
            if checksum is not None:
                intact = zlib.crc32(data) == checksum
            else:
                intact = hashlib.sha256(data).hexdigest() == segment_id
            if not intact:
                raise CheckpointError(f"segment {path} is corrupt: its checksum does not match")
            read.append((path, data))
        return read

    def _append_own(self, block: int, own: dict[str, _Piece], path: Path) -> None:
        """Appends the block's route keys (with their thresholds, edits, token counts, earlier
        tokens and spellings), relation states and answer window to theirs."""
        columns = self.columns
        for name, scales in _SEGMENT_SCALES.items():
            if name in own and own[name].values.dtype.kind == "f":  # format 10: fp16 unit rows
                rows, scale = quantized(own[name].tensor())
                own[name], own[scales] = _Piece.of(rows), _Piece.of(scale)
        if "route_keys" in own:
            self.all_keys_read_tokens &= "route_key_tokens" in own
            for index, indexed in self._INDEXED.items():
                # Each key's row of the segment's `indexed` rows, or -1 (also for every key of a
                # segment without them), made a row of the joined ones.
                local = own.pop(index).values if index in own else np.full(len(own["route_keys"].values), -1)
                columns[index].append(_Piece(np.where(local >= 0, local + columns[indexed].count, -1)), path)
        for name, piece in own.items():
            columns[name].append(piece, path)
        for name, blocks in _BLOCK_OF.items():
            if name in own:
                columns[blocks].append(_Piece(np.full(len(own[name].values), block, dtype=np.int64)), path)

    def _place(self, block: int, path: Path, data: bytearray) -> None:
        """Copies the block's sealed rows into place and appends the rest to their columns."""
        pieces = _pieces(data, path)[1]
        names = {key.split(".", 1)[-1] for key in pieces}
        if "source_weight" in names:
            pieces = _as_torch(pieces, _as_changes)
        if not self.gates and not names.isdisjoint(GATE_ROWS):
            pieces = {k: v for k, v in pieces.items() if k.split(".", 1)[-1] not in GATE_ROWS}
        own = {name: pieces.pop(name) for name in _OWN_PIECES if name in pieces}
        own["answer_span"] = pieces.pop("answer_span") if "answer_span" in pieces else _Piece(np.array([UNLIMITED]))
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


def _block_rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's keys' rows of a shared buffer (`index`, -1: none): the rows they read, sorted,
    and each key's place among them (-1: none), as its segment stores them."""
    rows = index[index >= 0].unique()
    return rows, torch.where(index >= 0, torch.searchsorted(rows, index), -1)


def _own_state(interventions: InterventionSet) -> dict[str, torch.Tensor]:
    """The state an adapter file holds: all but the sealed blocks' (their segments hold those)."""
    sealed = {_sealed_key(layer, n) for layer in interventions.layers for n in _SEALED_ROWS}
    sealed |= {_ROUTE_KEYS, _KEY_THRESHOLD, _KEY_BLOCK, _KEY_EDIT, _BLOCK_SPAN, _KEY_TOKENS, _KEY_PREFIX, _PREFIXES}
    sealed |= {_KEY_SPELLING, _SPELLINGS}
    sealed |= {_RELATION_KEYS, _RELATION_KEY_BLOCK, _RELATION_KEY_SCALE, _RELATION_PROBES, _PROBE_BLOCK, _PROBE_SCALE}
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
    segment_ids, written = _write_segments(interventions, segments, known)
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
    metadata["segment_crc32"] = json.dumps([_checksum(segments, i, written) for i in own_segments])
    adapter = directory / ADAPTER_FILE
    packed = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    _atomic_write(adapter, lambda tmp: save_file(tensors, tmp, metadata=packed))
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
    _atomic_write(directory / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return manifest


def _lineage(directory: Path, metadata: dict, tensors: dict) -> Iterator[tuple[dict, dict[str, torch.Tensor]]]:
    """The checkpoint's own (metadata, tensors), then each ancestor's, newest first, each
    ancestor's file hash-checked against the name its child gives it."""
    yield metadata, tensors
    while parent := metadata.get("parent"):
        path = directory.parent / parent / ADAPTER_FILE
        metadata, tensors = _parse(_read_verified(path, parent, "parent checkpoint"), path)
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
    data = _read(adapter, "adapter")
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
        relation_layer=int(metadata.get("relation_layer", routing_layer)),
        relation_threshold=config.relation_threshold if config.block_edits and config.route_threshold else 0.0,
        relation_margin=config.relation_margin,
    )
    tensors, draw, history_entries, segments_held = _fold(directory, metadata, tensors, _drawn_keys(interventions))
    tensors = _as_changes(tensors)
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
        sealed = _SegmentReader(
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
