"""The relation check: a routed block stays shut on its subject's other relations.

Routing opens a block on every prompt about its subject (routing.py), so an edit of Danielle
Darrieux's mother tongue also answered her profession and citizenship. When an edit arrives, the
editor puts its subject to a built-in list of other relations (`subject_probes.py`, and the
request's own `locality` prompts that name the subject) and keeps, beside its own prompt's, their
unedited states at the last prompt position of a middle layer (`EditConfig.relation_layer`), which
carries the relation as well as the subject. A prompt that routing lets into the block is held
against them there: the block stays shut when the prompt comes within `threshold` (cosine) of one
of the probes and is no nearer its edits' prompts than that probe by `margin`. This is BaFT's
input-dependent gate taken at the prompt level, with the probes as its negatives and a nearest-
neighbour rule in place of a logistic regression fitted on one positive: paraphrases that word the
relation otherwise (CounterFact's) are as far from the edit's prompt as other relations are, and a
fitted gate closed on them too (docs/method.md), while a prompt that reads like one of the probes is
one of the relations the edit must leave alone.

States are standardised by the mean of ordinary prompts' states at that layer and position
(`calibrate`) and kept as unit rows: in fp16 while their block trains, in int8 with one scale a row
once it is sealed (a sealed edit holds about 58 of them, half of its memory in fp16; the cosines
move by about 1e-3, far inside `margin`). Blocks without relation keys (sealed before this check,
or by an edit without probes) are never shut by it.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import appended, take_checkpoint_sizes
from .spelling import subject_ids

# The most subject tokens a block keeps to tell whether a prompt spells its subject: a longer
# subject is told by its last tokens.
SUBJECT_TOKENS = 32


def last_prompt_positions(prompt: torch.Tensor) -> torch.Tensor:
    """[batch]: the index of each row's last prompt position in a [batch, seq] mask."""
    seq = prompt.shape[1]
    return seq - 1 - prompt.flip(1).int().argmax(1)


def quantized(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n, d] as int8 [n, d] and the scale of each [n] (fp32): row ~ int8 * scale."""
    scale = rows.float().abs().amax(-1).clamp_min(1e-12) / 127
    return (rows.float() / scale[:, None]).round().to(torch.int8), scale


class RelationCheck(nn.Module):
    """Per sealed block, its edits' prompt states (`keys`, int8 with one scale a row in
    `key_scale`) and their probes' (`probes`, `probe_scale`) at decoder layer `layer`'s output,
    and the trainable block's awaiting its seal (`pending_*`, fp16)."""

    # Buffers (`__init__`)
    keys: torch.Tensor
    key_scale: torch.Tensor
    key_block: torch.Tensor
    probes: torch.Tensor
    probe_scale: torch.Tensor
    probe_block: torch.Tensor
    subjects: torch.Tensor
    subject_block: torch.Tensor
    pending_keys: torch.Tensor
    pending_probes: torch.Tensor
    pending_subjects: torch.Tensor
    threshold: torch.Tensor
    margin: torch.Tensor
    other_name_ratio: torch.Tensor
    center: torch.Tensor

    def __init__(self, hidden_size: int, layer: int, threshold: float, margin: float, other_name_ratio: float):
        super().__init__()
        self.layer = layer
        half = torch.float16
        self.register_buffer("keys", torch.zeros(0, hidden_size, dtype=torch.int8))
        self.register_buffer("key_scale", torch.zeros(0))
        self.register_buffer("key_block", torch.zeros(0, dtype=torch.long))
        self.register_buffer("probes", torch.zeros(0, hidden_size, dtype=torch.int8))
        self.register_buffer("probe_scale", torch.zeros(0))
        self.register_buffer("probe_block", torch.zeros(0, dtype=torch.long))
        # Each edit's subject as token ids, mid-text and at the start of a text, right-aligned
        # after -1s (`subject_rows`): whether a prompt spells its block's subject.
        self.register_buffer("subjects", torch.zeros(0, SUBJECT_TOKENS, dtype=torch.int32))
        self.register_buffer("subject_block", torch.zeros(0, dtype=torch.long))
        self.register_buffer("pending_keys", torch.zeros(0, hidden_size, dtype=half))
        self.register_buffer("pending_probes", torch.zeros(0, hidden_size, dtype=half))
        self.register_buffer("pending_subjects", torch.zeros(0, SUBJECT_TOKENS, dtype=torch.int32))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("margin", torch.tensor(float(margin)))
        self.register_buffer("other_name_ratio", torch.tensor(float(other_name_ratio)))
        self.register_buffer("center", torch.zeros(hidden_size))

    @property
    def enabled(self) -> bool:
        return float(self.threshold) > 0

    @property
    def num_bytes(self) -> int:
        held = (self.keys, self.key_scale, self.probes, self.probe_scale, self.subjects)
        return sum(t.numel() * t.element_size() for t in held)

    @torch.no_grad()
    def calibrate(self, center: torch.Tensor) -> None:
        """Standardise with the mean of ordinary prompts' states at the layer (a new tensor:
        forks share this buffer)."""
        self.center = center.to(self.center, copy=True)

    def unit(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(hidden.float() - self.center, dim=-1)

    @torch.no_grad()
    def add_pending(self, keys: torch.Tensor, probes: torch.Tensor, subjects: torch.Tensor) -> None:
        """The states [k, d] of edits just trained into the trainable block, of their probes
        [p, d], and their subjects' ids (`subject_rows`). New tensors: forks share these buffers."""
        self.pending_keys = torch.cat([self.pending_keys, self.unit(keys).to(self.pending_keys)])
        self.pending_probes = torch.cat([self.pending_probes, self.unit(probes).to(self.pending_probes)])
        self.pending_subjects = torch.cat([self.pending_subjects, subjects.to(self.pending_subjects)])

    @torch.no_grad()
    def seal(self, block: int) -> None:
        """The trainable block became sealed block `block`."""
        device = self.keys.device
        if len(self.pending_probes):  # a block without probes is never shut: no keys needed
            keys, key_scale = quantized(self.pending_keys)
            probes, probe_scale = quantized(self.pending_probes)
            self.key_block = appended(self.key_block, torch.full((len(keys),), block, device=device))
            self.keys, self.key_scale = appended(self.keys, keys), appended(self.key_scale, key_scale)
            self.probe_block = appended(self.probe_block, torch.full((len(probes),), block, device=device))
            self.probes, self.probe_scale = appended(self.probes, probes), appended(self.probe_scale, probe_scale)
            subjects = self.pending_subjects
            self.subject_block = appended(self.subject_block, torch.full((len(subjects),), block, device=device))
            self.subjects = appended(self.subjects, subjects)
        self.pending_keys, self.pending_probes = self.pending_keys[:0], self.pending_probes[:0]
        self.pending_subjects = self.pending_subjects[:0]

    @torch.no_grad()
    def shut(self, hidden: torch.Tensor, prompt: torch.Tensor, tokens: torch.Tensor, opened: torch.Tensor) -> torch.Tensor:
        """`opened` [batch, blocks] without the blocks whose probes a row's last prompt position
        reads like (`hidden` [batch, seq, d]: the layer's output; `prompt` [batch, seq]; `tokens`
        [batch, seq]: the ids)."""
        rows, blocks = opened.nonzero(as_tuple=True)
        if not len(self.probes) or not len(rows):
            return opened
        checked = torch.isin(blocks, self.probe_block)
        rows, blocks = rows[checked], blocks[checked]
        if not len(rows):
            return opened
        last = self.unit(hidden[torch.arange(len(hidden), device=hidden.device), last_prompt_positions(prompt)])
        # Only the open blocks' rows: a prompt opens a few blocks of thousands.
        probes, keys = torch.isin(self.probe_block, blocks), torch.isin(self.key_block, blocks)
        count = opened.shape[1]
        probe_scores = (last @ self.probes[probes].float().T) * self.probe_scale[probes]
        key_scores = (last @ self.keys[keys].float().T) * self.key_scale[keys]
        nearest_probe = _best_by_block(probe_scores, self.probe_block[probes], count)
        nearest_key = _best_by_block(key_scores, self.key_block[keys], count)
        probe, key = nearest_probe[rows, blocks], nearest_key[rows, blocks]
        close = (probe > self.threshold) & (probe > key + self.margin)
        # A prompt that names the subject otherwise (routing let it in on another spelling or on
        # part of the name) differs from the probes and the edit's prompt alike, which all spell
        # the subject, and the edit's prompt is seldom the nearest by much even where the prompt
        # asks the edited relation: there a probe must be clearly nearer, its distance at most
        # 1 / other_name_ratio of the edit prompt's.
        clearly = 1 - key > self.other_name_ratio * (1 - probe)
        doubtful = (close & ~clearly).nonzero().flatten() if self.other_name_ratio > 1 else rows[:0]
        if len(doubtful):
            named = self.names_subject(tokens, prompt, rows[doubtful], blocks[doubtful])
            close[doubtful[~named]] = False
        shut = opened.clone()
        shut[rows[close], blocks[close]] = False
        return shut

    def names_subject(self, tokens: torch.Tensor, prompt: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """[pairs]: whether prompt `rows[i]` spells the subject of block `blocks[i]` (one of its
        edits'), or the block holds no subjects (sealed before they were kept: the check as it
        was)."""
        named = torch.ones(len(rows), dtype=torch.bool)
        for i, (row, block) in enumerate(zip(rows.tolist(), blocks.tolist())):
            spellings = self.subjects[self.subject_block == block]
            if len(spellings):
                ids = tokens[row][prompt[row]].tolist()
                named[i] = any(_contains(ids, [t for t in s if t >= 0]) for s in spellings.tolist())
        return named.to(rows.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        growing = (
            "keys", "key_scale", "key_block", "probes", "probe_scale", "probe_block", "pending_keys", "pending_probes",
            "subjects", "subject_block", "pending_subjects",
        )
        take_checkpoint_sizes(self, state_dict, prefix, growing)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def subject_rows(tokenizer, subject: str) -> torch.Tensor:
    """[2, SUBJECT_TOKENS]: the subject's last token ids mid-text (after a space) and at the start
    of a text, each right-aligned after -1s."""
    rows = torch.full((2, SUBJECT_TOKENS), -1, dtype=torch.int32)
    at_start = tuple(tokenizer(subject.strip(), add_special_tokens=False).input_ids)
    for row, ids in enumerate((subject_ids(tokenizer, subject), at_start)):
        kept = ids[-SUBJECT_TOKENS:]
        rows[row, SUBJECT_TOKENS - len(kept) :] = torch.tensor(kept, dtype=torch.int32)
    return rows


def _contains(ids: list[int], part: list[int]) -> bool:
    """Whether `part` occurs in `ids` as a run."""
    return bool(part) and any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def _best_by_block(scores: torch.Tensor, block: torch.Tensor, blocks: int) -> torch.Tensor:
    """[batch, blocks]: the highest of `scores` [batch, n] over the n rows of each block (`block`
    [n]), -inf for a block without rows."""
    best = scores.new_full((scores.shape[0], blocks), float("-inf"))
    return best.scatter_reduce(1, block.expand_as(scores), scores, "amax")
