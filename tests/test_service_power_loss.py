"""A power loss at any point of writing a version's checkpoint (tests/power_loss.py): afterwards
the version before it still loads exactly, the new one loads exactly once `save` has returned (when
the database may point at it), and writing it again in a fresh process gives the same checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from power_loss import STATES, PowerLoss
from service_support import TINY_EDIT_CONFIG

from app.store import CheckpointStore
from baft_core import EditConfig, Editor, EditRequest
from baft_core.checkpoint import Checkpoint


def _same(a: Checkpoint, b: Checkpoint) -> bool:
    x, y = a.interventions.state_dict(), b.interventions.state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) and a.history == b.history


def _crash_while_saving(
    editor: Editor, data_dir: Path, parent: str | None, scratch: Path, monkeypatch
) -> tuple[str, int]:
    """Saves the editor's state as a version (extending `parent`) while recording the crash
    points, then checks every crash point in every state; returns the new checkpoint's hash and
    how many crash points it checked."""
    power = PowerLoss(data_dir)
    with monkeypatch.context() as patched:
        power.recording(patched)
        sha256, _ = CheckpointStore(data_dir / "checkpoints", "tiny", "cpu").save(editor, parent=parent)
        power.crash_point()  # save returned: from here the database may name this checkpoint
    held = CheckpointStore(data_dir / "checkpoints", "tiny", "cpu").load(sha256)
    before = CheckpointStore(data_dir / "checkpoints", "tiny", "cpu").load(parent) if parent else None
    last = len(power.points) - 1
    for point in range(len(power.points)):
        for state in STATES:
            where = f"crash point {point} of {last}, {state}"
            after = power.materialise(point, state, scratch) / "checkpoints"
            if before is not None:
                assert parent is not None  # (before is loaded from it)
                assert _same(CheckpointStore(after, "tiny", "cpu").load(parent), before), where
            if point == last:
                assert _same(CheckpointStore(after, "tiny", "cpu").load(sha256), held), where
            # The worker, started again, applies the edit again from the parent and saves it.
            again, _ = CheckpointStore(after, "tiny", "cpu").save(editor, parent=parent)
            assert again == sha256, where
            assert _same(CheckpointStore(after, "tiny", "cpu").load(sha256), held), where
    return sha256, len(power.points)


@pytest.mark.parametrize("fresh_data_dir", [True, False], ids=["first-version", "into-existing-store"])
def test_a_power_loss_while_a_version_is_written_loses_nothing_the_database_names(
    tiny, tmp_path, monkeypatch, fresh_data_dir
):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    editor = Editor(tiny.model, tiny.tokenizer, EditConfig.from_dict(TINY_EDIT_CONFIG))
    try:
        parent = None
        if not fresh_data_dir:
            editor.edit(EditRequest.from_triple("Carol", "lives in", "Rome"))
            parent, _ = CheckpointStore(data_dir / "checkpoints", "tiny", "cpu").save(editor)
        editor.edit(EditRequest.from_triple("Alice", "lives in", "Oslo"))
        first, points = _crash_while_saving(editor, data_dir, parent, tmp_path / "after", monkeypatch)
        assert points >= 6  # segment files, their directory, the adapter, the manifest, the names
        editor.edit(EditRequest.from_triple("Bob", "lives in", "Lima"))
        _crash_while_saving(editor, data_dir, first, tmp_path / "after", monkeypatch)
    finally:
        editor.attachment.detach()
