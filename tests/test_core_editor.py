"""The Editor on the tiny model: single, continual and batched edits, reset, bad input."""
from __future__ import annotations

import pytest
import torch

from baft_core import EditConfig, Editor, EditRequest
from baft_core.encoding import encode, encode_prompt
from baft_core.metrics import answer_argmax

UNRELATED = ["The capital of France is", "Water boils at", "My favourite colour is", "Once upon a time"]


def make_editor(model, **overrides) -> Editor:
    torch.manual_seed(0)
    # The random tiny model has small hidden norms: a larger step than the real-model default.
    # One block for all edits unless a test asks for blocks (test_core_blocks.py): the tiny
    # model's few unrelated prompts cannot teach gates that clear a sealed block's cutoff.
    config = EditConfig(
        **{"max_steps": 20, "max_steps_batched": 40, "rank": 8, "lr": 0.05, "layers": [1, 2, 3], "block_edits": 0, **overrides}
    )
    return Editor(model.model, model.tokenizer, config, unrelated_prompts=UNRELATED)


@pytest.fixture
def editor(tiny_sharp):
    """The tiny model with std-0.3 weights: its logits have range, so edits can succeed."""
    ed = make_editor(tiny_sharp)
    yield ed
    ed.attachment.detach()


def first_loss(editor, request) -> float:
    """CE of the target on the current adapter, computed with a plain forward."""
    example = editor.encode(request.prompt, request.target)
    from baft_core.encoding import teacher_forced
    from baft_core.metrics import teacher_forced_routes

    tf = teacher_forced([example], editor.config.prompt_positions, editor.pad_id)
    with torch.no_grad(), editor.attachment.intervene(tf.intervene, routes=teacher_forced_routes(tf, "cpu")):
        logits = editor.model(input_ids=tf.input_ids, attention_mask=tf.attention_mask).logits
    keep = tf.targets != -100
    return torch.nn.functional.cross_entropy(logits[keep], tf.targets[keep]).item()


def test_default_layers_follow_the_depth():
    for depth in (4, 30, 32):
        layers = EditConfig().resolved_layers(depth)
        assert layers == sorted(set(layers)) and all(0 <= layer < depth for layer in layers)
        assert len(layers) >= 2
    assert EditConfig().resolved_layers(30) == [17, 22, 26]
    assert EditConfig().resolved_layers(32) == [18, 24, 28]  # the paper's upper three
    with pytest.raises(ValueError, match="out of range"):
        EditConfig(layers=[0, 30]).resolved_layers(30)


@pytest.mark.parametrize("method", ["baft", "reft"])
def test_single_edit_learns_the_target(tiny_sharp, method):
    ed = make_editor(tiny_sharp, method=method)
    try:
        request = EditRequest("The mother tongue of Danielle Darrieux is", "Japanese")
        before = first_loss(ed, request)
        result = ed.edit(request)
        after = first_loss(ed, request)
        assert result.losses["ce"] < 0.5 or result.steps < ed.config.max_steps
        assert after < 0.5 < before
        assert len(ed.history) == 1 and ed.history[0] is request
        example = ed.encode(request.prompt, request.target)
        assert answer_argmax(ed, [example])[0] == example.answer
        if method == "baft":
            assert set(result.basis_weights) == set(ed.layers)
            assert all(len(w) == ed.config.rank for w in result.basis_weights.values())
            assert "margin" in result.losses and "balance" in result.losses
            assert int(ed.interventions.edit_count) == 1
            assert ed.interventions.usage_sum.sum() > 0
            # gating keeps an unrelated prompt (one of the unrelated pool) as it was; the random
            # tiny model is brittle, so only its first two greedy tokens are compared
            ids = encode_prompt(ed.tokenizer, UNRELATED[0])
            from baft_core.generation import generate

            edited = generate(ed.model, ed.tokenizer, [ids], 2, ed.attachment, stop_at_eos=False)
            plain = generate(ed.model, ed.tokenizer, [ids], 2, None, stop_at_eos=False)
            assert edited == plain
        else:
            assert "margin" not in result.losses
    finally:
        ed.attachment.detach()


def test_continual_edit_publishes_a_new_adapter(tiny_sharp):
    # Gated training on the random tiny model takes 20-80 steps an edit, by the draw of R.
    editor = make_editor(tiny_sharp, max_steps=80)
    try:
        first = EditRequest("The mother tongue of Danielle Darrieux is", "Japanese")
        second = EditRequest("What is the product made by UniFirst?", "unmanned aircraft")
        editor.edit(first)
        published = editor.interventions
        snapshot = {k: v.clone() for k, v in published.state_dict().items()}
        generations = editor.generate([first.prompt], 4)

        editor.edit(second)
        assert editor.interventions is not published
        assert len(editor.history) == 2
        # the old object is untouched (copy, train, publish)
        for key, value in published.state_dict().items():
            assert torch.equal(value, snapshot[key]), key
        assert editor.generate([first.prompt], 4, interventions=published) == generations
        # the new one differs and learned the second edit
        assert any(not torch.equal(v, editor.interventions.state_dict()[k]) for k, v in snapshot.items())
        assert first_loss(editor, second) < 0.5
    finally:
        editor.attachment.detach()


def test_edit_batch(editor):
    with pytest.raises(ValueError, match="no edits"):
        editor.edit_batch([])
    requests = [
        EditRequest("The mother tongue of Danielle Darrieux is", "Japanese"),
        EditRequest("What is the product made by UniFirst?", "unmanned aircraft"),
    ]
    result = editor.edit_batch(requests)
    assert len(editor.history) == 2
    assert int(editor.interventions.edit_count) == 2
    assert result.losses["ce"] < 1.0
    for r in requests:
        assert first_loss(editor, r) < 1.0


def test_reset_restores_identity(editor):
    prompts = ["The mother tongue of Danielle Darrieux is", "Water boils at"]
    unedited = editor.generate(prompts, 6, edited=False)
    editor.edit(EditRequest(prompts[0], "Japanese"))
    assert editor.generate(prompts, 6) != unedited
    editor.reset()
    assert editor.history == []
    assert int(editor.interventions.edit_count) == 0
    assert editor.generate(prompts, 6) == unedited
    examples = [editor.encode(p, "something else") for p in prompts]
    assert answer_argmax(editor, examples) == answer_argmax(editor, examples, edited=False)


def test_bad_inputs(tiny, editor):
    with pytest.raises(ValueError, match="target is empty"):
        EditRequest("The capital of France is", "   ")
    with pytest.raises(ValueError, match="prompt is empty"):
        EditRequest("", "Paris")
    with pytest.raises(ValueError, match="target is empty"):
        editor.encode("The capital of France is", "")
    with pytest.raises(ValueError, match="prompt is empty"):
        editor.encode("  ", "Paris")

    limit = editor.context  # 128 for the tiny models
    assert limit == 128
    long_prompt = "word " * 200
    with pytest.raises(ValueError, match=r"longer than the model's context of 128"):
        editor.encode(long_prompt, "Paris")
    with pytest.raises(ValueError, match=r"longer than the model's context of 128"):
        encode_prompt(tiny.tokenizer, long_prompt, limit)
    with pytest.raises(ValueError, match="longer than the model's context"):
        editor.generate([long_prompt], 2)
    with pytest.raises(ValueError, match="longer than the model's context"):
        editor.edit(EditRequest(long_prompt, "Paris"))
    assert editor.history == []
    # prompt fits but prompt + answer does not
    fits = "word " * 124
    n = len(encode_prompt(tiny.tokenizer, fits))
    assert n <= limit
    with pytest.raises(ValueError, match="prompt and answer are"):
        encode(tiny.tokenizer, fits, "a much longer answer than that " * 3, limit)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "lora"}, "unknown method"),
        ({"rank": 0}, "rank"),
        ({"rank": None}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": 0.1, "beta": 0.05}, "alpha"),
        ({"layers": [7]}, "out of range"),
        ({"route_layer": 3, "layers": [1, 2]}, "route_layer"),
        ({"route_margin": 1.5}, "route_margin"),
        ({"route_contexts": "Notes:"}, "route_contexts"),
        ({"route_tokens": 0}, "route_tokens"),
        ({"route_tokens": 2.0}, "route_tokens"),
        ({"route_prefix_threshold": 1.0}, "route_prefix_threshold"),
        ({"answer_window": "false"}, "answer_window"),
        ({"continuation_weight": -1.0}, "continuation_weight"),
        ({"continuation_tokens": -1}, "continuation_tokens"),
        ({"lr": 0.0}, "lr"),
        ({"gate_lr": -1e-3}, "gate_lr"),
    ],
)
def test_bad_config(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Editor(tiny.model, tiny.tokenizer, EditConfig(**kwargs), unrelated_prompts=[])


def test_reft_defaults_differ_from_baft_only_in_the_gates():
    # ReFT is BaFT with W = I: same rank, layers and optimiser; its ungated edits share one block.
    baft, reft = EditConfig().to_dict(), EditConfig(method="reft").to_dict()
    assert {key for key in baft if baft[key] != reft[key]} == {"method", "block_edits"}
