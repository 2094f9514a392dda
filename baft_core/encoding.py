"""Tokenising prompt/answer pairs and laying them out in padded batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Example:
    prompt: list[int]
    answer: list[int]


def context_limit(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 2048


def encode_prompt(tokenizer, prompt: str, limit: int | None = None) -> list[int]:
    if not prompt or not prompt.strip():
        raise ValueError("prompt is empty")
    ids = tokenizer(prompt.rstrip(), add_special_tokens=True).input_ids
    if limit is not None and len(ids) > limit:
        raise ValueError(f"prompt is {len(ids)} tokens, longer than the model's context of {limit}")
    return ids


def encode(tokenizer, prompt: str, answer: str, limit: int | None = None) -> Example:
    """Answer tokens as they follow the prompt: a space, then the answer (EasyEdit's layout)."""
    if not answer or not answer.strip():
        raise ValueError("answer/target is empty")
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids
    if limit is not None and len(prompt_ids) + len(answer_ids) > limit:
        raise ValueError(
            f"prompt and answer are {len(prompt_ids) + len(answer_ids)} tokens, longer than the "
            f"model's context of {limit}"
        )
    return Example(prompt_ids, answer_ids)


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


@dataclass
class TeacherForced:
    """prompt + answer[:-1], right-padded. Intervened: the last P prompt positions and every
    answer position fed in. `targets[i, t]` is the token position t must predict, -100 if none.
    `prompt` marks the prompt positions (what routing reads)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    intervene: torch.Tensor
    targets: torch.Tensor
    prompt: torch.Tensor


def teacher_forced(examples: list[Example], positions: int, pad_id: int) -> TeacherForced:
    width = max(len(e.prompt) + len(e.answer) - 1 for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    intervene = torch.zeros((batch, width), dtype=torch.bool)
    targets = torch.full((batch, width), -100, dtype=torch.long)
    prompt = torch.zeros((batch, width), dtype=torch.bool)
    for row, e in enumerate(examples):
        seq = e.prompt + e.answer[:-1]
        n, p = len(seq), len(e.prompt)
        input_ids[row, :n] = torch.tensor(seq)
        attention[row, :n] = 1
        intervene[row, max(0, p - positions) : n] = True
        targets[row, p - 1 : p - 1 + len(e.answer)] = torch.tensor(e.answer)
        prompt[row, :p] = True
    return TeacherForced(input_ids, attention, intervene, targets, prompt)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
    return input_ids, attention


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
    return input_ids, attention


def positions_from_mask(attention: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids that skip padding; `offset` [batch] adds the length of a cached prefix."""
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    if offset is not None:
        position_ids = position_ids + offset.unsqueeze(-1)
    return position_ids
