"""Safetensors files as checkpoints read and write them: read whole into memory (tensors are views
of the bytes), checked against their hashes, and replaced atomically."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or made for another base model."""



def atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_bytes(path: Path, what: str) -> bytearray:
    """A file's bytes, writable (tensors are views of them). CheckpointError if missing."""
    try:
        with open(path, "rb") as handle:
            data = bytearray(os.fstat(handle.fileno()).st_size)
            handle.readinto(data)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    return data


def read_verified(path: Path, sha256: str, what: str) -> bytearray:
    data = read_bytes(path, what)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{what} {path} is corrupt: its sha256 does not match its name")
    return data


# Reading 10,000 segments places about 200,000 small pieces: numpy does each in well under a
# microsecond, where a torch view, copy or conversion costs several (and torch runs a copy above
# its grain size on its intra-op threads, each waiting for a core where other processes keep them
# busy). So segments are read as numpy arrays, bfloat16 (which numpy lacks) as its int16 bits,
# and become tensors once, joined.
NUMPY_TYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass
class Piece:
    """A tensor of a segment as numpy holds it: `values`, bfloat16 as int16 bits (`bf16`)."""

    values: np.ndarray
    bf16: bool = False

    def tensor(self) -> torch.Tensor:
        tensor = torch.from_numpy(self.values)
        return tensor.view(torch.bfloat16) if self.bf16 else tensor

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Piece:
        bf16 = tensor.dtype == torch.bfloat16
        return cls((tensor.view(torch.int16) if bf16 else tensor).numpy(), bf16)


def read_pieces(data: bytearray, path: Path) -> tuple[dict, dict[str, Piece]]:
    """The metadata and tensors of a safetensors file read into memory, the tensors as views of
    `data`: reading 10,000 segments, a parser that copies each tensor costs a copy of them all."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + size]))
        metadata = header.pop("__metadata__", None) or {}
        pieces = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = np.dtype(NUMPY_TYPES[info["dtype"]])
            values = np.frombuffer(data, dtype, (end - begin) // dtype.itemsize, 8 + size + begin)
            pieces[name] = Piece(values.reshape(info["shape"]), info["dtype"] == "BF16")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    return metadata, pieces
