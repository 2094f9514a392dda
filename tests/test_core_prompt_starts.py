"""Prompt starts (prompt_starts.py): a prompt's state read over its start's kept KV is the state of
the whole prompt computed at once."""
from __future__ import annotations

import pytest
import torch

from baft_core import prompt_starts
from baft_core.encoding import encode_prompt, left_padded
from baft_core.prefix_cache import layer_output
from baft_core.prompt_starts import PromptStarts
from baft_core.subject_probes import probe_prompts

SUBJECT = "Danielle Darrieux"
PROMPT = f"The mother tongue of {SUBJECT} is"


def _whole(model, prompts: list[list[int]], layer: int) -> torch.Tensor:
    """Each prompt alone, in one forward: the layer's output at its last token."""
    rows = []
    for ids in prompts:
        input_ids, attention = left_padded([ids], 0)
        rows.append(layer_output(model.model, model.model.model.layers[layer], input_ids, attention)[0, -1])
    return torch.stack(rows).float()


def _starts(tokenizer, prompts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    starts = []
    for prompt, tokens in zip(prompts, ids):
        at = prompt.find(SUBJECT)
        start = encode_prompt(tokenizer, prompt[:at] if at > 0 else SUBJECT)
        starts.append(start if tokens[: len(start)] == start and len(start) < len(tokens) else [])
    return ids, starts


@torch.no_grad()
def test_states_over_kept_starts_equal_whole_prompts(tiny_sharp):
    prompts = [PROMPT, *probe_prompts(PROMPT, SUBJECT, 64), "Water boils at"]
    ids, starts = _starts(tiny_sharp.tokenizer, prompts)
    assert sum(map(bool, starts)) > len(prompts) // 2  # most probes share a start
    assert any(s and ids[i][: len(s)] == encode_prompt(tiny_sharp.tokenizer, SUBJECT) for i, s in enumerate(starts))
    shared = PromptStarts(tiny_sharp.model, tiny_sharp.model.model.layers, kept=8)
    states = shared.last_states(ids, starts, 2)
    assert torch.allclose(states, _whole(tiny_sharp, ids, 2), atol=1e-4, rtol=1e-4)
    # Kept starts (at most `kept`) give the same states at the next call; another layer has its own.
    assert len(shared) == 8
    assert torch.allclose(shared.last_states(ids, starts, 2), states, atol=1e-4, rtol=1e-4)
    assert torch.allclose(shared.last_states(ids, starts, 1), _whole(tiny_sharp, ids, 1), atol=1e-4, rtol=1e-4)


def test_a_start_must_begin_its_prompt_and_be_shorter(tiny_sharp):
    shared = PromptStarts(tiny_sharp.model, tiny_sharp.model.model.layers)
    with pytest.raises(ValueError, match="shorter beginning"):
        shared.last_states([[5, 6, 7]], [[5, 6, 7]], 1)
    with pytest.raises(ValueError, match="shorter beginning"):
        shared.last_states([[5, 6, 7]], [[6]], 1)


@torch.no_grad()
def test_last_positions_after_a_start_are_the_whole_prompts_and_zeros_before_it(tiny_sharp):
    """Route keys read a prompt's last tokens after a route context kept as a start: each is the
    whole prompt's state there, and a position inside the start reads zeros."""
    tokenizer, layer, count = tiny_sharp.tokenizer, 2, 3
    context = encode_prompt(tokenizer, "Here is a fact:")
    prompts = [context + encode_prompt(tokenizer, f" {text}") for text in (PROMPT, "Norway")]
    prompts.append(encode_prompt(tokenizer, PROMPT))
    starts = [context, context, []]
    shared = PromptStarts(tiny_sharp.model, tiny_sharp.model.model.layers)
    shared.keep([tuple(context)], layer)  # as the editor keeps its route contexts before the first edit
    assert (layer, tuple(context)) in shared and len(shared) == 1
    states = shared.last_positions(prompts, starts, layer, count)
    assert states.shape == (3, count, tiny_sharp.model.config.hidden_size)
    for row, (ids, start) in enumerate(zip(prompts, starts)):
        input_ids, attention = left_padded([ids], 0)
        whole = layer_output(tiny_sharp.model, tiny_sharp.model.model.layers[layer], input_ids, attention)[0].float()
        after = len(ids) - len(start)  # tokens computed after the start
        for k in range(count):
            position = len(ids) - count + k
            if position >= len(start):
                assert torch.allclose(states[row, k], whole[position], atol=1e-4, rtol=1e-4)
            else:
                assert after < count and not states[row, k].any()
    assert len(encode_prompt(tokenizer, " Norway")) < count  # the case of zeros before the text


@torch.no_grad()
def test_packs_split_where_they_must_and_the_mask_agrees_with_the_segments(tiny_sharp, monkeypatch):
    """Prompts split over several packs (a start new in one pack is kept for the next) read the
    same states as in one pack; so does a model without SDPA, which attends over the whole pack
    under the segments' mask."""
    prompts = [PROMPT, *probe_prompts(PROMPT, SUBJECT, 64)]
    ids, starts = _starts(tiny_sharp.tokenizer, prompts)
    whole = _whole(tiny_sharp, ids, 2)
    one_pack = PromptStarts(tiny_sharp.model, tiny_sharp.model.model.layers).last_states(ids, starts, 2)
    assert torch.allclose(one_pack, whole, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(prompt_starts, "PACK_TOKENS", 16)
    split = PromptStarts(tiny_sharp.model, tiny_sharp.model.model.layers)
    passes: list = []
    monkeypatch.setattr(split, "_packed", _counted(split._packed, passes))
    assert torch.allclose(split.last_states(ids, starts, 2), whole, atol=1e-4, rtol=1e-4)
    assert len(passes) > 3
    monkeypatch.setattr(tiny_sharp.model.config, "_attn_implementation", "eager")
    masked = PromptStarts(tiny_sharp.model, tiny_sharp.model.model.layers).last_states(ids, starts, 2)
    assert torch.allclose(masked, whole, atol=1e-4, rtol=1e-4)


def _counted(method, calls: list):
    def counted(*args, **kwargs):
        calls.append(args)
        return method(*args, **kwargs)

    return counted
