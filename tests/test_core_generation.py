"""Intervention positions during generation, batching, and the cached-prefix training batch:
the fast paths must compute exactly what a plain full forward with the same mask computes."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from baft_core import EditConfig, Editor, load_model
from baft_core.encoding import Example, encode_prompt, teacher_forced
from baft_core.generation import _next_tokens, generate, stream
from baft_core.metrics import answer_argmax
from baft_core.prefix_cache import CachedBatch, training_attention

P = 3
PROMPTS = [
    "The capital of France is",
    "Hi",
    "In a small village at the foot of the mountains there lived an old clockmaker who",
]


def perturb(interventions, seed: int = 0, gate_bias: float = 3.0) -> None:
    """Non-trivial A, b and open gates, so that the adapter visibly changes the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in interventions.layers:
            module = interventions[layer]
            module.source.weight.add_(0.5 * torch.randn_like(module.source.weight))
            module.source.bias.copy_(2.0 * torch.randn_like(module.source.bias))
            if module.gated:
                module.gate.weight.normal_(std=0.3)
                module.gate.bias.fill_(gate_bias)


@pytest.fixture
def editor(tiny):
    torch.manual_seed(0)
    ed = Editor(tiny.model, tiny.tokenizer, EditConfig(layers=[1, 3], rank=8, prompt_positions=P), [])
    perturb(ed.interventions)
    yield ed
    ed.attachment.detach()


def lm_head_logits(model):
    """Records the logits of every forward (the real lm_head output, not a stand-in)."""
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    return seen, handle


def full_forward_logits(editor, ids: list[int], prompt_len: int, interventions=None):
    mask = torch.zeros(1, len(ids), dtype=torch.bool)
    mask[0, max(0, prompt_len - P) :] = True  # last P prompt positions + every generated one
    with editor.attachment.intervene(mask, interventions=interventions):
        return editor.model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2], PROMPTS[1]], ids=["medium", "long", "short"])
def test_cached_decoding_equals_full_recomputation(editor, prompt):
    ids = encode_prompt(editor.tokenizer, prompt)
    n = 8
    seen, handle = lm_head_logits(editor.model)
    try:
        steps = list(stream(editor.model, [ids], n, editor.attachment, P, editor.pad_id))
    finally:
        handle.remove()
    generated = [int(t[0]) for t in steps]
    assert len(generated) == n
    cached = torch.stack([s[0] for s in seen])  # the head sees the last position only: [n, vocab]

    full = full_forward_logits(editor, ids + generated, len(ids))
    recomputed = full[len(ids) - 1 : len(ids) - 1 + n]
    assert recomputed.argmax(-1).tolist() == generated
    assert torch.allclose(cached, recomputed, atol=1e-4, rtol=1e-4), (cached - recomputed).abs().max()

    # the check is sensitive: the adapter matters, and so do the exact positions
    plain = editor.model(input_ids=torch.tensor([ids + generated])).logits[0][len(ids) - 1 : len(ids) - 1 + n]
    assert (plain - recomputed).abs().max() > 1e-2
    if len(ids) > P:
        wrong = torch.zeros(1, len(ids) + n, dtype=torch.bool)
        wrong[0, len(ids) :] = True  # forgets the prompt positions
        with editor.attachment.intervene(wrong):
            off = editor.model(input_ids=torch.tensor([ids + generated])).logits[0]
        assert (off[len(ids) - 1 : len(ids) - 1 + n] - recomputed).abs().max() > 1e-2


def test_generate_with_other_adapter_matches_swapped_in(editor):
    """`interventions=` generates from another adapter without swapping it in."""
    other = editor.new_interventions()
    perturb(other, seed=5)
    ids = [encode_prompt(editor.tokenizer, p) for p in PROMPTS]
    via_arg = generate(editor.model, editor.tokenizer, ids, 6, editor.attachment, P, stop_at_eos=False,
                       interventions=other)
    current = generate(editor.model, editor.tokenizer, ids, 6, editor.attachment, P, stop_at_eos=False)
    original = editor.interventions
    editor.attachment.swap(other)
    try:
        swapped = generate(editor.model, editor.tokenizer, ids, 6, editor.attachment, P, stop_at_eos=False)
    finally:
        editor.attachment.swap(original)
    assert via_arg == swapped
    assert via_arg != current


def test_batched_generation_equals_one_by_one(editor):
    batched = editor.generate(PROMPTS, max_new_tokens=8)
    single = [editor.generate([p], max_new_tokens=8)[0] for p in PROMPTS]
    assert batched == single
    assert batched != editor.generate(PROMPTS, max_new_tokens=8, edited=False)


def test_batched_teacher_forced_equals_one_by_one(editor):
    answers = ["Paris", "there, how are you today", "made clocks"]
    examples = [editor.encode(p, a) for p, a in zip(PROMPTS, answers)]
    assert len({len(e.prompt) for e in examples}) == 3

    batched = answer_argmax(editor, examples)
    single = [answer_argmax(editor, [e])[0] for e in examples]
    assert batched == single
    assert [len(b) for b in batched] == [len(e.answer) for e in examples]

    tf = teacher_forced(examples, P, editor.pad_id)
    with editor.attachment.intervene(tf.intervene):
        logits = editor.model(input_ids=tf.input_ids, attention_mask=tf.attention_mask).logits
    for row, e in enumerate(examples):
        one = teacher_forced([e], P, editor.pad_id)
        with editor.attachment.intervene(one.intervene):
            alone = editor.model(input_ids=one.input_ids, attention_mask=one.attention_mask).logits[0]
        got = logits[row][tf.targets[row] != -100]
        want = alone[one.targets[0] != -100]
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_teacher_forced_layout():
    from baft_core.encoding import Example

    tf = teacher_forced([Example([1, 2, 3, 4], [5, 6]), Example([7], [8, 9, 10])], positions=2, pad_id=0)
    assert tf.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]
    assert tf.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert tf.intervene.tolist() == [[False, False, True, True, True], [True, True, True, False, False]]
    assert tf.targets.tolist() == [[-100, -100, -100, 5, 6], [8, 9, 10, -100, -100]]


@pytest.mark.parametrize("layers", [[1, 3], [0, 2]], ids=["skips-lower-layers", "from-layer-0"])
def test_cached_prefix_batch_equals_full_forward(tiny, layers):
    torch.manual_seed(0)
    ed = Editor(tiny.model, tiny.tokenizer, EditConfig(layers=layers, rank=8, prompt_positions=P), [])
    try:
        perturb(ed.interventions, seed=1)
        prompts = PROMPTS + ["Hello world"]  # prompt lengths differ; one has no prefix at all
        answers = ["Paris", "there, how are you today", "made clocks", "!"]
        examples = [ed.encode(p, a) for p, a in zip(prompts, answers)]
        assert any(len(e.prompt) <= P for e in examples)
        batch = CachedBatch(ed.model, ed.attachment, ed.interventions, examples, P, ed.pad_id)
        logits, _, record = batch.forward()

        # Training feeds the whole answer (the last answer position is where the gates must
        # close), so the reference feeds it too; targets sit at the same positions.
        tf_targets = teacher_forced(examples, P, ed.pad_id).targets
        fed = [Example(e.prompt, e.answer + [ed.pad_id]) for e in examples]
        tf = teacher_forced(fed, P, ed.pad_id)
        keep = torch.zeros_like(tf.intervene)
        keep[:, : tf_targets.shape[1]] = tf_targets != -100
        tf.targets = torch.where(keep, tf.targets, torch.full_like(tf.targets, -100))
        with ed.attachment.intervene(tf.intervene, record=True) as full_record:
            full = ed.model(input_ids=tf.input_ids, attention_mask=tf.attention_mask).logits
        want = full[tf.targets != -100]
        assert batch.after_answer.sum().item() == len(examples)
        assert logits.shape == want.shape
        assert torch.equal(batch.targets, tf.targets[tf.targets != -100])
        assert torch.allclose(logits, want, atol=1e-4, rtol=1e-4), (logits - want).abs().max()
        # the gates saw the same inputs at the same positions
        for layer in layers:
            assert record[layer][0].shape == full_record[layer][0].shape
            assert torch.allclose(record[layer][1], full_record[layer][1], atol=1e-4)
        assert batch.rows.tolist() == tf.intervene.nonzero()[:, 0].tolist()

        # and the gradients wrt the adapter agree too (training is exact, not only the forward)
        ce = torch.nn.functional.cross_entropy(logits, batch.targets)
        grads = torch.autograd.grad(ce, list(ed.interventions.parameters()), allow_unused=True)
        with ed.attachment.intervene(tf.intervene):
            full = ed.model(input_ids=tf.input_ids, attention_mask=tf.attention_mask).logits
        ce_full = torch.nn.functional.cross_entropy(full[tf.targets != -100], batch.targets)
        grads_full = torch.autograd.grad(ce_full, list(ed.interventions.parameters()), allow_unused=True)
        for g, f in zip(grads, grads_full):
            if g is None or f is None:
                assert g is None and f is None
                continue
            assert torch.allclose(g, f, atol=1e-4, rtol=1e-3), (g - f).abs().max()
        # the model is left intact: no stand-in layers remain
        assert all(type(layer).__name__ != "_Replay" for layer in ed.attachment.decoder_layers)
    finally:
        ed.attachment.detach()


def test_mask_shape_mismatch_raises(editor):
    ids = torch.tensor([encode_prompt(editor.tokenizer, PROMPTS[0])])
    with editor.attachment.intervene(torch.ones(1, 2, dtype=torch.bool)):
        with pytest.raises(RuntimeError, match="does not match"):
            editor.model(input_ids=ids)


def test_continuations_are_the_unedited_greedy_words_and_start_unedited(tiny):
    """An ungated block is trained on what the unedited model says after the answer, decoded
    inside the batch's unedited pass; a fresh adapter is the identity, so its continuation
    log-probabilities equal the unedited ones; and with a trained adapter the batch's forward
    equals a full forward over prompt + answer + continuation."""
    torch.manual_seed(0)
    ed = Editor(tiny.model, tiny.tokenizer, EditConfig(layers=[1, 2, 3], rank=8), [])
    try:
        # answers of different lengths: decoded tokens follow padding inside the shorter rows
        examples = [ed.encode(p, a) for p, a in zip(PROMPTS[:3], ["Paris", "there, how are you", "made"])]
        eos = ed.tokenizer.eos_token_id
        for count in (3, 0):
            batch = CachedBatch(ed.model, ed.attachment, ed.interventions, examples, P, ed.pad_id, count, eos)
            said = generate(ed.model, ed.tokenizer, [e.prompt + e.answer for e in examples], count) if count else []
            for row, tokens in enumerate(said):
                assert batch.continuations[row] == (tokens[: tokens.index(eos)] if eos in tokens else tokens)
            assert any(batch.continuations) == bool(count)
            step = batch.forward()
            assert step.continuation.shape[0] == sum(len(c) + 1 for c in batch.continuations)
            assert torch.allclose(step.continuation, batch.unedited_continuation, atol=1e-4)

        batch = CachedBatch(ed.model, ed.attachment, ed.interventions, examples, P, ed.pad_id, 3, eos)
        perturb(ed.interventions, seed=2)
        logits, continuation, _ = batch.forward()
        fed = [Example(e.prompt, e.answer + c + [ed.pad_id]) for e, c in zip(examples, batch.continuations)]
        tf = teacher_forced(fed, P, ed.pad_id)
        with ed.attachment.intervene(tf.intervene):
            full = ed.model(input_ids=tf.input_ids, attention_mask=tf.attention_mask).logits
        start = [len(e.prompt) - 1 for e in examples]
        want_targets = torch.cat([full[r, s : s + len(e.answer)] for r, (s, e) in enumerate(zip(start, examples))])
        want_after = torch.cat(
            [full[r, s + len(e.answer) : s + len(e.answer) + len(c) + 1]
             for r, (s, e, c) in enumerate(zip(start, examples, batch.continuations))]
        )
        assert torch.allclose(logits, want_targets, atol=1e-4, rtol=1e-4)
        assert torch.allclose(continuation, torch.log_softmax(want_after, -1), atol=1e-4, rtol=1e-4)
    finally:
        ed.attachment.detach()


def test_training_steps_take_the_math_attention_kernel_on_bf16_cpus(tiny_dir):
    """On a CPU with bf16 activations the step runs torch's math attention (cheaper backward on
    a few tokens); it computes the same step as flash attention, up to bf16 rounding."""
    assert training_attention(torch.bfloat16, torch.device("cpu")) == SDPBackend.MATH
    assert training_attention(torch.float32, torch.device("cpu")) is None
    assert training_attention(torch.bfloat16, torch.device("cuda")) is None
    loaded = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    torch.manual_seed(0)
    ed = Editor(loaded.model, loaded.tokenizer, EditConfig(layers=[1, 3], rank=8, prompt_positions=P), [])
    perturb(ed.interventions)
    examples = [ed.encode(p, a) for p, a in zip(PROMPTS, ["Paris", "there, how are you", "made clocks"])]
    batch = CachedBatch(ed.model, ed.attachment, ed.interventions, examples, P, ed.pad_id)
    assert batch.attention_kernel == SDPBackend.MATH
    steps = {}
    for kernel in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        batch.attention_kernel = kernel
        logits = batch.forward().logits
        ce = torch.nn.functional.cross_entropy(logits.float(), batch.targets)
        steps[kernel] = (logits.float(), torch.autograd.grad(ce, list(ed.interventions.parameters()), allow_unused=True))
    (math_logits, math_grads), (flash_logits, flash_grads) = steps.values()
    assert torch.allclose(math_logits, flash_logits, atol=0.05, rtol=0.05)
    for math_grad, flash_grad in zip(math_grads, flash_grads):
        if math_grad is not None:
            assert torch.allclose(math_grad, flash_grad, atol=0.05 * flash_grad.abs().max().item() + 1e-6)
    ed.attachment.detach()


@pytest.mark.parametrize("top_p", [5e-324, 1e-30, 0.5])
def test_nucleus_sampling_keeps_the_top_token_however_small_top_p(top_p):
    """top_p below float32's range compares as 0 against the probabilities: the top token must
    still be kept, not an all-zero distribution (a 500 the API fuzzing found)."""
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]], dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        token = _next_tokens(logits, 1.0, top_p, generator)
        if top_p < 0.1:
            assert token.tolist() == [1, 0]
