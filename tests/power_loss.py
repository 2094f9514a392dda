"""A power loss, simulated: what a directory tree may hold after the machine loses power at any
point of a run of file operations, under POSIX's promise and no more.

While it records, every `os.fsync` of the process is a crash point: the tree as it stands just
before the call is snapshot (each name with its inode, each file's bytes), then the call's own
promise is noted (a file's bytes, or a directory's names, are on the disk from then on). A crash
at point k may leave any mix of what was promised before k and what the tree held at k. Three
states bound that mix, and each is materialised as a real directory to open as a fresh process:

- `synced`: only what was promised; a name whose directory was never synced since it appeared is
  gone, a file never synced is empty.
- `names_only`: every name as it stood at k, but each file holds only its synced bytes (empty if
  none): the reordering that breaks "write, then rename into place" without an fsync between.
- `everything`: the tree exactly as it stood at k.

Inodes identify files and directories across renames (a renamed file keeps its promised bytes).
What existed before recording began counts as promised. Databases are outside the model: their
commits are points in the caller's sequence."""
from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

STATES = ("synced", "names_only", "everything")


@dataclass
class Snapshot:
    """A tree as it stood: each directory's names (name -> inode) and each file's bytes, by inode."""

    root: int
    listings: dict[int, dict[str, int]] = field(default_factory=dict)
    contents: dict[int, bytes] = field(default_factory=dict)


def snapshot(root: Path) -> Snapshot:
    taken = Snapshot(root=os.stat(root).st_ino)
    for directory, names, files in os.walk(root):
        listing: dict[str, int] = {}
        for name in [*names, *files]:
            info = os.lstat(os.path.join(directory, name))
            listing[name] = info.st_ino
            if stat.S_ISREG(info.st_mode):
                taken.contents[info.st_ino] = Path(directory, name).read_bytes()
        taken.listings[os.stat(directory).st_ino] = listing
    return taken


class PowerLoss:
    """Records the crash points of the file operations under `root` run inside `recording()`."""

    def __init__(self, root: Path):
        self.root = root
        before = snapshot(root)
        # What is on the disk for sure at the current point: directory names and file bytes.
        self._listings = dict(before.listings)
        self._contents = dict(before.contents)
        # (tree at the point, what was promised before it) for each crash point
        self.points: list[tuple[Snapshot, dict[int, dict[str, int]], dict[int, bytes]]] = []

    def recording(self, monkeypatch) -> None:
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if path == self.root or self.root in path.parents:
                self.crash_point()
                info = os.fstat(fd)
                if stat.S_ISDIR(info.st_mode):
                    self._listings[info.st_ino] = {e.name: e.inode() for e in os.scandir(path)}
                else:
                    self._contents[info.st_ino] = path.read_bytes()
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def crash_point(self) -> None:
        """Marks a crash point (each fsync does; call it at the end of a step too)."""
        self.points.append((snapshot(self.root), dict(self._listings), dict(self._contents)))

    def materialise(self, point: int, state: str, target: Path) -> Path:
        """Writes what the tree may hold after a crash at `point` in `state` (`STATES`) under
        `target`, and returns it."""
        tree, listings, contents = self.points[point]
        if state == "everything":
            listings, contents = tree.listings, tree.contents
        elif state == "names_only":
            listings = tree.listings

        def write(directory: Path, inode: int, seen: frozenset[int]) -> None:
            directory.mkdir(parents=True, exist_ok=True)
            for name, child in listings.get(inode, {}).items():
                if child in tree.listings or child in listings:  # a directory
                    if child not in seen:
                        write(directory / name, child, seen | {child})
                else:
                    (directory / name).write_bytes(contents.get(child, b""))

        if target.exists():
            shutil.rmtree(target)
        write(target, tree.root, frozenset({tree.root}))
        return target
