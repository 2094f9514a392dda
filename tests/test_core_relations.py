"""The relation check (relations.py): a routed block stays shut on prompts that read like one of its
subject's other relations, and open on its own; its states survive checkpoints."""
from __future__ import annotations

import torch
from test_core_editor import make_editor

from baft_core import EditRequest
from baft_core.encoding import encode_prompt, left_padded
from baft_core.metrics import open_blocks
from baft_core.relations import RelationCheck, last_prompt_positions

EDIT = EditRequest("The mother tongue of Danielle Darrieux is", "Japanese", subject="Danielle Darrieux")


def _check(threshold: float = 0.8, margin: float = 0.0) -> RelationCheck:
    check = RelationCheck(4, layer=0, threshold=threshold, margin=margin)
    edit, probe, other = torch.eye(4)[:3]
    check.add_pending(edit[None], torch.stack([probe, other]))
    check.seal(0)
    check.add_pending(edit[None], torch.zeros(0, 4))  # a block without probes
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
    shut = check.shut(hidden, prompt, opened)
    # Block 1 holds no probes: never shut. A block that is not open stays so.
    assert shut.tolist() == [[True, True], [False, True], [True, True], [False, True]]
    assert check.keys.dtype == torch.int8 and check.key_block.tolist() == [0]
    assert check.probe_block.tolist() == [0, 0] and not len(check.pending_keys)


def test_the_margin_and_threshold_decide_how_near_a_probe_must_be():
    edit, probe = torch.eye(4)[0], torch.eye(4)[1]
    near_both = torch.nn.functional.normalize(edit + probe, dim=0)[None, None]  # 0.71 from each
    opened = torch.ones(1, 2, dtype=torch.bool)
    prompt = torch.ones(1, 1, dtype=torch.bool)
    assert _check(threshold=0.7, margin=-0.01).shut(near_both, prompt, opened)[0, 0].item() is False
    assert _check(threshold=0.7, margin=0.01).shut(near_both, prompt, opened)[0, 0].item() is True
    assert _check(threshold=0.8, margin=-0.01).shut(near_both, prompt, opened)[0, 0].item() is True


def test_sealed_states_are_int8_rows_close_to_their_cosines():
    torch.manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(64, 576) * torch.rand(64, 576), dim=-1)
    check = RelationCheck(576, layer=0, threshold=0.8, margin=0.0)
    check.add_pending(rows[:1], rows[1:])
    check.seal(0)
    assert check.probes.dtype == torch.int8 and check.num_bytes == 64 * (576 + 4)
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
