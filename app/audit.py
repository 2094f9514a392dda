"""`python -m app audit`: checks the history against its invariants and prints what it found.

- the versions form one chain from the base to the head (no version has two children);
- every applied edit is in exactly one version, edits are applied in acceptance (id) order, and
  each restore sits between the edits accepted before it and those accepted after;
- each version's checkpoint holds exactly the edits its rows say (its stored history equals the
  requests of the edits its lineage adds, in order), and its edit_count says as many. A checkpoint
  that extends a parent must extend its parent version's: what it adds is checked against that
  version's own edits, the rest where the parent version was checked."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from baft_core.checkpoint import ADAPTER_FILE, read_metadata

from . import crud
from .models import Edit, Restore, Version


def _stored(session: Session, checkpoints_dir: Path, sha256: str) -> tuple[list[dict], str | None]:
    """The edits a checkpoint adds and the parent it adds them to (None: it holds them all)."""
    path = checkpoints_dir / sha256 / ADAPTER_FILE
    if not path.is_file():  # another replica's local store: read the blob
        data = crud.get_blob(session, sha256)
        if data is None:
            raise FileNotFoundError(f"checkpoint {sha256} is neither at {path} nor in the database")
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
            handle.write(data)
            handle.flush()
            metadata = read_metadata(handle.name)
    else:
        metadata = read_metadata(path)
    return json.loads(metadata["history"]), metadata.get("parent")


def audit(session: Session, checkpoints_dir: Path) -> dict[str, Any]:
    """Returns {"ok": bool, "problems": [...], and counts}."""
    problems: list[str] = []
    versions = {v.id: v for v in session.scalars(select(Version).order_by(Version.id))}
    edits = list(session.scalars(select(Edit).order_by(Edit.id)))
    restores = list(session.scalars(select(Restore).order_by(Restore.id)))
    head = crud.head_id(session)

    # one chain
    children: dict[int, list[int]] = {}
    for v in versions.values():
        if v.parent_id is not None:
            children.setdefault(v.parent_id, []).append(v.id)
    problems += [f"version {p} has several children {c}" for p, c in children.items() if len(c) > 1]
    chain: list[int] = []
    current = head
    while current is not None:
        chain.append(current)
        current = versions[current].parent_id
    chain.reverse()
    if set(chain) != set(versions):
        problems.append(f"versions off the chain from the head: {sorted(set(versions) - set(chain))}")

    # edits in versions, in order
    own: dict[int | None, list[Edit]] = {}
    for e in edits:
        if e.status == "applied":
            own.setdefault(e.version_id, []).append(e)
        elif e.version_id is not None:
            problems.append(f"edit {e.id} is {e.status} but names version {e.version_id}")
    applied_order = [e.id for vid in chain for e in own.get(vid, [])]
    if applied_order != sorted(applied_order):
        problems.append("edits were not applied in acceptance order")
    position: dict[int | None, int] = {vid: i for i, vid in enumerate(chain)}
    edit_position = {e.id: position[e.version_id] for e in edits if e.status == "applied"}
    for r in restores:
        if r.status != "done":
            continue
        at = position[r.version_id]
        early = [i for i, p in edit_position.items() if i <= r.after_edit_id and p > at]
        late = [i for i, p in edit_position.items() if i > r.after_edit_id and p < at]
        if early or late:
            problems.append(f"restore {r.id} out of order: before it {early[:5]} came after, {late[:5]} before")

    def version(vid: int | None) -> Version:
        """The version `vid` names; KeyError where it names none (None included)."""
        if vid is None:
            raise KeyError(vid)
        return versions[vid]

    # each checkpoint holds exactly its lineage's edits
    state: dict[int | None, list[dict]] = {}
    for vid in chain:
        v = versions[vid]
        if v.kind == "base":
            state[vid] = []
        elif v.kind == "restore":
            state[vid] = state.get(v.restored_from_id, [])
        else:
            added = own.get(vid, [])
            if not added:
                problems.append(f"version {vid} ({v.kind}) adds no edit")
            state[vid] = state[v.parent_id] + [e.request for e in added]
        if v.edit_count != len(state[vid]):
            problems.append(f"version {vid}: edit_count {v.edit_count}, its lineage has {len(state[vid])}")
        if v.kind == "restore" and v.checkpoint_sha256 == version(v.restored_from_id).checkpoint_sha256:
            continue  # the state checked at the version it restores
        stored, parent = _stored(session, checkpoints_dir, v.checkpoint_sha256)
        if parent is None:
            holds = stored
        elif v.kind in ("edit", "batch") and parent == version(v.parent_id).checkpoint_sha256:
            holds = state[v.parent_id] + stored  # that checkpoint checked at the parent version
        else:
            problems.append(f"version {vid}: its checkpoint extends {parent[:12]}..., not its parent version's")
            continue
        if holds != state[vid]:
            problems.append(f"version {vid}: its checkpoint holds {len(holds)} edits, not the {len(state[vid])} its rows say")

    by_status: dict[str, int] = {}
    for e in edits:
        by_status[e.status] = by_status.get(e.status, 0) + 1
    return {
        "ok": not problems,
        "problems": problems,
        "versions": len(versions),
        "head": head,
        "edits": by_status,
        "restores": {s: sum(1 for r in restores if r.status == s) for s in ("queued", "done", "failed")},
        "edits_in_head": len(state.get(head, [])) if head else 0,
    }
