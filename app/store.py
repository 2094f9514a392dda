"""Adapter checkpoints stored by content hash under DATA_DIR/checkpoints/<sha256>/, sealed blocks
once each under DATA_DIR/checkpoints/segments/ (shared by every version that holds them), with an
in-memory cache of loaded states so that generating from a version costs no disk read."""
from __future__ import annotations

import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from baft_core import Editor
from baft_core.checkpoint import ADAPTER_FILE, SEGMENTS_DIR, Checkpoint, load_checkpoint


class CheckpointStore:
    def __init__(self, root: Path, base_model: str, device, cache_size: int = 32, cache_bytes: int = 2**30):
        self.root = Path(root)
        self.segments = self.root / SEGMENTS_DIR
        self.base_model = base_model
        self.device = device
        # Adapters grow with their sealed blocks (83 KB an edit by default): bound the cache by
        # bytes as well as by count.
        self.cache_size, self.cache_bytes = cache_size, cache_bytes
        self._cache: OrderedDict[str, Checkpoint] = OrderedDict()
        self._lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def save(self, editor: Editor) -> tuple[str, Path]:
        """Writes the editor's state; identical states land in one directory."""
        staging = self.root / ".staging" / uuid.uuid4().hex
        manifest = editor.save(staging, base_model=self.base_model, segments=self.segments)
        target = self.path(manifest["sha256"])
        if target.exists():
            shutil.rmtree(staging)
        else:
            try:
                staging.rename(target)
            except OSError:  # another process stored the same state in the meantime
                shutil.rmtree(staging, ignore_errors=True)
                if not target.exists():
                    raise
        return manifest["sha256"], target

    def size(self, sha256: str) -> int:
        return (self.path(sha256) / ADAPTER_FILE).stat().st_size

    def load(self, sha256: str) -> Checkpoint:
        """The state behind a hash (CheckpointError if missing or corrupt). Callers must not
        modify the returned adapter: the cache shares it."""
        with self._lock:
            if sha256 in self._cache:
                self._cache.move_to_end(sha256)
                return self._cache[sha256]
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
