"""Last-position states of prompts whose starts recur, each start's KV computed once.

The relation check puts an edit's subject to about 58 relations and reads each prompt's state at
one middle layer (relations.py). About half of those prompts' tokens are starts that recur: the
text before the subject in a template ("The name of the father of") is the same at every edit,
and the templates that open with the subject share it. Route keys read an edit's prompt after
each route context ("Here is a fact:") at the routing layer. The unedited KV of such starts up to
the layer is computed once and kept (the least recently used dropped first), so that a prompt
costs the tokens after its start.

A call's prompts go through the model packed into one sequence, not as a padded batch: each
prompt's tokens after its start are a segment that attends to its start and, causally, to itself.
A start not yet kept is a segment of the same pass, which the prompts that open with it attend to,
and its KV is kept from there. These prompts are a few tokens after their starts and vary in
length: padded to the longest of a batch, a quarter of the work went to pads, and the new starts'
own pass paid every layer's fixed cost once more. Attention runs segment by segment (each over
the few keys it may read), not over the pack under a mask, which would cost its square.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .prefix_cache import attention_switched, kv_layers, layer_output

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer up to the read one: keys, values [1, heads, len, dim]
Start = tuple[int, ...]


class Segments(NamedTuple):
    """A pack's n segments, each padded to the longest (L tokens, S keys)."""

    queries: torch.Tensor  # [n, L] the pack positions of each segment's tokens (0 past its end)
    keys: torch.Tensor  # [n, S] the key columns it reads: its start's, then its own (0 past them)
    attends: torch.Tensor  # [n, 1, L, S] which of those keys each token attends to
    real: torch.Tensor  # [n, L] which of `queries` are tokens

    @classmethod
    def build(cls, firsts: list[int], lengths: list[int], starts: list[tuple[int, int]], prefix: int) -> Segments:
        """Segment i: `lengths[i]` tokens from pack position `firsts[i]` (key column prefix +
        that), after its start's `starts[i]` = (first key column, length)."""
        first, length = torch.tensor(firsts), torch.tensor(lengths)
        start_first, start_length = (torch.tensor(column) for column in zip(*starts))
        token = torch.arange(int(length.max()))
        key = torch.arange(int((start_length + length).max()))
        real = token < length[:, None]
        queries = torch.where(real, first[:, None] + token, 0)
        own = key - start_length[:, None]  # [n, S]: the token of its own a key column is, < 0 in the start
        keys = torch.where(own < 0, start_first[:, None] + key, prefix + first[:, None] + own)
        keys = torch.where(own < length[:, None], keys, 0)
        attends = (own[:, None, :] < 0) | ((own[:, None, :] <= token[None, :, None]) & (own < length[:, None])[:, None, :])
        attends &= real[:, :, None]
        attends[:, :, 0] |= ~real  # a padding row attends somewhere: its output is dropped
        return cls(queries, keys, attends[:, None], real)

    def to(self, device: torch.device) -> Segments:
        return Segments(*(t.to(device) for t in self))

    def mask(self, queries: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
        """The same as an additive mask [1, 1, queries, columns] over the whole pack."""
        allowed = torch.zeros(queries, columns, dtype=torch.bool, device=self.keys.device)
        rows = self.queries[:, :, None].expand(-1, -1, self.keys.shape[1])
        cols = self.keys[:, None, :].expand_as(rows)
        take = self.attends[:, 0] & self.real[:, :, None]
        allowed[rows[take], cols[take]] = True
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


SEGMENT_ATTENTION = "baft_segments"


def _segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, segments=None, **_):
    """query [1, heads, pack, d], key and value [1, kv heads, columns, d]: each segment over its
    own keys (`Segments`); the output [1, pack, heads, d]."""
    assert segments is not None
    q = query[0][:, segments.queries].transpose(0, 1)  # [n, heads, L, d]
    k, v = (t[0][:, segments.keys].transpose(0, 1) for t in (key, value))
    attended, _ = sdpa_attention_forward(module, q, k, v, segments.attends, dropout=0.0, scaling=scaling)
    out = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
    out[0, segments.queries[segments.real]] = attended[segments.real]
    return out, None


AttentionInterface.register(SEGMENT_ATTENTION, _segment_attention)


# The most tokens one pass computes (a longer prompt goes alone): the mask over a pack, which a
# model without SDPA attends under, grows with its square.
PACK_TOKENS = 512


class PromptStarts:
    """`kept`: the most starts whose KV is held (a start read at two layers counts twice)."""

    def __init__(self, model, decoder_layers: nn.ModuleList, kept: int = 256):
        self.model, self.decoder_layers, self.kept = model, decoder_layers, kept
        self._kv: OrderedDict[tuple[int, Start], KV] = OrderedDict()

    def __len__(self) -> int:
        """How many starts' KV is kept."""
        return len(self._kv)

    def __contains__(self, kept: tuple[int, Start]) -> bool:
        """Whether the KV of (layer, start) is kept."""
        return kept in self._kv

    def last_states(self, prompts: list[list[int]], starts: list[list[int]], layer: int) -> torch.Tensor:
        """The unedited output [n, d] of decoder layer `layer` at each prompt's last token.
        `starts[i]`: tokens that `prompts[i]` begins with and that other prompts begin with too
        ([] for none), shorter than it."""
        return self.last_positions(prompts, starts, layer, 1)[:, 0]

    @torch.no_grad()
    def last_positions(self, prompts: list[list[int]], starts: list[list[int]], layer: int, count: int) -> torch.Tensor:
        """`last_states` at each prompt's last `count` tokens [n, count, d], zeros first where
        fewer tokens follow its start."""
        for prompt, start in zip(prompts, starts, strict=True):
            if len(start) >= len(prompt) or prompt[: len(start)] != start:
                raise ValueError("a start must be a shorter beginning of its prompt")
        keys = [tuple(s) for s in starts]
        self._mark_used(keys, layer)
        parts, begin = [], 0
        while begin < len(prompts):
            end = self._pack_end(prompts, keys, layer, begin)
            parts.append(self._packed(prompts[begin:end], keys[begin:end], [], layer, count))
            begin = end
        self._drop_least_used()  # after the packs: they read this call's starts
        return torch.cat(parts).float()

    @torch.no_grad()
    def keep(self, starts: list[Start], layer: int) -> None:
        """Computes and keeps the KV of the starts not yet kept; marks the others recently used."""
        self._mark_used(starts, layer)
        new = [s for s in dict.fromkeys(starts) if s and (layer, s) not in self._kv]
        pack: list[Start] = []
        for start in new:
            if pack and sum(map(len, pack)) + len(start) > PACK_TOKENS:
                self._packed([], [], pack, layer, 1)
                pack = []
            pack.append(start)
        if pack:
            self._packed([], [], pack, layer, 1)
        self._drop_least_used()

    def _mark_used(self, starts: list[Start], layer: int) -> None:
        for start in dict.fromkeys(starts):
            if (layer, start) in self._kv:
                self._kv.move_to_end((layer, start))

    def _drop_least_used(self) -> None:
        while len(self._kv) > self.kept:
            self._kv.popitem(last=False)

    def _pack_end(self, prompts: list[list[int]], starts: list[Start], layer: int, begin: int) -> int:
        """Where the pack of prompts from `begin` on ends: the tokens after their starts and their
        new starts' fit PACK_TOKENS (at least one prompt)."""
        size, new = 0, set()
        for end in range(begin, len(prompts)):
            start = starts[end]
            cost = len(prompts[end]) - len(start)
            fresh = bool(start) and (layer, start) not in self._kv and start not in new
            cost += len(start) if fresh else 0
            if end > begin and size + cost > PACK_TOKENS:
                return end
            size += cost
            if fresh:
                new.add(start)
        return len(prompts)

    def _packed(
        self, prompts: list[list[int]], starts: list[Start], also_keep: list[Start], layer: int, count: int
    ) -> torch.Tensor:
        """One pass: the output [len(prompts), count, d] at each prompt's last `count` tokens
        (zeros where fewer follow its start); the starts not yet kept, and `also_keep`, are kept."""
        kept = list(dict.fromkeys(s for s in starts if s and (layer, s) in self._kv))
        new = list(dict.fromkeys([*also_keep, *(s for s in starts if s and (layer, s) not in self._kv)]))
        # Key columns: the kept starts' KV first, then the pass's own tokens.
        spans: dict[Start, tuple[int, int]] = {}
        prefix = 0
        for start in kept:
            spans[start], prefix = (prefix, len(start)), prefix + len(start)
        tokens: list[int] = []
        positions: list[int] = []
        layout: list[tuple[int, int, tuple[int, int] | None]] = []  # (first token, length, start's columns)
        for start in new:
            spans[start] = (prefix + len(tokens), len(start))
            layout.append((len(tokens), len(start), None))
            tokens += start
            positions += range(len(start))
        for prompt, start in zip(prompts, starts):
            rest = prompt[len(start) :]
            layout.append((len(tokens), len(rest), spans[start] if start else None))
            tokens += rest
            positions += range(len(start), len(prompt))
        device = next(self.model.parameters()).device
        segments = Segments.build(
            [first for first, _, _ in layout], [length for _, length, _ in layout],
            [columns or (0, 0) for _, _, columns in layout], prefix,
        ).to(device)
        dtype = self.model.get_input_embeddings().weight.dtype
        cache = None
        if kept or new:
            kvs = [self._kv[(layer, start)] for start in kept]
            joined = [
                (torch.cat([kv[depth][0] for kv in kvs], 2), torch.cat([kv[depth][1] for kv in kvs], 2))
                for depth in range(len(kvs[0]))
            ] if kvs else None
            cache = DynamicCache(ddp_cache_data=joined, config=self.model.config)
        ids = torch.tensor([tokens], device=device)
        with attention_switched(self.model, SEGMENT_ATTENTION):
            output = layer_output(
                self.model, self.decoder_layers[layer], ids, segments.mask(len(tokens), prefix + len(tokens), dtype),
                cache, torch.tensor([positions], device=device), segments=segments,
            )[0]
        if new:
            assert cache is not None
            done = [c for c in kv_layers(cache) if c.is_initialized]
            for start in new:
                columns = slice(spans[start][0], spans[start][0] + len(start))
                self._kv[(layer, start)] = [(c.keys[:, :, columns].clone(), c.values[:, :, columns].clone()) for c in done]
        rests = layout[len(new) :]
        first = torch.tensor([f for f, _, _ in rests], dtype=torch.long, device=device)
        last = first + torch.tensor([length for _, length, _ in rests], dtype=torch.long, device=device)
        at = last[:, None] - count + torch.arange(count, device=device)  # [prompts, count]
        return output[at.clamp(min=0)] * (at >= first[:, None]).unsqueeze(-1)
