"""Locality on a downstream task: whether edits change how the model answers questions that have
nothing to do with them (PIQA, physical commonsense), measured as the task measures the model.

The edit benchmarks' own locality prompts are facts in the edits' format ("The official language
of X is"); a task in another format reads other states. Each PIQA item is two solutions to a goal;
the model picks the one whose tokens it finds likelier after "Question: {goal}\\nAnswer:" (the
layout of lm-evaluation-harness's `piqa`, its `acc`: summed log-probabilities). Reported: the
accuracy of the unedited and the edited model, the share of items whose pick the edits changed,
and the share of goals that open some edit's block (routing.py, relations.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .encoding import Example, encode, teacher_forced
from .metrics import open_blocks, teacher_forced_routes

BATCH = 16


@dataclass
class Choice:
    """A question, its candidate answers, and the index of the right one."""

    question: str
    answers: list[str]
    label: int

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nAnswer:"


def load_piqa(path: str | Path, labels: str | Path | None = None, limit: int | None = None) -> list[Choice]:
    """PIQA's `goal, sol1, sol2` lines and its label file (one 0/1 a line; default: the same
    name with `_labels.lst` for `.jsonl`)."""
    path = Path(path)
    labels = Path(labels) if labels else path.with_name(path.stem + "_labels.lst")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    answers = [int(line) for line in labels.read_text().split()]
    if len(answers) != len(records):
        raise ValueError(f"{path}: {len(records)} items but {len(answers)} labels in {labels}")
    items = [Choice(r["goal"], [r["sol1"], r["sol2"]], label) for r, label in zip(records, answers)]
    return items[:limit] if limit else items


@torch.no_grad()
def answer_log_likelihoods(editor, examples: list[Example], edited: bool) -> list[float]:
    """The summed log-probability of each example's answer tokens after its prompt, teacher-forced,
    through the edited model (routing decided on the prompt, as in generation) or the unedited one."""
    scores: list[float] = []
    device = editor.device
    for start in range(0, len(examples), BATCH):
        chunk = examples[start : start + BATCH]
        tf = teacher_forced(chunk, editor.config.prompt_positions, editor.pad_id)
        mask = tf.intervene.to(device) if edited else None
        with editor.lock, editor.attachment.intervene(mask, routes=teacher_forced_routes(tf, device)):
            logits = editor.model(input_ids=tf.input_ids.to(device), attention_mask=tf.attention_mask.to(device)).logits
        # Only the answer positions: the vocabulary-wide log-softmax of every position of 16
        # prompts would be hundreds of megabytes.
        answer = tf.targets != -100
        log_probs = logits[answer.to(device)].float().log_softmax(-1).cpu()
        picked = log_probs.gather(-1, tf.targets[answer].unsqueeze(-1)).squeeze(-1)
        rows = answer.nonzero()[:, 0]
        scores += torch.zeros(len(chunk)).index_add_(0, rows, picked).tolist()
    return scores


def choice_locality(editor, items: list[Choice]) -> dict[str, float | int]:
    """The task's accuracy unedited and edited, the share of items whose pick changed, and the
    share of their prompts that open some block."""
    examples = [encode(editor.tokenizer, item.prompt, answer, editor.context) for item in items for answer in item.answers]
    first = [0]  # each item's first example
    for item in items:
        first.append(first[-1] + len(item.answers))
    picks = {}
    for edited in (False, True):
        scores = answer_log_likelihoods(editor, examples, edited)
        picks[edited] = [max(range(len(item.answers)), key=lambda k: scores[first[i] + k]) for i, item in enumerate(items)]
    opened = open_blocks(editor, [item.prompt for item in items]).any(1) if editor.interventions.sealed_blocks else None
    count = len(items)
    return {
        "items": count,
        "accuracy_unedited": sum(p == item.label for p, item in zip(picks[False], items)) / count,
        "accuracy_edited": sum(p == item.label for p, item in zip(picks[True], items)) / count,
        "pick_changed": sum(a != b for a, b in zip(picks[False], picks[True])) / count,
        "prompts_opening_a_block": float(opened.float().mean()) if opened is not None else 0.0,
    }
