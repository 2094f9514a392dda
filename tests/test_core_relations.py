"""The relation check (relations.py): a routed block stays shut on prompts that read like one of its
subject's other relations, and open on its own; its states survive checkpoints."""
from __future__ import annotations

import torch
from test_core_editor import make_editor

from baft_core import EditRequest
from baft_core.encoding import encode_prompt, left_padded
from baft_core.metrics import open_blocks
from baft_core.relations import SUBJECT_TOKENS, RelationCheck, last_prompt_positions, subject_rows

EDIT = EditRequest("The mother tongue of Danielle Darrieux is", "Japanese", subject="Danielle Darrieux")


SUBJECT = [5, 6]  # block 0's subject as token ids, mid-text and at a text's start alike


def _subject_rows(ids: list[int]) -> torch.Tensor:
    rows = torch.full((2, SUBJECT_TOKENS), -1, dtype=torch.int32)
    rows[:, SUBJECT_TOKENS - len(ids) :] = torch.tensor(ids, dtype=torch.int32)
    return rows


def _check(threshold: float = 0.8, margin: float = 0.0, other_name_ratio: float = 1.0) -> RelationCheck:
    check = RelationCheck(4, layer=0, threshold=threshold, margin=margin, other_name_ratio=other_name_ratio)
    edit, probe, other = torch.eye(4)[:3]
    check.add_pending(edit[None], torch.stack([probe, other]), _subject_rows(SUBJECT))
    check.seal(0)
    check.add_pending(edit[None], torch.zeros(0, 4), torch.zeros(0, SUBJECT_TOKENS, dtype=torch.int32))  # no probes
    check.seal(1)
    return check


def _routed(editor, prompts: list[str]) -> torch.Tensor:
    """Whether each prompt opens block 0 by its route keys alone."""
    ids = [encode_prompt(editor.tokenizer, p) for p in prompts]
    hidden, attention = editor.routing_layer_output(ids)
    tokens = left_padded(ids, editor.pad_id)[0]
    return editor.interventions.route(hidden, attention.bool(), tokens, editor.attachment.classes)[:, 0]


def test_last_prompt_positions_of_left_and_right_padded_rows():
    prompt = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    assert last_prompt_positions(prompt).tolist() == [2, 4, 2]


def test_a_prompt_like_a_probe_shuts_its_block_and_one_like_the_edit_does_not():
    check = _check()
    edit, probe = torch.eye(4)[0], torch.eye(4)[1]
    between = torch.nn.functional.normalize(edit + 0.9 * probe, dim=0)  # nearer the edit
    hidden = torch.stack([edit, probe, between, probe])[:, None]  # [batch, seq 1, d]
    prompt = torch.ones(4, 1, dtype=torch.bool)
    opened = torch.tensor([[True, True], [True, True], [True, True], [False, True]])
    shut = check.shut(hidden, prompt, torch.zeros(4, 1, dtype=torch.long), opened)
    # Block 1 holds no probes: never shut. A block that is not open stays so.
    assert shut.tolist() == [[True, True], [False, True], [True, True], [False, True]]
    assert check.keys.dtype == torch.int8 and check.key_block.tolist() == [0]
    assert check.probe_block.tolist() == [0, 0] and not len(check.pending_keys)


def test_the_margin_and_threshold_decide_how_near_a_probe_must_be():
    edit, probe = torch.eye(4)[0], torch.eye(4)[1]
    near_both = torch.nn.functional.normalize(edit + probe, dim=0)[None, None]  # 0.71 from each
    opened = torch.ones(1, 2, dtype=torch.bool)
    prompt, tokens = torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.long)
    assert _check(threshold=0.7, margin=-0.01).shut(near_both, prompt, tokens, opened)[0, 0].item() is False
    assert _check(threshold=0.7, margin=0.01).shut(near_both, prompt, tokens, opened)[0, 0].item() is True
    assert _check(threshold=0.8, margin=-0.01).shut(near_both, prompt, tokens, opened)[0, 0].item() is True


def test_a_prompt_on_another_name_of_the_subject_needs_a_probe_clearly_nearer():
    edit, probe = torch.eye(4)[0], torch.eye(4)[1]
    slightly = torch.nn.functional.normalize(0.95 * edit + probe, dim=0)  # distances 0.311 / 0.275
    hidden = torch.stack([slightly, slightly, probe])[:, None].expand(3, 3, 4)  # [batch, seq 3, d]
    prompt = torch.ones(3, 3, dtype=torch.bool)
    # The subject spelled, then another name of it (not the subject's ids in a row) twice.
    tokens = torch.tensor([[1, *SUBJECT], [SUBJECT[0], 1, SUBJECT[1]], [1, 2, SUBJECT[1]]])
    opened = torch.ones(3, 2, dtype=torch.bool)
    shut = _check(threshold=0.7, other_name_ratio=1.5).shut(hidden, prompt, tokens, opened)
    # Slightly nearer a probe: shut where the prompt spells the subject; open on another name.
    # A prompt that is a probe is shut on any name.
    assert shut[:, 0].tolist() == [False, True, False]
    assert _check(threshold=0.7, other_name_ratio=1.0).shut(hidden, prompt, tokens, opened)[:, 0].tolist() == [False] * 3


def test_a_subject_is_kept_as_its_ids_mid_text_and_at_a_texts_start(tiny_sharp):
    tokenizer = tiny_sharp.tokenizer
    rows = subject_rows(tokenizer, "Danielle Darrieux")
    for row, text in zip(rows, (" Danielle Darrieux", "Danielle Darrieux")):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert row[-len(ids) :].tolist() == ids and (row[: -len(ids)] == -1).all()


def test_sealed_states_are_int8_rows_close_to_their_cosines():
    torch.manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(64, 576) * torch.rand(64, 576), dim=-1)
    check = RelationCheck(576, layer=0, threshold=0.8, margin=0.0, other_name_ratio=1.0)
    check.add_pending(rows[:1], rows[1:], _subject_rows(SUBJECT))
    check.seal(0)
    assert check.probes.dtype == torch.int8 and check.num_bytes == 64 * (576 + 4) + 2 * SUBJECT_TOKENS * 4
    queries = torch.nn.functional.normalize(rows[1:] + 0.3 * torch.randn(63, 576) / 24, dim=-1)
    exact = queries @ rows[1:].half().float().T
    held = (queries @ check.probes.float().T) * check.probe_scale
    assert (held - exact).abs().max() < 0.005 and not torch.equal(held, exact)


def test_an_edit_leaves_its_probes_shut_and_survives_checkpoints(tiny_sharp, tmp_path):
    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.8, relation_threshold=0.8)
    try:
        ed.edit(EDIT)
        relations = ed.interventions.relations
        probes = ed.relation_probes(EDIT)
        assert probes and len(relations.probes) == len(probes) and len(relations.keys) == 1
        assert torch.equal(relations.subjects, subject_rows(ed.tokenizer, EDIT.subject))
        assert not any("tongue" in p or "language" in p for p in probes)
        opened = open_blocks(ed, [EDIT.prompt, *probes])[:, 0]
        routed = _routed(ed, probes)
        assert opened[0] and routed.any() and not opened[1:].any()
        prompts = [EDIT.prompt, probes[int(routed.nonzero()[0])]]
        expected = ed.generate(prompts, max_new_tokens=6)
        assert expected[1] == ed.generate([prompts[1]], max_new_tokens=6, edited=False)[0]
        ed.save(tmp_path, "tiny")
        saved = {name: t.clone() for name, t in relations.state_dict().items()}
        ed.reset()
        ed.load(tmp_path, "tiny")
        loaded = ed.interventions.relations.state_dict()
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
        assert ed.interventions.relations.layer == relations.layer
        assert ed.generate(prompts, max_new_tokens=6) == expected
    finally:
        ed.attachment.detach()


def test_without_the_check_the_probes_open_the_block(tiny_sharp):
    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.8, relation_threshold=0.0)
    try:
        ed.edit(EDIT)
        assert not len(ed.interventions.relations.probes)
        probes = ed.relation_probes(EDIT)
        assert torch.equal(open_blocks(ed, probes)[:, 0], _routed(ed, probes))
    finally:
        ed.attachment.detach()
