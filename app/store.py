"""Adapter checkpoints stored by content hash under DATA_DIR/checkpoints/<sha256>/, sealed blocks
once each under DATA_DIR/checkpoints/segments/ (shared by every version that holds them), with an
in-memory cache of loaded states so that generating from a version costs no disk read.

A version's checkpoint names its parent (the checkpoint the trainer's state was loaded from) and
holds only what it adds (baft_core.checkpoint, format 6): storage per version follows the edits
it adds, not all edits before it. Loading one reads its ancestors and their segments.

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

from sqlalchemy.orm import Session, sessionmaker

from baft_core import Editor
from baft_core.checkpoint import (
    ADAPTER_FILE,
    MANIFEST_FILE,
    SEGMENTS_DIR,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_metadata,
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


def _mkdir_durably(path: Path) -> None:
    """Creates a directory and its missing parents, each one's name synced into its parent: a
    directory whose name a power loss can take back takes every checkpoint in it along."""
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        _fsync(directory.parent)


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
    """The sealed segments an adapter file adds to its parent's."""
    return json.loads(read_metadata(adapter).get("segments", "[]"))


def parent_of(adapter: Path) -> str | None:
    """The checkpoint an adapter file extends (None: it holds its whole state)."""
    return read_metadata(adapter).get("parent")


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
        # Adapters grow with their sealed blocks: bound the cache by bytes as well as by count.
        self.cache_size, self.cache_bytes = cache_size, cache_bytes
        self._cache: OrderedDict[str, Checkpoint] = OrderedDict()
        self._lock = threading.Lock()
        # Segment ids this process hash-checked, and knows fsynced: written here, or read for a
        # checkpoint that loaded (nothing points at a checkpoint before its files are fsynced).
        self._durable: set[str] = set()
        self._uploaded: set[str] = set()  # blob ids this process knows the database holds

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def save(self, editor: Editor, parent: str | None = None) -> tuple[str, Path]:
        """Writes the editor's state durably and caches it; identical states land in one
        directory. `parent`: the checkpoint the editor's state was loaded from, which the new
        one then extends (None: a checkpoint that holds the whole state)."""
        _mkdir_durably(self.segments)
        base = self.load(parent) if parent else None
        self._drop_corrupt_segments(editor.interventions.segment_ids)
        staging = self.root / ".staging" / uuid.uuid4().hex
        manifest = editor.save(staging, self.base_model, self.segments, parent=base)
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
        self.put(sha256, Checkpoint(editor.interventions, editor.config, list(editor.history), manifest))
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
        """Puts the checkpoint into the database, with each ancestor the database lacks (saved
        before CHECKPOINT_STORAGE=database), oldest first and each one's segments before it: a
        checkpoint in the database has its whole lineage there."""
        assert self.sessions is not None  # only a store with a database uploads
        with self.sessions() as session:
            missing: list[str] = []
            current: str | None = sha256
            while current is not None and current not in self._uploaded and not crud.has_blob(session, current):
                missing.append(current)
                current = parent_of(self.path(current) / ADAPTER_FILE)
            for blob_id in reversed(missing):
                adapter = self.path(blob_id) / ADAPTER_FILE
                for segment_id in segment_ids(adapter):
                    if segment_id not in self._uploaded:
                        crud.put_blob(session, segment_id, (self.segments / f"{segment_id}.safetensors").read_bytes())
                        self._uploaded.add(segment_id)
                crud.put_blob(session, blob_id, adapter.read_bytes())
                self._uploaded.add(blob_id)

    def _download(self, sha256: str) -> None:
        """Fills the local cache from the database: the checkpoint and each ancestor that is
        missing here or corrupt, and each segment they list that is missing here or corrupt."""
        assert self.sessions is not None  # only a store with a database downloads
        current: str | None = sha256
        with self.sessions() as session:
            while current is not None:
                adapter = self.path(current) / ADAPTER_FILE
                if not (adapter.is_file() and _sha256(adapter) == current):
                    self._fetch(session, current)
                self._fetch_segments(session, segment_ids(adapter))
                current = parent_of(adapter)
        log.info("fetched checkpoint %s from the database", sha256[:12])

    def _fetch(self, session: Session, sha256: str) -> None:
        data = crud.get_blob(session, sha256)
        if data is None or hashlib.sha256(data).hexdigest() != sha256:
            raise CheckpointError(f"checkpoint {sha256} is not in the database")
        _mkdir_durably(self.root)
        staging = self.root / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        _write_durably(staging / ADAPTER_FILE, data)
        # load_checkpoint checks the adapter against the manifest's hash
        manifest = json.dumps({"sha256": sha256, "base_model": self.base_model, "fetched": "database"})
        _write_durably(staging / MANIFEST_FILE, manifest.encode())
        target = self.path(sha256)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        _fsync(self.root)

    def _fetch_segments(self, session: Session, ids: list[str]) -> None:
        _mkdir_durably(self.segments)
        for segment_id in ids:
            path = self.segments / f"{segment_id}.safetensors"
            if path.is_file() and _sha256(path) == segment_id:
                continue
            blob = crud.get_blob(session, segment_id)
            if blob is None or hashlib.sha256(blob).hexdigest() != segment_id:
                raise CheckpointError(f"segment {segment_id} is not in the database")
            _write_durably(path, blob)

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
        with self._lock:  # read and hash-checked: saves need not check them again
            self._durable.update(checkpoint.interventions.segment_ids)
        self.put(sha256, checkpoint)
        return checkpoint

    def put(self, sha256: str, checkpoint: Checkpoint) -> None:
        with self._lock:
            self._cache[sha256] = checkpoint
            self._cache.move_to_end(sha256)
            while len(self._cache) > 1 and (
                len(self._cache) > self.cache_size
                or sum(c.interventions.num_bytes() for c in self._cache.values()) > self.cache_bytes
            ):
                self._cache.popitem(last=False)
