"""Same-subject probes: the prompts an edit's gates learn to stay closed on, and how they are
measured."""
from __future__ import annotations

import torch
from test_core_editor import UNRELATED, make_editor

from baft_core import EditConfig, EditRequest
from baft_core.data import Probe
from baft_core.metrics import evaluate, summarize, with_subject_probes
from baft_core.subject_probes import RELATIONS, SUBJECT_PROBE_GROUP, probe_prompts

EDIT = EditRequest("The mother tongue of Danielle Darrieux is", "Japanese", subject="Danielle Darrieux")


def test_probes_ask_other_relations_of_the_subject():
    prompts = probe_prompts(EDIT.prompt, EDIT.subject, 100)
    assert prompts and all("Danielle Darrieux" in p for p in prompts)
    # The edited relation (a language) is no probe: there the new answer is wanted.
    assert not any("language" in p for p in prompts)
    assert "The gender of Danielle Darrieux is" in prompts
    assert len(prompts) == len(set(prompts)) < len(RELATIONS)
    assert probe_prompts(EDIT.prompt, EDIT.subject, 3) == prompts[:3]


def test_the_default_probes_ask_each_relation_in_both_wordings():
    """The relation check compares wordings: a question of the form "The <property> of S is"
    is nearer a probe worded so, so the default limit takes both wordings of every relation."""
    occupation = "The occupation of Danielle Darrieux is"
    prompts = probe_prompts(EDIT.prompt, EDIT.subject, EditConfig().subject_probes)
    assert occupation in prompts and "By profession, Danielle Darrieux is a" in prompts
    assert "The official language of Danielle Darrieux is" not in prompts  # the edited relation
    assert len(prompts) == len(probe_prompts(EDIT.prompt, EDIT.subject, len(RELATIONS)))
    asked = probe_prompts(occupation, EDIT.subject, EditConfig().subject_probes)
    assert not any(word in p for p in asked for word in ("profession", "occupation"))


def test_what_comes_before_and_what_comes_after_are_two_relations():
    """"S follows" and "S is followed by" ask different things: an edit of one keeps the other
    as a probe (one marker set for both sent "S is followed by" through an edit of "S follows")."""
    follows = probe_prompts("Symphony No. 5 follows", "Symphony No. 5", 100)
    followed = probe_prompts("Symphony No. 5 is followed by", "Symphony No. 5", 100)
    assert "Symphony No. 5 is followed by" in follows and "Symphony No. 5 follows" not in follows
    assert "Symphony No. 5 follows" in followed and "Symphony No. 5 is followed by" not in followed
    # "replaced" asks what came before, "replaced by" what came after (it named both before).
    replaced_by = probe_prompts("Symphony No. 5 was replaced by", "Symphony No. 5", 100)
    assert "Symphony No. 5 follows" in replaced_by and "Symphony No. 5 is followed by" not in replaced_by
    replaced = probe_prompts("Symphony No. 5 replaced", "Symphony No. 5", 100)
    assert "Symphony No. 5 is followed by" in replaced and "Symphony No. 5 follows" not in replaced


def test_relations_are_asked_in_the_wikidata_wording_too():
    """Worded "The name of the mother of S is", an edit's own prompt is nearer "The name of the
    father of S is" than "The father of S is" is, so the list asks the father in that form too."""
    prompts = probe_prompts("The name of the mother of Ada Lovelace is", "Ada Lovelace", EditConfig().subject_probes)
    assert {"The name of the father of Ada Lovelace is", "The father of Ada Lovelace is"} <= set(prompts)
    assert not any("mother" in p for p in prompts)
    wikidata = [r for r in RELATIONS if r.template.startswith(("The name of", "The names of"))]
    assert len(wikidata) >= 20 and len(RELATIONS) <= EditConfig().subject_probes


def test_no_probes_without_a_subject_in_the_prompt():
    assert probe_prompts(EDIT.prompt, None, 10) == []
    assert probe_prompts(EDIT.prompt, "  ", 10) == []
    assert probe_prompts(EDIT.prompt, "Someone Else", 10) == []
    assert probe_prompts(EDIT.prompt, EDIT.subject, 0) == []


def test_markers_match_at_word_starts():
    # "person" holds "son" but is no question about a child.
    prompts = probe_prompts("The favourite person of Ada Lovelace is", "Ada Lovelace", 100)
    assert "A child of Ada Lovelace is" in prompts
    assert "A child of Ada Lovelace is" not in probe_prompts("The son of Ada Lovelace is", "Ada Lovelace", 100)


def test_keep_prompts_add_the_requests_own_locality(tiny_sharp):
    ed = make_editor(tiny_sharp, subject_probes=4)
    try:
        request = EditRequest(EDIT.prompt, EDIT.target, EDIT.subject, locality=[Probe("Danielle Darrieux sang", "x")])
        kept = ed.keep_prompts(request)
        assert kept == probe_prompts(EDIT.prompt, EDIT.subject, 4) + ["Danielle Darrieux sang"]
    finally:
        ed.attachment.detach()


def gate_weights(ed, prompt: str) -> float:
    """The sealed block's largest gate weight at the prompt's intervened positions, averaged over
    them (before the cutoff)."""
    states = ed._prompt_states([prompt])[0]
    block = ed.interventions[ed.layers[0]]
    sealed = ed.interventions.sealed[str(ed.layers[0])]
    inputs = block.gate_inputs(states[ed.layers[0]])
    return torch.sigmoid(inputs @ sealed.gate_weight.T + sealed.gate_bias).amax(1).mean().item()


def test_a_routed_blocks_gates_close_on_its_subjects_other_relations(tiny_sharp):
    """Sealed with gates behind the route, a block learns to stay closed on the probes of its
    subject and on the request's locality prompts, and to open on its own prompt."""
    keep = "Danielle Darrieux sang the song"
    ed = make_editor(tiny_sharp, block_edits=1, sealed_gates=True, subject_probes=6, route_threshold=0.5, max_steps=40, gate_polish_steps=300)
    try:
        ed.edit(EditRequest(EDIT.prompt, EDIT.target, EDIT.subject, locality=[Probe(keep, "x")]))
        assert ed.interventions.sealed_blocks == 1 and ed.interventions.sealed_gates
        opened = gate_weights(ed, EDIT.prompt)
        for prompt in [*probe_prompts(EDIT.prompt, EDIT.subject, 6), keep]:
            assert gate_weights(ed, prompt) < opened / 2, prompt
        assert opened > ed.config.sealed_cutoff
    finally:
        ed.attachment.detach()


def test_subject_probes_are_measured_as_their_own_group(tiny_sharp):
    ed = make_editor(tiny_sharp, subject_probes=3)
    try:
        request = EditRequest(EDIT.prompt, EDIT.target, EDIT.subject, locality=[Probe(UNRELATED[0], "Paris")])
        [measured] = with_subject_probes(ed, [request])
        groups = [p.group for p in measured.locality]
        assert groups[0] is None and groups.count(SUBJECT_PROBE_GROUP) == len(measured.locality) - 1 > 0
        [row] = evaluate(ed, [measured])  # nothing edited yet: every probe keeps its answer
        assert row[f"loc/{SUBJECT_PROBE_GROUP}"] == 1.0 and row["loc"] == 1.0
    finally:
        ed.attachment.detach()


def test_grouped_metrics_are_summarised_per_group_and_as_the_mean_of_groups():
    rows = [
        {"loc": 0.5, "loc/A": 1.0, "loc/B": 0.0},
        {"loc": 1.0, "loc/A": 1.0, "loc/B": None},
        {"loc": 0.0, "loc/B": 0.0},
    ]
    summary = summarize(rows)
    assert summary["loc/A"] == 1.0 and summary["loc/B"] == 0.0
    assert summary["loc_groups_mean"] == 0.5
    assert summary["loc"] == 0.5


def test_a_block_without_gates_leaves_the_requests_locality_states_alone(tiny_sharp):
    """The routed block's change (A h + b - R h, sealed as its strongest directions) is zero, to rounding, at every state where it
    acts on the prompts the request came with, and not zero on the edit's own."""
    ed = make_editor(tiny_sharp, block_edits=1, max_steps=40)
    kept = [Probe("Danielle Darrieux sang", " songs"), Probe("The gender of Danielle Darrieux is", " female")]
    try:
        ed.edit(EditRequest(EDIT.prompt, EDIT.target, EDIT.subject, locality=kept))
        assert not ed.interventions.sealed_gates and ed.interventions.sealed_blocks == 1
        sealed = ed.interventions.sealed[str(ed.layers[0])]
        for states, expected_zero in ((ed.trainer._kept_states([EditRequest(EDIT.prompt, EDIT.target, locality=kept)]), True),
                                      (ed.hidden_states([ed.encode(EDIT.prompt, EDIT.target)])[0], False)):
            h = states[ed.layers[0]]
            change = h @ sealed.change_weight.float().T + sealed.change_bias.float()
            relative = (change.norm(dim=-1) / h.norm(dim=-1)).max().item()
            # Zero but for the fp16 rounding of the sealed rows (2^-11 relative).
            assert (relative < 1e-3) if expected_zero else (relative > 1e-2), relative
    finally:
        ed.attachment.detach()


def test_a_later_edit_of_the_subject_keeps_what_an_earlier_one_was_told_to_keep(tiny_sharp):
    """The second edit of a subject opens on it too, so its block is also kept off the prompts the
    first edit listed; a listed prompt that the new edit itself asks is not kept (the new answer
    wins)."""
    ed = make_editor(tiny_sharp, block_edits=1, max_steps=40)
    kept = [Probe("The gender of Danielle Darrieux is", " female")]
    try:
        ed.edit(EditRequest(EDIT.prompt, EDIT.target, EDIT.subject, locality=kept))
        second = EditRequest("Danielle Darrieux was born in", " Paris", EDIT.subject)
        ed.edit(second)
        sealed = ed.interventions.sealed[str(ed.layers[0])]
        h = ed.trainer._kept_states([EditRequest(EDIT.prompt, EDIT.target, locality=kept)])[ed.layers[0]]
        second_block = slice(ed.interventions.sealed_rank, 2 * ed.interventions.sealed_rank)
        change = h @ sealed.change_weight[second_block].float().T + sealed.change_bias[second_block].float()
        assert (change.norm(dim=-1) / h.norm(dim=-1)).max().item() < 1e-3  # fp16 rows
        assert ed.trainer._kept_states([EditRequest(kept[0].prompt, " male", EDIT.subject)]) is None
        assert ed.trainer._kept_states([EditRequest("Danielle Darrieux died in", " Rome", EDIT.subject)]) is not None
        assert ed.trainer._kept_states([EditRequest("Jan Smuts died in", " Rome", "Jan Smuts")]) is None
    finally:
        ed.attachment.detach()
