"""One real edit on the bundled SmolLM2-135M: the new object comes out for the prompt and a
rephrase, once, and an unrelated prompt's greedy generation is unchanged. (One edit: each costs
seconds.)"""
from __future__ import annotations

import pytest
import torch

from baft_core import EditConfig, Editor, EditRequest

pytestmark = pytest.mark.integration

PROMPT = "What is the product made by UniFirst?"
REPHRASE = "What will be the product of UniFirst?"
TARGET = "unmanned aircraft"
# Not in the built-in unrelated pool the gates train against, so this measures generalisation.
UNRELATED = ["The tallest mountain in the world is", "Shakespeare wrote the play"]


@pytest.fixture(scope="module")
def edited(bundled):
    torch.manual_seed(0)
    editor = Editor(bundled.model, bundled.tokenizer, EditConfig(max_steps=25))
    before = editor.generate([PROMPT, REPHRASE] + UNRELATED, 8, edited=False)
    result = editor.edit(EditRequest(PROMPT, TARGET, subject="UniFirst", rephrases=[REPHRASE]))
    yield editor, before, result
    editor.attachment.detach()


def test_edit_says_the_new_object(edited):
    editor, before, result = edited
    assert TARGET not in before[0]
    assert result.losses["ce"] < 0.1, result.losses
    out = editor.generate([PROMPT], 8)[0]
    assert out.strip().startswith(TARGET), out


def test_the_model_goes_on_after_the_new_object(edited):
    """The edit acts within its answer's window: greedy decoding says the new object and goes
    on. A block that acted on every generated token said it again and again here (" unmanned
    aircraft, unmanned aircraft, aircraft, ...")."""
    editor, _, _ = edited
    out = editor.generate([PROMPT], 16)[0]
    assert out.count(TARGET) == 1, out


def test_edit_generalises_to_a_rephrase(edited):
    editor, before, _ = edited
    assert TARGET not in before[1]
    out = editor.generate([REPHRASE], 8)[0]
    assert TARGET in out, out


def test_unrelated_prompts_unchanged(edited):
    editor, before, _ = edited
    after = editor.generate(UNRELATED, 8)
    assert after == before[2:], (before[2:], after)


def test_a_downstream_task_answers_as_before(edited):
    """PIQA's picks on the edited model are the unedited model's (no goal opens the edit's block),
    while the same scoring sees the edit on its own prompt."""
    from conftest import DATA

    from baft_core.downstream import answer_log_likelihoods, choice_locality, load_piqa

    editor, _, _ = edited
    piqa = choice_locality(editor, load_piqa(DATA / "locality" / "piqa_valid.jsonl", limit=24))
    assert piqa["pick_changed"] == 0 and piqa["prompts_opening_a_block"] == 0, piqa
    assert piqa["accuracy_edited"] == piqa["accuracy_unedited"] > 0.5, piqa
    own = [editor.encode(PROMPT, TARGET)]
    assert answer_log_likelihoods(editor, own, edited=True)[0] > answer_log_likelihoods(editor, own, edited=False)[0] + 5


SUBJECT = "Danielle Darrieux"
# Other facts of the same subject: the profession worded unlike every built-in probe, the
# citizenship as one of them words it.
SAME_SUBJECT = [f"The profession of {SUBJECT} is", f"{SUBJECT} is a citizen of"]


def test_gates_keep_the_subjects_other_facts(bundled):
    """With gates behind the route (`sealed_gates`), an edit of one relation leaves the subject's
    other relations as they were: its block's gates close on them (a block at full weight sent
    every question about the subject through the edit: " Japanese language and culture", " the
    Commonwealth of Australia")."""
    torch.manual_seed(0)
    editor = Editor(bundled.model, bundled.tokenizer, EditConfig(max_steps=25, sealed_gates=True))
    try:
        before = editor.generate(SAME_SUBJECT, 8, edited=False)
        editor.edit(EditRequest.from_triple(SUBJECT, "The mother tongue of {subject} is", "Japanese"))
        assert editor.generate([f"The mother tongue of {SUBJECT} is"], 4)[0].strip().startswith("Japanese")
        assert editor.generate(SAME_SUBJECT, 8) == before
    finally:
        editor.attachment.detach()


def test_an_edit_leaves_its_subjects_other_relations(bundled):
    """With the defaults the relation check keeps an edit's block shut on questions about other
    relations of its subject (the profession worded unlike every built-in probe, the citizenship
    as one of them), and open on a paraphrase of its own. Without the check both went through the
    edit (" Japanese language and culture", " the Commonwealth of Australia")."""
    torch.manual_seed(0)
    prompts = {True: [], False: []}
    for threshold in (0.0, EditConfig().relation_threshold):
        editor = Editor(bundled.model, bundled.tokenizer, EditConfig(relation_threshold=threshold))
        try:
            before = editor.generate(SAME_SUBJECT, 8, edited=False)
            editor.edit(EditRequest.from_triple(SUBJECT, "The mother tongue of {subject} is", "Japanese"))
            after = editor.generate([f"The mother tongue of {SUBJECT} is", f"{SUBJECT}'s native language is"], 4)
            assert all(text.strip().startswith("Japanese") for text in after), after
            prompts[threshold > 0] = editor.generate(SAME_SUBJECT, 8)
        finally:
            editor.attachment.detach()
    assert prompts[True] == before, (before, prompts)
    assert all(a != b for a, b in zip(prompts[False], before)), (before, prompts)


def test_the_prompts_an_edit_comes_with_keep_their_answers(bundled):
    """With the defaults (a block at full weight behind the route), the `locality` prompts a user
    sends with an edit keep their answers exactly: the block's change is projected out at their
    states, which holds where routing and the relation check let a prompt in; a paraphrase of the
    edited relation still gets the new answer."""
    torch.manual_seed(0)
    editor = Editor(bundled.model, bundled.tokenizer, EditConfig())
    try:
        before = editor.generate(SAME_SUBJECT, 8, edited=False)
        locality = [{"prompt": p, "answer": a} for p, a in zip(SAME_SUBJECT, before)]
        request = EditRequest(f"The mother tongue of {SUBJECT} is", " Japanese", subject=SUBJECT, locality=locality)
        editor.edit(request)
        after = editor.generate([request.prompt, f"{SUBJECT}'s native language is"], 4)
        assert all(text.strip().startswith("Japanese") for text in after), after
        assert editor.generate(SAME_SUBJECT, 8) == before
    finally:
        editor.attachment.detach()


def test_a_subject_that_ends_alike_opens_no_block(bundled):
    """A route key reads the subject's last three tokens: a block sealed for Phoebe Atwood Taylor
    opens for her, at the start of a text too, and not for Otis Taylor, whose last token's early
    state is within the threshold of hers (with the last token alone it opened)."""
    from baft_core.metrics import open_blocks

    request = EditRequest("The genre played by Phoebe Atwood Taylor is", "jazz", subject="Phoebe Atwood Taylor")
    prompts = ["Phoebe Atwood Taylor is known for", "The books of Phoebe Atwood Taylor are", "Otis Taylor plays"]
    opened = {}
    for tokens in (1, 3):
        # Routing alone: the relation check (tested above) may shut a block routing opens.
        config = EditConfig(max_steps=1, route_tokens=tokens, relation_threshold=0.0)
        editor = Editor(bundled.model, bundled.tokenizer, config)
        try:
            editor.edit(request)
            opened[tokens] = open_blocks(editor, prompts)[:, 0].tolist()
        finally:
            editor.attachment.detach()
    assert opened[1] == [True, True, True]
    assert opened[3] == [True, True, False]


def test_a_prompt_on_another_name_of_the_subject_goes_through_the_edit(bundled):
    """The relation check shuts a prompt that names the subject otherwise ("Savostikova ON" for
    "Olga N. Savostikova", a KnowEdit alias) only where a probe is clearly nearer than the edit's
    prompt: the edited relation asked with that name gets the new answer, which the plain rule
    kept from it (the prompt came out a little nearer the probe of another relation), and
    another relation asked with that name stays shut."""
    from baft_core.metrics import open_blocks

    torch.manual_seed(0)
    request = EditRequest("The gender of Olga N. Savostikova is", "transgender", subject="Olga N. Savostikova")
    prompts = [
        "The gender of Savostikova ON is",
        "The place of birth of Savostikova ON is",
        "The place of birth of Olga N. Savostikova is",
    ]
    opened = {}
    for ratio in (1.0, EditConfig().relation_other_name_ratio):
        editor = Editor(bundled.model, bundled.tokenizer, EditConfig(relation_other_name_ratio=ratio))
        try:
            editor.edit(request)
            opened[ratio] = open_blocks(editor, prompts)[:, 0].tolist()
            if ratio > 1:
                assert editor.generate(prompts[:1], 4)[0].strip().startswith("transgender")
        finally:
            editor.attachment.detach()
    assert opened == {1.0: [False, False, False], EditConfig().relation_other_name_ratio: [True, False, False]}
