"""Spelled route keys: which edits spell their subject (spelling.py) and how routing holds a
spelled key to its tokens (routing.py)."""
from __future__ import annotations

import json

import torch
from test_core_editor import make_editor

from baft_core import EditRequest
from baft_core.metrics import open_blocks
from baft_core.routing import Router
from baft_core.spelling import SPELLING_TOKENS, SubjectEndings, TokenClasses, subject_ids


def test_a_subject_spells_one_token_past_the_ending_it_shares():
    endings = SubjectEndings(route_tokens=3)
    endings.add((1, 2, 3, 4, 5))
    endings.add((6, 7))
    assert endings.spelling_length((9, 2, 3, 4, 5)) == 5  # shares four tokens: the fifth tells them apart
    assert endings.spelling_length((8, 3, 4, 5)) == 4
    assert endings.spelling_length((1, 2, 3, 4, 5)) == 0  # the same subject: nothing to spell
    assert endings.spelling_length((4, 5)) == 0  # the end of an earlier subject: no token it lacks
    assert endings.spelling_length((9, 9, 5)) == 0  # another ending: the keys tell them apart
    assert endings.spelling_length((3, 6, 7)) == 3  # a shorter subject's key reads all of it


def test_subjects_that_differ_only_past_the_spelling_limit_stay_unspelled():
    endings = SubjectEndings(route_tokens=3)
    shared = tuple(range(100, 100 + SPELLING_TOKENS))
    endings.add((1, *shared))
    assert endings.spelling_length((2, *shared)) == 0
    assert endings.spelling_length((2, *shared[1:])) == SPELLING_TOKENS


def _spelled_router(tokens: list[int], normalised: bool = False) -> Router:
    """Block 0: an unspelled key; block 1: the same state, spelling `tokens` (nearest first)."""
    router = Router(4, threshold=0.8, layer=0, spelling_normalised=normalised)
    state = torch.tensor([[1.0, 0, 0, 0]])
    router.add_pending(state, torch.tensor([0]))
    router.seal(0)
    spelling = torch.full((1, SPELLING_TOKENS), -1)
    spelling[0, : len(tokens)] = torch.tensor(tokens)
    router.add_pending(state, torch.tensor([1]), None, None, None, None, spelling)
    router.seal(1)
    return router


def test_a_spelled_key_opens_only_on_its_tokens_and_outreads_shorter_keys():
    router = _spelled_router([5, 7])
    assert router.key_spelling.tolist() == [-1, 0] and router.spellings[0, :3].tolist() == [5, 7, -1]
    hidden = torch.tensor([[[9.0, -9, -9, 9], [0, 1.0, 0, 0], [1.0, 0, 0, 0]]])

    def opens(tokens: list[int], prompt: list[bool] | None = None) -> list[bool]:
        mask = torch.tensor([prompt or [True] * 3])
        return router.open_blocks(hidden, mask, 2, torch.tensor([tokens]))[0].tolist()

    # Its tokens before the match: the spelled key opens its block, the shorter one at that
    # position does not (it cannot tell this subject from its own).
    assert opens([0, 7, 5]) == [False, True]
    assert opens([0, 8, 5]) == [True, False]  # another token: another subject
    assert opens([0, 5, 7]) == [True, False]  # its tokens in another order
    # A spelling that reaches before the prompt (into padding) is not there.
    router = _spelled_router([5, 7, 3])
    assert opens([3, 7, 5]) == [False, True]
    assert opens([3, 7, 5], [False, True, True]) == [True, False]


def test_an_edit_whose_subject_ends_like_an_earlier_ones_spells_it(tiny_sharp, tmp_path):
    first = EditRequest("The mother tongue of Danielle Darrieux is", "Japanese", subject="Danielle Darrieux")
    second = EditRequest("The mother tongue of Marie Darrieux is", "Greek", subject="Marie Darrieux")
    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.8)
    try:
        ed.edit(first)
        ed.edit(second)
        router = ed.interventions.router
        ours, theirs = subject_ids(ed.tokenizer, second.subject), subject_ids(ed.tokenizer, first.subject)
        length = max(i for i in range(1, len(ours) + 1) if ours[-i:] != theirs[-i:] or i == 1)
        assert ours[-3:] == theirs[-3:] and length > 3  # the case: a shared ending
        first_keys, second_keys = router.key_block == 0, router.key_block == 1
        assert (router.key_spelling[first_keys] < 0).all() and (router.key_spelling[second_keys] >= 0).all()
        spelled = router.spellings[router.key_spelling[second_keys][0]]
        assert spelled[:length].tolist() == list(reversed(ours[-length:])) and (spelled[length:] < 0).all()
        prompts = [first.prompt, second.prompt, "Marie Darrieux speaks", "Danielle Darrieux speaks"]
        opened = open_blocks(ed, prompts)
        assert not opened[[0, 3], 1].any() and opened[1, 1] and not opened[1, 0]
        ed.save(tmp_path, "tiny")
        spellings, key_spelling = router.spellings.clone(), router.key_spelling.clone()
        ed.reset()
        ed.load(tmp_path, "tiny")
        router = ed.interventions.router
        assert torch.equal(router.spellings, spellings) and torch.equal(router.key_spelling, key_spelling)
        assert torch.equal(open_blocks(ed, prompts), opened)
    finally:
        ed.attachment.detach()


def test_without_spelling_no_key_spells(tiny_sharp):
    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.8, route_spelling=False)
    try:
        ed.edit(EditRequest("The mother tongue of Danielle Darrieux is", "Japanese", subject="Danielle Darrieux"))
        ed.edit(EditRequest("The mother tongue of Marie Darrieux is", "Greek", subject="Marie Darrieux"))
        assert (ed.interventions.router.key_spelling < 0).all() and not len(ed.interventions.router.spellings)
    finally:
        ed.attachment.detach()


def test_format_11_checkpoints_load_with_keys_that_spell_nothing(tiny_sharp, tmp_path):
    """Before format 12 no key spelled its subject and no adapter's config had `route_spelling`:
    such an adapter loads with unspelled keys and goes on without spelling."""
    from test_core_routing import EDITS, reloaded_in_older_format

    def format_11(metadata, tensors):
        config = {k: v for k, v in json.loads(metadata["config"]).items() if k != "route_spelling"}
        metadata = {**metadata, "config": json.dumps(config), "format_version": "11"}
        spelling = ("router.pending_spelling", "router.pending_spellings")
        return metadata, {k: v for k, v in tensors.items() if k not in spelling}

    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.8)
    try:
        for request in EDITS:
            ed.edit(request)
        keys = len(ed.interventions.router.keys)
        prompts, expected = reloaded_in_older_format(ed, tmp_path, format_11)
        router = ed.interventions.router
        assert router.key_spelling.tolist() == [-1] * keys and not len(router.pending_spelling)
        assert ed.generate(prompts, max_new_tokens=6) == expected
    finally:
        ed.attachment.detach()
    from baft_core.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path, "tiny").config.route_spelling is False


def test_token_classes_join_dashes_and_case_and_keep_partial_characters_apart(tiny):
    classes = TokenClasses(tiny.tokenizer)
    ids = {text: tiny.tokenizer(text, add_special_tokens=False).input_ids for text in (" –", " -", " Women", " women")}
    assert all(len(i) == 1 for i in ids.values())  # one token each in this vocabulary
    as_class = {text: int(classes(torch.tensor(i))[0]) for text, i in ids.items()}
    assert as_class[" –"] == as_class[" -"] and as_class[" Women"] == as_class[" women"]
    table = classes(torch.arange(len(tiny.tokenizer)))  # each token's class
    partial = [i for i in range(len(table)) if "\ufffd" in tiny.tokenizer.decode([i])]
    assert len(partial) > 10 and table[partial].tolist() == partial  # bytes of a character: their own class
    assert classes(torch.tensor([-1, len(table) + 5])).tolist() == [-1, len(table) + 5]


def test_a_normalised_spelling_opens_on_tokens_of_its_class(tiny):
    """With `spelling_normalised` a spelled key compares its tokens' classes: the prompt's " -"
    matches a spelling of " –"; without it, or with another token, it does not."""
    classes = TokenClasses(tiny.tokenizer)
    dash, hyphen = (tiny.tokenizer(t, add_special_tokens=False).input_ids[0] for t in (" –", " -"))
    other = tiny.tokenizer(" and", add_special_tokens=False).input_ids[0]
    hidden = torch.tensor([[[9.0, -9, -9, 9], [0, 1.0, 0, 0], [1.0, 0, 0, 0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    for normalised in (True, False):
        router = _spelled_router([5, dash], normalised)
        assert router.open_blocks(hidden, mask, 2, torch.tensor([[0, dash, 5]]), classes)[0].tolist() == [False, True]
        hyphenated = router.open_blocks(hidden, mask, 2, torch.tensor([[0, hyphen, 5]]), classes)[0].tolist()
        assert hyphenated == ([False, True] if normalised else [True, False])
        assert router.open_blocks(hidden, mask, 2, torch.tensor([[0, other, 5]]), classes)[0].tolist() == [True, False]
