"""Decoding with interventions: the last P prompt positions at prefill, then every generated
token, reusing the KV cache so that each step runs only the new token."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Iterator

import torch
from transformers import DynamicCache

from .attach import Attachment, InterventionSet, final_logits
from .encoding import left_padded, pad_token_id, positions_from_mask
from .routing import Routes


def _next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        # The top token always stays, also where top_p underflows float32 (5e-324 compares as 0).
        keep[..., 0] = True
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    attachment: Attachment | None = None,
    positions: int = 3,
    pad_id: int = 0,
    eos_ids: set[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    interventions: InterventionSet | None = None,
    lock: AbstractContextManager | None = None,
) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, step by step; rows that finished repeat pad_id.
    `interventions` picks an adapter other than the attached one (default: the one attached when
    decoding starts, kept to the end even if another is published meanwhile); `lock` is held per
    step. Routes are decided on the prompt at prefill and held for every generated token, each
    open block acting within its window (routing.py)."""
    device = next(model.parameters()).device
    input_ids, attention = left_padded(prompts, pad_id)
    input_ids, attention = input_ids.to(device), attention.to(device)
    width = input_ids.shape[1]
    intervene = attention.bool() & (torch.arange(width, device=device) >= width - positions)
    position_ids = positions_from_mask(attention)
    cache = DynamicCache(config=model.config)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids or []), dtype=torch.long, device=device)
    if attachment is not None and interventions is None:
        interventions = attachment.interventions
    routes = Routes(prompt=attention.bool(), offsets=torch.zeros_like(attention))
    for fed in range(1, max_new_tokens + 1):
        edited = nullcontext()
        if attachment is not None:
            edited = attachment.intervene(intervene, interventions=interventions, routes=routes)
        with lock or nullcontext(), edited:
            hidden = model.base_model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            logits = final_logits(model, hidden[:, -1])  # 2-D: see final_logits
        token = _next_tokens(logits, temperature, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        yield token
        done |= torch.isin(token, eos)
        if bool(done.all()):
            return
        routes.prompt = None
        input_ids = token.unsqueeze(-1)
        routes.offsets = torch.full_like(input_ids, fed)  # the answer tokens fed so far
        attention = torch.cat([attention, torch.ones_like(input_ids)], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        intervene = torch.ones_like(input_ids, dtype=torch.bool)


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    attachment: Attachment | None = None,
    positions: int = 3,
    stop_at_eos: bool = True,
    **sampling,
) -> list[list[int]]:
    """New token ids for each prompt (without the prompt, without padding after EOS)."""
    eos = {tokenizer.eos_token_id} if stop_at_eos and tokenizer.eos_token_id is not None else set()
    rows: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step in stream(
        model, prompts, max_new_tokens, attachment, positions, pad_token_id(tokenizer), eos, **sampling
    ):
        for row, token in enumerate(step.tolist()):
            if not finished[row]:
                rows[row].append(token)
                finished[row] = token in eos
    return rows
