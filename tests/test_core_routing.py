"""Prompt-level routing in front of sealed blocks: subject keys, which blocks a prompt opens, the
decision held through decoding, and route keys in checkpoints."""
from __future__ import annotations

import pytest
import torch
from test_core_editor import make_editor

from baft_core import EditRequest
from baft_core.encoding import Example, encode_prompt, teacher_forced
from baft_core.generation import generate
from baft_core.metrics import teacher_forced_routes
from baft_core.prompt_starts import PromptStarts
from baft_core.routing import UNLIMITED, Router, Routes, answer_offsets, subject_token, subject_tokens


def _no_tokens(prompt: torch.Tensor) -> torch.Tensor:
    """Token ids for routing tests whose keys spell nothing."""
    return torch.zeros(prompt.shape, dtype=torch.long)


EDITS = [
    EditRequest("The mother tongue of Danielle Darrieux is", "Japanese", subject="Danielle Darrieux"),
    EditRequest("The capital of Norway is", "Lima", subject="Norway"),
]


def test_subject_token_is_the_subjects_last_token(tiny):
    tokenizer = tiny.tokenizer
    prompt = "The mother tongue of Danielle Darrieux is"
    ids = encode_prompt(tokenizer, prompt)
    index = subject_token(tokenizer, prompt, "Danielle Darrieux")
    assert tokenizer.decode(ids[: index + 1]).endswith("Darrieux")
    assert subject_token(tokenizer, prompt, None) == len(ids) - 1
    assert subject_token(tokenizer, prompt, "Marie Curie") == len(ids) - 1  # not in the prompt
    # A subject that opens the prompt: its key is never the first token (an attention sink).
    assert subject_token(tokenizer, "Norway is a country", "Norway") == 1


@pytest.mark.parametrize("route_contexts", [None, ["Notes:\n", "Here:"]])
def test_route_states_are_the_subjects_state_in_the_whole_prompt(tiny_sharp, route_contexts, monkeypatch):
    """Route keys are computed on each prompt cut after its subject, and after a context from the
    context's kept KV; where the tokens at the seam merge (a trailing newline) that prompt is
    computed whole. Either way the state is the one the whole prompt has."""
    starts_used = []
    last_positions = PromptStarts.last_positions

    def recorded(self, prompts, starts, layer, count):
        starts_used.extend(s for s in starts if s)
        return last_positions(self, prompts, starts, layer, count)

    monkeypatch.setattr(PromptStarts, "last_positions", recorded)
    overrides = {} if route_contexts is None else {"route_contexts": route_contexts}
    ed = make_editor(tiny_sharp, block_edits=1, **overrides)
    try:
        keys = ed.route_keys.states(EDITS)
        contexts = [encode_prompt(tiny_sharp.tokenizer, c) for c in ed.config.route_contexts]
        after_a_context = [
            c for r in EDITS for c, text in zip(contexts, ed.config.route_contexts)
            if encode_prompt(tiny_sharp.tokenizer, f"{text} {r.prompt}")[: len(c)] == c
        ]
        assert starts_used == after_a_context
        if route_contexts is None:
            assert len(starts_used) == len(EDITS) * len(contexts)
        texts_per_edit = 2 + len(ed.config.route_contexts)  # alone, after each context, the subject alone
        assert keys.owners.tolist() == [0] * texts_per_edit + [1] * texts_per_edit
        row = 0
        for request in EDITS:
            texts = [request.prompt, *(f"{c} {request.prompt}" for c in ed.config.route_contexts), request.subject]
            states = [ed.routing_layer_output([encode_prompt(tiny_sharp.tokenizer, t)])[0][0] for t in texts]
            spans = [subject_tokens(tiny_sharp.tokenizer, t, request.subject) for t in texts]
            at_start = [t.startswith(request.subject) for t in texts]
            for hidden, (last, span), start in zip(states, spans, at_start):
                torch.testing.assert_close(keys.states[row], hidden[last].float(), atol=1e-4, rtol=1e-4)
                assert keys.tokens[row] == span
                # The earlier subject tokens, nearest first, as the first text of its kind
                # (mid-text or at the start) has them.
                source = at_start.index(start)
                source_last, source_span = spans[source]
                earlier = min(source_span, ed.config.route_tokens) - 1
                expected = states[source][source_last - earlier : source_last].flip(0).float()
                torch.testing.assert_close(keys.prefixes[keys.prefix[row], :earlier], expected, atol=1e-4, rtol=1e-4)
                row += 1
    finally:
        ed.attachment.detach()


def test_router_opens_blocks_within_the_threshold():
    router = Router(4, threshold=0.8, layer=0)
    router.add_pending(torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([0]))
    router.seal(0)
    router.add_pending(torch.tensor([[0, 1.0, 0, 0], [0, 0, 1.0, 0]]), torch.tensor([1, 2]))  # two edits
    router.seal(1)
    sink, pad = [5.0, 5, 5, 5], [0.0, 0, 0, 0]  # a row's first position is never read
    hidden = torch.tensor(
        [
            [sink, [2.0, 0.1, 0, 0], [0, 0, 0, 1.0]],
            [pad, sink, [0, 0, 0.9, 0.1]],
            [pad, sink, [0, 0, 0, 1.0]],
        ]
    )
    prompt = torch.tensor([[True, True, True], [False, True, True], [False, True, True]])
    # Block 2 was sealed before routing existed (no keys): it stays open for every row.
    opened = router.open_blocks(hidden, prompt, blocks=3, tokens=_no_tokens(prompt))
    assert opened.tolist() == [[True, False, True], [False, True, True], [False, False, True]]
    assert router.pending.shape[0] == 0 and router.key_block.tolist() == [0, 1, 1]
    assert router.key_edit.tolist() == [0, 1, 2] and router.pending_edit.shape[0] == 0


def test_keys_held_in_bf16_open_the_same_blocks():
    """Route keys held in the model's bf16 (`hold_keys_in`) open the same blocks as in fp32 for
    states not within a rounding of a threshold, new keys follow, and a router already in the
    dtype keeps its tensors (forks share them)."""
    generator = torch.Generator().manual_seed(0)
    routers = []
    for dtype in (torch.float32, torch.bfloat16):
        router = Router(64, threshold=0.5, layer=0)
        router.hold_keys_in(dtype)
        for block in range(40):
            router.add_pending(torch.randn(3, 64, generator=torch.Generator().manual_seed(block)), torch.full((3,), block))
            router.seal(block)
        routers.append(router)
    fp32, bf16 = routers
    assert bf16.keys.dtype == torch.bfloat16 and torch.allclose(bf16.keys.float(), fp32.keys, atol=4e-3)
    keys = bf16.keys
    bf16.hold_keys_in(torch.bfloat16)
    assert bf16.keys is keys
    # Prompts near some keys (a key plus noise) and far from all.
    near = fp32.keys[torch.randint(0, len(fp32.keys), (16,), generator=generator)] * 3
    hidden = torch.cat([near + 0.8 * torch.randn(16, 64, generator=generator), torch.randn(16, 64, generator=generator)])
    hidden = torch.stack([torch.zeros(32, 64), hidden], 1)  # each row's first position is never read
    prompt = torch.ones(32, 2, dtype=torch.bool)
    scores = fp32.key(hidden[:, 1]) @ fp32.keys.T - fp32.key_threshold
    assert (scores.abs() > 1e-2).all()  # no state within a rounding of a threshold
    opened = fp32.open_blocks(hidden, prompt, 40, _no_tokens(prompt))
    assert opened.any() and not opened.all()
    assert torch.equal(bf16.open_blocks(hidden.bfloat16(), prompt, 40, _no_tokens(prompt)), opened)


def test_key_thresholds_stay_above_unrelated_prompts():
    router = Router(2, threshold=0.8, layer=0)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    unrelated = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.3, -1.0]]), dim=-1)
    thresholds = router.thresholds(keys, unrelated, margin=0.05)
    # Key 0 is near the first unrelated position (cos 0.98): capped below 1 so its own prompt
    # still routes. Key 1 is far from both: the floor. Key 2: 0.05 above cos 0.78 -> the floor.
    assert torch.allclose(thresholds, torch.tensor([0.98, 0.8, 0.8]))
    router.add_pending(keys, torch.tensor([0, 1, 2]), thresholds)
    router.seal(0)
    assert torch.equal(router.key_threshold, thresholds)
    # cos 0.97 with key 0: above the floor, not above that key's own threshold.
    opened = router.open_blocks(torch.tensor([[[0.0, 0.0], [1.0, 0.25]]]), torch.ones(1, 2, dtype=torch.bool), 1, torch.zeros(1, 2, dtype=torch.long))
    assert not opened.any()


def test_a_key_opens_only_after_its_earlier_subject_tokens():
    """A key that reads three subject tokens opens its block where a position matches it and the
    two before match its earlier tokens (nearest first) at the looser prefix threshold; a key
    that reads one token ignores what comes before."""
    router = Router(4, threshold=0.8, layer=0, subject_tokens=3, prefix_threshold=0.3)
    earlier = torch.tensor([[[0, 1.0, 0, 0], [0, 0, 1.0, 0]]])  # the token before the last, then the one before it
    router.add_pending(torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([0]), None, torch.tensor([3]), torch.tensor([0]), earlier)
    router.seal(0)
    router.add_pending(torch.tensor([[0, 0, 0, 1.0]]), torch.tensor([1]), None, torch.tensor([1]), torch.tensor([0]))
    router.seal(1)
    assert router.key_prefix.tolist() == [0, -1] and router.prefixes.dtype == torch.float16

    def opens(*positions):
        hidden = torch.tensor([[[9.0, -9, -9, 9], *positions]])  # a first position unlike the tokens
        return router.open_blocks(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool), 2, torch.zeros(hidden.shape[:2], dtype=torch.long))[0].tolist()

    assert opens([0, 0, 1.0, 0], [0, 0.9, 0.5, 0], [1.0, 0, 0, 0]) == [True, False]  # cosines 1, 0.87, 1
    assert opens([0, 0, 0, 0.1], [0, 1.0, 0, 0], [1.0, 0, 0, 0]) == [False, True]  # two before: no match
    assert opens([0, 1.0, 0, 0], [1.0, 0, 0, 0]) == [False, False]  # one earlier token: the first before it
    assert opens([0, 0, 0, 1.0]) == [False, True]  # the one-token key: nothing before it is read


def test_earlier_subject_tokens_may_stand_apart_by_the_gap():
    """A key's earlier subject tokens must each match one of the positions before its match,
    within as many positions as it has earlier tokens plus `prefix_gap` (a middle name between
    them); a token that is missing keeps the block shut."""
    hidden_first = [9.0, -9, -9, 9]  # a first position unlike the tokens
    earlier_a, earlier_b, last, other = [0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]

    def opens(gap: int, *positions: list[float]) -> bool:
        router = Router(4, threshold=0.8, layer=0, subject_tokens=3, prefix_threshold=0.3, prefix_gap=gap)
        earlier = torch.tensor([[earlier_a, earlier_b]])  # the token before the last, then the one before it
        router.add_pending(torch.tensor([last]), torch.tensor([0]), None, torch.tensor([3]), torch.tensor([0]), earlier)
        router.seal(0)
        hidden = torch.tensor([[hidden_first, *positions]])
        return bool(router.open_blocks(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool), 1, torch.zeros(hidden.shape[:2], dtype=torch.long))[0, 0])

    in_a_row = (earlier_b, earlier_a, last)
    apart = (earlier_b, other, other, earlier_a, last)  # two tokens between the earlier ones
    assert opens(0, *in_a_row) and opens(2, *in_a_row)
    assert not opens(0, *apart) and not opens(1, *apart) and opens(2, *apart)
    assert not opens(2, other, earlier_a, last)  # the first subject token is missing



def test_a_key_may_need_only_some_of_its_earlier_tokens():
    """With `prefix_needed` 1 a key that reads three subject tokens opens its block where one of
    its two earlier tokens is found (a name that drops or respells the other); a key that reads
    two still needs its one; None needs them all."""
    hidden_first = [9.0, -9, -9, 9]  # a first position unlike the tokens
    earlier_a, earlier_b, last, other = [0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]

    def opens(needed: int | None, tokens: int, *positions: list[float]) -> bool:
        router = Router(4, threshold=0.8, layer=0, subject_tokens=3, prefix_threshold=0.3, prefix_gap=2, prefix_needed=needed)
        earlier = torch.tensor([[earlier_a, earlier_b]])  # the token before the last, then the one before it
        router.add_pending(torch.tensor([last]), torch.tensor([0]), None, torch.tensor([tokens]), torch.tensor([0]), earlier)
        router.seal(0)
        hidden = torch.tensor([[hidden_first, *positions]])
        return bool(router.open_blocks(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool), 1, torch.zeros(hidden.shape[:2], dtype=torch.long))[0, 0])

    assert opens(1, 3, other, earlier_a, last) and opens(1, 3, earlier_b, other, last)
    assert not opens(None, 3, other, earlier_a, last) and opens(None, 3, earlier_b, earlier_a, last)
    assert not opens(1, 3, other, other, last)  # neither earlier token
    assert opens(1, 2, other, earlier_a, last) and not opens(1, 2, earlier_b, other, last)

class _Words:
    """Token classes of a made-up vocabulary: id 1 goes on the word before it, the rest start one."""

    def continues_word(self, ids: torch.Tensor) -> torch.Tensor:
        return ids == 1


def test_a_keys_earlier_token_in_the_matched_word_must_be_found_in_place():
    """With `prefix_word` a key that matches the last piece of a word (" Or"+"tis") opens its
    block only where the piece before it in that word is the key's own (one earlier token of
    another word, "Fernanda", still suffices); without it, any one of its earlier tokens does."""
    hidden_first = [9.0, -9, -9, 9]
    piece, first_name, last, other = [0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]

    def opens(prefix_word: bool, positions: list[list[float]], ids: list[int]) -> bool:
        router = Router(
            4, threshold=0.8, layer=0, subject_tokens=3, prefix_threshold=0.3, prefix_gap=2, prefix_needed=1,
            prefix_word=prefix_word,
        )
        earlier = torch.tensor([[piece, first_name]])  # the token before the last, then the one before it
        router.add_pending(torch.tensor([last]), torch.tensor([0]), None, torch.tensor([3]), torch.tensor([0]), earlier)
        router.seal(0)
        hidden = torch.tensor([[hidden_first, *positions]])
        tokens = torch.tensor([[0, *ids]])
        prompt = torch.ones(hidden.shape[:2], dtype=torch.bool)
        return bool(router.open_blocks(hidden, prompt, 1, tokens, _Words())[0, 0])  # type: ignore[arg-type]

    # "Fernanda Ortis": the first name, then the last name in two pieces.
    assert opens(True, [first_name, piece, last], [0, 0, 1]) and opens(False, [first_name, piece, last], [0, 0, 1])
    # "F Ortis": the first name dropped, the word's own piece in place.
    assert opens(True, [other, piece, last], [0, 0, 1])
    # Another word ending in the same piece ("Xtis" after "Fernanda"): only the first name is found.
    assert opens(False, [first_name, other, last], [0, 0, 1])
    assert not opens(True, [first_name, other, last], [0, 0, 1])
    # The same states, the last token a word of its own: the piece before it is another word's.
    assert opens(True, [first_name, other, last], [0, 0, 0])


def test_a_sealed_block_acts_only_on_prompts_it_routes(tiny_sharp):
    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.8)
    try:
        ed.edit(EDITS[0])
        interventions = ed.interventions
        # One key for the prompt alone and one after each generic context, all naming edit 0.
        keys_per_edit = 2 + len(ed.config.route_contexts)  # and the subject alone
        assert interventions.sealed_blocks == 1 and interventions.router.key_block.tolist() == [0] * keys_per_edit
        assert interventions.router.key_edit.tolist() == [0] * keys_per_edit
        prompts = [EDITS[0].prompt, "Bananas are rich in"]
        examples = [ed.encode(p, "potassium") for p in prompts]
        tf = teacher_forced(examples, ed.config.prompt_positions, ed.pad_id)
        unrouted = interventions.fork()
        unrouted.router.threshold = torch.tensor(0.0)  # routing off: the block acts everywhere

        def logits(routes, edited=True, adapter=None):
            mask = tf.intervene if edited else None
            with torch.no_grad(), ed.attachment.intervene(mask, routes=routes, interventions=adapter):
                return ed.model(input_ids=tf.input_ids, attention_mask=tf.attention_mask).logits

        routes = Routes(prompt=tf.prompt)
        routed, unedited = logits(routes), logits(None, edited=False)
        assert routes.open.tolist() == [[True], [False]]
        assert not torch.allclose(routed[0], unedited[0])  # the edit's prompt opens its block
        assert torch.equal(routed[1], unedited[1])  # an unrelated prompt is exactly unedited
        assert not torch.allclose(logits(None, adapter=unrouted)[1], unedited[1])  # else it would change
        # Without routes, a forward is routed on its own intervened positions: still unedited.
        assert torch.equal(logits(None)[1], unedited[1])
    finally:
        ed.attachment.detach()


def test_routes_are_decided_on_the_prompt_and_held_while_decoding(tiny_sharp):
    """Cached decoding equals recomputing the whole sequence with routes read off the prompt and
    each position placed in the answer (the blocks' windows)."""
    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.5)
    try:
        for request in EDITS:
            ed.edit(request)
        prompts = [EDITS[0].prompt, "Tell me about Danielle Darrieux and Norway"]
        ids = [encode_prompt(ed.tokenizer, p) for p in prompts]
        generated = generate(ed.model, ed.tokenizer, ids, 5, ed.attachment, ed.config.prompt_positions, stop_at_eos=False)
        for prompt, new in zip(ids, generated):
            sequence = torch.tensor([prompt + new[:-1]])
            intervene = torch.zeros_like(sequence, dtype=torch.bool)
            intervene[0, len(prompt) - ed.config.prompt_positions :] = True
            prompt_mask = torch.zeros_like(intervene)
            prompt_mask[0, : len(prompt)] = True
            routes = Routes(prompt=prompt_mask, offsets=answer_offsets(prompt_mask, torch.ones_like(sequence)))
            with torch.no_grad(), ed.attachment.intervene(intervene, routes=routes):
                logits = ed.model(input_ids=sequence).logits
            assert logits[0, len(prompt) - 1 :].argmax(-1).tolist() == new
    finally:
        ed.attachment.detach()


def test_answer_offsets_count_the_answer_tokens_fed():
    prompt = torch.tensor([[True, True, False, False, False], [False, True, True, True, False]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])  # right- and left-padded rows
    assert answer_offsets(prompt, attention).tolist() == [[0, 0, 1, 2, 2], [0, 0, 0, 0, 1]]


def recorded_weights(ed, request, after: list[int]):
    """The weights (the trainable block's, then the sealed ones') at every intervened position of
    the request's prompt, its answer and `after` it, teacher-forced, with each position's answer
    offset and the answer's length."""
    example = ed.encode(request.prompt, request.target)
    tf = teacher_forced([Example(example.prompt, example.answer + after)], ed.config.prompt_positions, ed.pad_id)
    routes = teacher_forced_routes(tf, "cpu")
    with torch.no_grad(), ed.attachment.intervene(tf.intervene, record=True, routes=routes) as record:
        ed.model(input_ids=tf.input_ids, attention_mask=tf.attention_mask)
    return record[ed.layers[0]][0], routes.offsets[tf.intervene], len(example.answer)


@pytest.mark.parametrize("window", [True, False])
def test_a_sealed_block_acts_within_its_answers_window(tiny_sharp, window):
    """On a prompt it opens, a sealed block acts at the last P prompt positions and on the
    answer's first T - 1 tokens, which predict the rest of it; from the answer's last token on it
    is off. Without the window it acts on every position, and it is trained to leave what
    follows the answer as it was (the continuation term)."""
    request = EditRequest("The mother tongue of Danielle Darrieux is", "Ada Lovelace's own", subject="Danielle Darrieux")
    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.8, answer_window=window)
    try:
        result = ed.edit(request)
        weights, offsets, span = recorded_weights(ed, request, after=[5, 6, 7])
        weights = weights[:, ed.interventions.rank :]  # the sealed block's
        assert ed.interventions.router.block_span.tolist() == [span if window else UNLIMITED]
        assert span > 1 and weights.shape[1] == ed.interventions.rank
        inside = offsets < span if window else torch.ones_like(offsets, dtype=torch.bool)
        assert inside.any() and weights[inside].eq(1).all() and weights[~inside].eq(0).all()
        assert ("continuation" in result.losses) == (not window)
    finally:
        ed.attachment.detach()


def test_the_trainable_block_acts_within_its_window_while_it_trains(tiny_sharp):
    """A block that holds more than one edit is trained and acts, before it is sealed, where it
    will act once sealed (within the longest answer of its edits so far)."""
    request = EditRequest("The mother tongue of Danielle Darrieux is", "Ada Lovelace's own", subject="Danielle Darrieux")
    ed = make_editor(tiny_sharp, block_edits=2, route_threshold=0.8)
    try:
        ed.edit(request)
        weights, offsets, span = recorded_weights(ed, request, after=[5, 6, 7])
        assert ed.interventions.sealed_blocks == 0 and int(ed.interventions.router.pending_span) == span
        trainable = weights[:, : ed.interventions.rank]
        assert trainable[offsets < span].gt(0).all() and trainable[offsets >= span].eq(0).all()
    finally:
        ed.attachment.detach()


def test_a_block_holding_several_edits_spans_its_longest_answer(tiny_sharp):
    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.8)
    try:
        ed.edit_batch(EDITS)
        longest = max(len(ed.encode(r.prompt, r.target).answer) for r in EDITS)
        assert ed.interventions.router.block_span.tolist() == [longest]
        assert not len(ed.interventions.router.pending_span)  # the fresh block has no window yet
    finally:
        ed.attachment.detach()


def test_route_keys_survive_checkpoints(tiny_sharp, tmp_path):
    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.8)
    try:
        for request in EDITS:
            ed.edit(request)
        router = ed.interventions.router
        keys, spans = router.keys.clone(), router.block_span.clone()
        tokens, prefix, prefixes = router.key_tokens.clone(), router.key_prefix.clone(), router.prefixes.clone()
        prompts = [r.prompt for r in EDITS] + ["Bananas are rich in"]
        expected = ed.generate(prompts, max_new_tokens=6)
        ed.save(tmp_path, "tiny")
        ed.reset()
        ed.load(tmp_path, "tiny")
        router = ed.interventions.router
        per_edit = 2 + len(ed.config.route_contexts)
        assert torch.equal(router.keys, keys) and router.key_block.tolist() == [0] * per_edit + [1] * per_edit
        assert torch.equal(router.key_tokens, tokens) and (tokens > 1).any()
        assert torch.equal(router.key_prefix, prefix) and torch.equal(router.prefixes, prefixes)
        assert torch.equal(router.block_span, spans)
        assert router.key_edit.tolist() == router.key_block.tolist() and router.layer == ed.interventions.routing_layer
        assert (router.key_threshold >= 0.8).all() and len(router.key_threshold) == 2 * per_edit
        assert abs(float(router.threshold) - 0.8) < 1e-6
        assert ed.generate(prompts, max_new_tokens=6) == expected
    finally:
        ed.attachment.detach()


def test_a_bf16_model_holds_its_route_keys_in_bf16_through_checkpoints(tiny_sharp_dir, tmp_path):
    """On a model that computes in bf16 the route keys are held, stored and reloaded in bf16, and
    the reloaded adapter answers as before; an adapter of fp32 keys is converted when attached."""
    from baft_core import load_model

    loaded = load_model(str(tiny_sharp_dir), device="cpu", dtype="bfloat16")
    ed = make_editor(loaded, block_edits=1, route_threshold=0.8)
    try:
        for request in EDITS:
            ed.edit(request)
        keys = ed.interventions.router.keys
        assert keys.dtype == torch.bfloat16 and len(keys)
        prompts = [r.prompt for r in EDITS] + ["Bananas are rich in"]
        expected = ed.generate(prompts, max_new_tokens=6)
        ed.save(tmp_path, "tiny")
        ed.reset()
        ed.load(tmp_path, "tiny")
        assert torch.equal(ed.interventions.router.keys, keys)
        assert ed.generate(prompts, max_new_tokens=6) == expected
        fp32 = ed.interventions.fork()
        fp32.router.hold_keys_in(torch.float32)
        ed.load_state(fp32, ed.history)
        assert ed.interventions.router.keys.dtype == torch.bfloat16
        assert ed.generate(prompts, max_new_tokens=6) == expected
    finally:
        ed.attachment.detach()


def test_edits_that_share_a_route_are_replayed_as_neighbours(tiny_sharp):
    from test_core_editor import first_loss

    ed = make_editor(tiny_sharp, block_edits=1, max_steps=60, stop_loss=0.05)
    first = EditRequest("The mother tongue of Danielle Darrieux is", "Japanese", subject="Danielle Darrieux")
    second = EditRequest("The mother tongue of Danielle Darrieux was", "Greek", subject="Danielle Darrieux")
    try:
        ed.edit(first)
        ed.edit(EDITS[1])
        keys = ed.route_keys.states([second])
        assert keys.owners.tolist() == [0] * (2 + len(ed.config.route_contexts))
        assert ed.route_keys.neighbours(keys) == [first]  # the same subject in the same contexts
        ed.edit(second)
        # The second block opens on the first prompt too, and was trained to leave it alone.
        assert first_loss(ed, first) < 0.2 and first_loss(ed, second) < 0.2
    finally:
        ed.attachment.detach()


def reloaded_in_older_format(ed, tmp_path, change) -> tuple[list[str], list[str]]:
    """Saves the editor's adapter, rewrites it with `change` as an older format wrote it and
    loads it back; returns the prompts compared and what the adapter generated before."""
    from checkpoint_support import rewrite_adapter

    prompts = [r.prompt for r in EDITS] + ["Bananas are rich in"]
    expected = ed.generate(prompts, max_new_tokens=6)
    ed.save(tmp_path, "tiny")
    rewrite_adapter(tmp_path, change)
    ed.reset()
    ed.load(tmp_path, "tiny")
    return prompts, expected


# What format 9 added: segment rows and router buffers of the keys' earlier subject tokens.
ROUTE_TOKEN_ROWS = ("route_key_tokens", "route_key_prefixes", "route_prefixes")
ROUTE_TOKEN_BUFFERS = tuple(
    f"router.{name}" for name in ("pending_tokens", "pending_prefix", "pending_prefixes", "prefix_threshold")
)


def test_format_3_checkpoints_still_route(tiny_sharp, tmp_path):
    """Format 3 routed at the first edited layer with the gates' standardisation, one key per edit
    in edit order, and stored neither the router's statistics nor the keys' edits."""
    from checkpoint_support import strip_segments

    def format_3(metadata, tensors):
        metadata = strip_segments(tmp_path, metadata, ("route_key_edits", "answer_span", *ROUTE_TOKEN_ROWS))
        del metadata["routing_layer"]
        new_buffers = ("router.center", "router.scale", "router.pending_edit", "router.pending_span", *ROUTE_TOKEN_BUFFERS)
        return metadata, {k: v for k, v in tensors.items() if k not in new_buffers}

    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.5, route_layer=1, route_contexts=[], route_tokens=1)
    try:
        for request in EDITS:
            ed.edit(EditRequest(request.prompt, request.target))  # no subject: one key, the prompt's
        router, first = ed.interventions.router, ed.interventions[1]
        # The fresh trainable block is the identity whatever its gates read: give it the
        # router's statistics, as format 3 kept them there.
        first.gate_center.copy_(router.center)
        first.gate_scale.copy_(router.scale)
        router.block_span = torch.full((2,), UNLIMITED)  # nor did it store answer windows
        prompts, expected = reloaded_in_older_format(ed, tmp_path, format_3)
        router = ed.interventions.router
        assert router.layer == 1 and router.key_edit.tolist() == [0, 1]
        assert torch.equal(router.center, ed.interventions[1].gate_center)
        assert ed.generate(prompts, max_new_tokens=6) == expected
    finally:
        ed.attachment.detach()


def test_format_4_checkpoints_load_blocks_without_windows(tiny_sharp, tmp_path):
    """Format 4 stored no answer windows: its blocks act on every position, as they did."""
    from checkpoint_support import strip_segments

    def format_4(metadata, tensors):
        metadata = strip_segments(tmp_path, metadata, ("answer_span",))
        return metadata, {k: v for k, v in tensors.items() if k != "router.pending_span"}

    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.5)
    try:
        for request in EDITS:
            ed.edit(request)
        ed.interventions.router.block_span = torch.full((2,), UNLIMITED)
        prompts, expected = reloaded_in_older_format(ed, tmp_path, format_4)
        assert ed.interventions.router.block_span.tolist() == [UNLIMITED] * 2
        assert ed.generate(prompts, max_new_tokens=6) == expected
    finally:
        ed.attachment.detach()


def test_fresh_adapters_are_standardised_with_the_unrelated_prompts(tiny_sharp):
    """The gates' and the router's statistics come from the unrelated prompts, are computed once
    for every fresh adapter, and follow a change of prompts; the unrelated route keys behind the
    key thresholds follow the router's standardisation even when it is written in place."""
    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.5, route_layer=1, route_contexts=[])
    layer = ed.layers[0]

    def standardisations():
        router = ed.interventions.router
        return ed.interventions[layer].gate_center.clone(), router.center.clone(), router.scale.clone()

    def expected():
        routing = ed.unrelated.routing_states(1)
        return ed.unrelated.features()[layer].float().mean(0), routing.mean(0), routing.std(0).clamp_min(1e-3)

    try:
        ed.edit(EDITS[0])
        first = standardisations()
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(first, expected()))
        ed.reset()
        ed.edit(EDITS[1])
        assert all(torch.equal(a, b) for a, b in zip(first, standardisations()))

        router = ed.interventions.router
        router.center.add_(1.0)  # as a loaded state writes its buffers
        keys = router.key(ed.unrelated.routing_states(1))
        assert torch.equal(ed.unrelated.routes(router), keys)
        ed.reset()  # that write reached the router only, not the statistics the next adapter gets
        ed.edit(EDITS[1])
        assert all(torch.equal(a, b) for a, b in zip(first, standardisations()))

        ed.set_unrelated_prompts(["Bananas are rich in", "The tallest mountain in Europe is"])
        ed.reset()
        ed.edit(EDITS[0])
        assert not torch.allclose(standardisations()[1], first[1])
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(standardisations(), expected()))
    finally:
        ed.attachment.detach()


def test_prepare_leaves_the_first_edit_nothing_to_compute_once(tiny_sharp, monkeypatch):
    """After `prepare` (the service's worker calls it at start) the first edit reuses the
    unrelated prompts' states and statistics and the route contexts' KV, and decodes nothing."""
    import baft_core.unrelated as unrelated_module

    ed = make_editor(tiny_sharp, block_edits=1, route_threshold=0.5, route_layer=1)
    try:
        ed.prepare()
        pool = ed.unrelated

        def prepared():
            return pool.features(), pool.routing_states(1)

        before = prepared()
        contexts = [(1, tuple(encode_prompt(tiny_sharp.tokenizer, c))) for c in ed.config.route_contexts]
        assert all(context in ed.prompt_starts for context in contexts)
        computed = []
        keep = PromptStarts.keep

        def recording(self, starts, layer):
            computed.extend((layer, s) for s in starts if (layer, s) not in self)
            return keep(self, starts, layer)

        def refuse(*args, **kwargs):
            raise AssertionError("computed again what prepare computed")

        monkeypatch.setattr(PromptStarts, "keep", recording)
        monkeypatch.setattr(unrelated_module, "generate", refuse)
        monkeypatch.setattr(unrelated_module, "statistics", refuse)
        assert ed.edit(EDITS[0]).steps >= 1
        assert ed.unrelated is pool and all(a is b for a, b in zip(before, prepared()))
        assert not set(contexts) & set(computed)
    finally:
        ed.attachment.detach()
