"""Continuous batching (generation.ContinuousBatch): rows that join a running batch at step
boundaries, leave as they finish, and use different adapter versions in one batch must get the
tokens they get when decoded alone."""
from __future__ import annotations

import pytest
import torch
from test_core_generation import PROMPTS, perturb

from baft_core import EditConfig, Editor
from baft_core.encoding import encode_prompt
from baft_core.generation import ContinuousBatch, Row, stream

P = 3
MORE_PROMPTS = PROMPTS + [
    "Water boils at",
    "The first person to walk on the moon was",
    "Once upon a time",
]


def sealed_version(parent, seed: int, keys: torch.Tensor, threshold: float, span: int):
    """A child version of `parent` with one more sealed block (route keys `keys` [k, d] at
    `threshold`, answer window `span`) and a fresh, perturbed trainable block: versions of one
    history share their sealed blocks."""
    child = parent.fork()
    perturb(child, seed=seed)
    child.router.add_pending(keys, torch.arange(len(keys)), torch.full((len(keys),), threshold))
    child.router.widen_window(span)
    child.seal()
    perturb(child, seed=seed + 100)
    child.eval()
    return child


@pytest.fixture(scope="module")
def versions(tiny):
    """Four adapters on the tiny model: no sealed block, a block every prompt opens (window 2),
    a second block on top that only the first prompt opens (window 3), and a sibling of that one
    with a closed block; routing on."""
    torch.manual_seed(0)
    config = EditConfig(layers=[1, 3], rank=8, prompt_positions=P, block_edits=1, route_threshold=0.5)
    editor = Editor(tiny.model, tiny.tokenizer, config, [])
    perturb(editor.interventions)
    v0 = editor.interventions
    d = tiny.model.config.hidden_size
    v1 = sealed_version(v0, 1, torch.randn(2, d), -1.0, 2)  # cosine > -1: always open
    first, _ = editor.routing_layer_output([encode_prompt(tiny.tokenizer, MORE_PROMPTS[0])])
    v2 = sealed_version(v1, 2, first[:, -1], 0.9, 3)  # opened by the first prompt's own state
    v3 = sealed_version(v1, 3, torch.randn(1, d), 0.99, 3)
    yield editor, [v0, v1, v2, v3]
    editor.attachment.detach()


def alone(editor, ids: list[int], adapter, n: int, **sampling) -> list[int]:
    eos = {editor.tokenizer.eos_token_id}
    out = []
    positions = editor.config.prompt_positions
    for step in stream(editor.model, [ids], n, editor.attachment, positions, editor.pad_id, eos, interventions=adapter, **sampling):
        out.append(int(step[0]))
        if out[-1] in eos:
            break
    return out


def test_versions_differ_and_route_per_row(versions):
    editor, adapters = versions
    ids = encode_prompt(editor.tokenizer, MORE_PROMPTS[0])
    outputs = [alone(editor, ids, a, 8) for a in adapters]
    assert len({tuple(o) for o in outputs}) == len(adapters)
    batch = ContinuousBatch(editor.model, editor.attachment, P, editor.pad_id)
    # ("Hi" is left out: a one-token prompt has no position routing reads, and opens nothing.)
    rows = [Row(encode_prompt(editor.tokenizer, MORE_PROMPTS[i]), 4, adapters[2]) for i in (0, 2, 3)]
    batch.join(rows)
    opened = [row.blocks_open.tolist() for row in rows]
    assert opened[0] == [True, True]  # its own key opens the second block
    assert [o[0] for o in opened] == [True] * 3 and not all(o[1] for o in opened)


def test_joining_leaving_and_mixed_versions_equal_one_by_one(versions):
    editor, adapters = versions
    tokenizer = editor.tokenizer
    plan = []  # (prompt ids, adapter, max_new_tokens), in order of arrival
    for i, prompt in enumerate(MORE_PROMPTS * 2):
        plan.append((encode_prompt(tokenizer, prompt), adapters[i % 4], 3 + (5 * i) % 9))
    expected = [alone(editor, ids, a, n) for ids, a, n in plan]
    batch = ContinuousBatch(editor.model, editor.attachment, P, editor.pad_id)
    rows = [Row(ids, n, a, eos_ids=frozenset({tokenizer.eos_token_id})) for ids, a, n in plan]
    # Arrivals: 2 rows, then 3 after two steps, then one at a time; rows leave as they finish.
    arrivals = [rows[:2], [], [], rows[2:5]] + [[r] for r in rows[5:]]
    widths = set()
    for joining in arrivals:
        if joining:
            batch.join(joining)
        widths.add(len({id(r.interventions) for r in batch.rows}))
        batch.step()
    while len(batch):
        batch.step()
    assert max(widths) >= 3  # rows on several versions did share steps
    assert [r.tokens for r in rows] == expected
    assert all(r.finish_reason == ("stop" if r.tokens[-1] == tokenizer.eos_token_id else "length") for r in rows)


def test_sampled_rows_with_seeds_equal_one_by_one(versions):
    editor, adapters = versions
    ids = [encode_prompt(editor.tokenizer, p) for p in MORE_PROMPTS[:4]]
    options = dict(temperature=0.9, top_p=0.8)
    expected = [
        alone(editor, p, adapters[i], 6, generator=torch.Generator().manual_seed(i), **options)
        for i, p in enumerate(ids)
    ]
    rows = [
        Row(p, 6, adapters[i], generator=torch.Generator().manual_seed(i), eos_ids=frozenset({editor.tokenizer.eos_token_id}), **options)
        for i, p in enumerate(ids)
    ]
    batch = ContinuousBatch(editor.model, editor.attachment, P, editor.pad_id)
    batch.join(rows[:1])
    batch.step()
    batch.join(rows[1:])
    while len(batch):
        batch.step()
    assert [r.tokens for r in rows] == expected


def test_cancelled_rows_leave_and_the_rest_go_on(versions):
    editor, adapters = versions
    ids = [encode_prompt(editor.tokenizer, p) for p in MORE_PROMPTS[:3]]
    rows = [Row(p, 10, adapters[1]) for p in ids]
    batch = ContinuousBatch(editor.model, editor.attachment, P, editor.pad_id)
    batch.join(rows)
    batch.step()
    rows[1].cancelled = True
    batch.step()
    assert len(batch) == 2 and len(rows[1].tokens) == 2
    while len(batch):
        batch.step()
    assert rows[0].tokens == alone(editor, ids[0], adapters[1], 10)
    assert rows[2].tokens == alone(editor, ids[2], adapters[1], 10)


@pytest.mark.integration
def test_bundled_model_batched_greedy_equals_one_by_one_per_version(bundled):
    """On the real SmolLM2 with a real edit: rows of the unedited and the edited version, joining
    at different steps, decode what each decodes alone."""
    from baft_core import EditRequest

    torch.manual_seed(0)
    editor = Editor(bundled.model, bundled.tokenizer, EditConfig(max_steps=25))
    try:
        before = editor.interventions
        prompt = "What is the product made by UniFirst?"
        editor.edit(EditRequest(prompt, "unmanned aircraft", subject="UniFirst"))
        after = editor.interventions
        prompts = [prompt, "The tallest mountain in the world is", "Shakespeare wrote the play",
                   "What will be the product of UniFirst?", "The capital of France is", "Hi"]
        plan = [(encode_prompt(bundled.tokenizer, p), v, 6 + 2 * i) for i, p in enumerate(prompts) for v in (before, after)]
        expected = [alone(editor, ids, v, n) for ids, v, n in plan]
        assert expected[0] != expected[1]  # the edit shows
        eos = frozenset({bundled.tokenizer.eos_token_id})
        rows = [Row(ids, n, v, eos_ids=eos) for ids, v, n in plan]
        batch = ContinuousBatch(editor.model, editor.attachment, editor.config.prompt_positions, editor.pad_id)
        for start in range(0, len(rows), 3):
            batch.join(rows[start : start + 3])
            batch.step()
        while len(batch):
            batch.step()
        assert [r.tokens for r in rows] == expected
    finally:
        editor.attachment.detach()


def test_bf16_rows_decode_as_alone(tiny_sharp_dir):
    """In bf16 a row's attention over a left-padded batch differed from its attention alone by
    an ulp, enough to flip greedy near-ties (ContinuousBatch attends row by row instead)."""
    from baft_core import load_model

    loaded = load_model(str(tiny_sharp_dir), device="cpu", dtype="bfloat16")
    torch.manual_seed(0)
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig(layers=[1, 2], rank=4, prompt_positions=P), [])
    try:
        other = editor.interventions.fork()
        perturb(other, seed=7)
        adapters = [editor.interventions, other]
        plan = [(encode_prompt(loaded.tokenizer, p), adapters[i % 2], 20) for i, p in enumerate(MORE_PROMPTS * 2)]
        expected = [alone(editor, ids, a, n) for ids, a, n in plan]
        rows = [Row(ids, n, a) for ids, a, n in plan]
        batch = ContinuousBatch(editor.model, editor.attachment, P, editor.pad_id)
        for row in rows:  # one joins at every step: every row sits behind different padding
            batch.join([row])
            batch.step()
        while len(batch):
            batch.step()
        assert [r.tokens for r in rows] == expected
    finally:
        editor.attachment.detach()
