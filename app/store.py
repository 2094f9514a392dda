"""Adapter checkpoints stored by content hash under DATA_DIR/checkpoints/<sha256>/, sealed blocks
once each under DATA_DIR/checkpoints/segments/ (shared by every version that holds them), with an
in-memory cache of loaded states so that generating from a version costs no disk read.

Durable before the database points at them: every file and directory of a checkpoint is fsynced
before `save` returns, and files found already on disk are reused only after their hash checks.
With CHECKPOINT_STORAGE=database the files also go, content-addressed, into the SQL database that
every replica reaches; the local directory is then a cache, filled from there on a miss."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from safetensors import safe_open
from sqlalchemy.orm import Session, sessionmaker

from baft_core import Editor
from baft_core.checkpoint import (
    ADAPTER_FILE,
    MANIFEST_FILE,
    METADATA_KEY,
    SEGMENTS_DIR,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
)

from . import crud

log = logging.getLogger(__name__)


def _fsync(path: Path) -> None:
    """Flushes a file's or a directory's contents (a directory: the names in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def segment_ids(adapter: Path) -> list[str]:
    """The sealed segments an adapter file lists."""
    with safe_open(adapter, framework="pt") as handle:
        metadata = handle.metadata() or {}
    packed = json.loads(metadata.get(METADATA_KEY, "{}"))
    return json.loads(packed.get("segments", metadata.get("segments", "[]")))


class CheckpointStore:
    def __init__(
        self,
        root: Path,
        base_model: str,
        device,
        cache_size: int = 32,
        cache_bytes: int = 2**30,
        sessions: sessionmaker[Session] | None = None,
    ):
        """`sessions`: store the files in the database too (CHECKPOINT_STORAGE=database)."""
        self.root = Path(root)
        self.segments = self.root / SEGMENTS_DIR
        self.base_model = base_model
        self.device = device
        self.sessions = sessions
        # Adapters grow with their sealed blocks (83 KB an edit by default): bound the cache by
        # bytes as well as by count.
        self.cache_size, self.cache_bytes = cache_size, cache_bytes
        self._cache: OrderedDict[str, Checkpoint] = OrderedDict()
        self._lock = threading.Lock()
        self._durable: set[str] = set()  # segment ids this process hash-checked and fsynced
        self._uploaded: set[str] = set()  # blob ids this process knows the database holds

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def save(self, editor: Editor) -> tuple[str, Path]:
        """Writes the editor's state durably; identical states land in one directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._drop_corrupt_segments(editor.interventions.segment_ids)
        staging = self.root / ".staging" / uuid.uuid4().hex
        manifest = editor.save(staging, base_model=self.base_model, segments=self.segments)
        sha256 = manifest["sha256"]
        self._sync_segments(segment_ids(staging / ADAPTER_FILE))
        for name in (ADAPTER_FILE, MANIFEST_FILE):
            _fsync(staging / name)
        _fsync(staging)
        target = self.path(sha256)
        if self._intact(target, sha256):
            shutil.rmtree(staging)
        else:
            if target.exists():  # torn or corrupt (e.g. written before a power loss): replace it
                log.warning("replacing corrupt checkpoint directory %s", target)
                shutil.rmtree(target)
            try:
                staging.rename(target)
            except OSError:  # another process stored the same state in the meantime
                shutil.rmtree(staging, ignore_errors=True)
                if not self._intact(target, sha256):
                    raise
            _fsync(self.root)
        if self.sessions is not None:
            self._upload(sha256)
        return sha256, target

    def _intact(self, directory: Path, sha256: str) -> bool:
        adapter = directory / ADAPTER_FILE
        return adapter.is_file() and (directory / MANIFEST_FILE).is_file() and _sha256(adapter) == sha256

    def _drop_corrupt_segments(self, ids: list[str]) -> None:
        """baft_core reuses a segment file that exists by its name alone: one whose bytes no
        longer match (torn by a crash) is removed here first, so that the save writes it again."""
        for segment_id in ids:
            if segment_id in self._durable:
                continue
            path = self.segments / f"{segment_id}.safetensors"
            if path.is_file() and _sha256(path) != segment_id:
                log.warning("removing corrupt segment %s", path)
                path.unlink()

    def _sync_segments(self, ids: list[str]) -> None:
        fresh = [i for i in ids if i not in self._durable]
        for segment_id in fresh:
            path = self.segments / f"{segment_id}.safetensors"
            if _sha256(path) != segment_id:
                raise CheckpointError(f"segment {path} does not match its hash after writing")
            _fsync(path)
        if fresh:
            _fsync(self.segments)
            self._durable.update(fresh)

    def _upload(self, sha256: str) -> None:
        adapter = self.path(sha256) / ADAPTER_FILE
        files = [(i, self.segments / f"{i}.safetensors") for i in segment_ids(adapter)] + [(sha256, adapter)]
        with self.sessions() as session:
            for blob_id, path in files:  # segments first: the adapter's blob names them
                if blob_id not in self._uploaded:
                    crud.put_blob(session, blob_id, path.read_bytes())
                    self._uploaded.add(blob_id)

    def _download(self, sha256: str) -> None:
        """Fills the local cache from the database: the adapter, then each segment it lists that
        is missing here or corrupt."""
        with self.sessions() as session:
            data = crud.get_blob(session, sha256)
            if data is None or hashlib.sha256(data).hexdigest() != sha256:
                raise CheckpointError(f"checkpoint {sha256} is not in the database")
            staging = self.root / ".staging" / uuid.uuid4().hex
            staging.mkdir(parents=True)
            _write_durably(staging / ADAPTER_FILE, data)
            # load_checkpoint checks the adapter against the manifest's hash
            manifest = json.dumps({"sha256": sha256, "base_model": self.base_model, "fetched": "database"})
            _write_durably(staging / MANIFEST_FILE, manifest.encode())
            self.segments.mkdir(parents=True, exist_ok=True)
            for segment_id in segment_ids(staging / ADAPTER_FILE):
                path = self.segments / f"{segment_id}.safetensors"
                if path.is_file() and _sha256(path) == segment_id:
                    continue
                blob = crud.get_blob(session, segment_id)
                if blob is None or hashlib.sha256(blob).hexdigest() != segment_id:
                    raise CheckpointError(f"segment {segment_id} is not in the database")
                _write_durably(path, blob)
        target = self.path(sha256)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        _fsync(self.root)
        log.info("fetched checkpoint %s from the database", sha256[:12])

    def size(self, sha256: str) -> int:
        return (self.path(sha256) / ADAPTER_FILE).stat().st_size

    def load(self, sha256: str) -> Checkpoint:
        """The state behind a hash (CheckpointError if missing or corrupt). Callers must not
        modify the returned adapter: the cache shares it."""
        with self._lock:
            if sha256 in self._cache:
                self._cache.move_to_end(sha256)
                return self._cache[sha256]
        try:
            checkpoint = load_checkpoint(self.path(sha256), self.base_model, self.device, self.segments)
        except CheckpointError:
            if self.sessions is None:
                raise
            self._download(sha256)
            checkpoint = load_checkpoint(self.path(sha256), self.base_model, self.device, self.segments)
        checkpoint.interventions.eval()
        self.put(sha256, checkpoint)
        return checkpoint

    def put(self, sha256: str, checkpoint: Checkpoint) -> None:
        with self._lock:
            self._cache[sha256] = checkpoint
            self._cache.move_to_end(sha256)
            while len(self._cache) > 1 and (
                len(self._cache) > self.cache_size
                or sum(4 * c.interventions.num_parameters() for c in self._cache.values()) > self.cache_bytes
            ):
                self._cache.popitem(last=False)
