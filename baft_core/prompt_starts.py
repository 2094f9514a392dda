"""Last-position states of prompts whose starts recur, each start's KV computed once.

The relation check puts an edit's subject to about 58 relations and reads each prompt's state at
one middle layer (relations.py). About half of those prompts' tokens are starts that recur: the
text before the subject in a template ("The name of the father of") is the same at every edit,
and the templates that open with the subject share it. Route keys read an edit's prompt after
each route context ("Here is a fact:") at the routing layer. The unedited KV of such starts up to
the layer is computed once and kept (the least recently used dropped first), so that a prompt
costs the tokens after its start.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from transformers import DynamicCache

from .encoding import left_padded, right_padded
from .prefix_cache import kv_layers, layer_output

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer up to the read one: keys, values [1, heads, len, dim]


class PromptStarts:
    """`kept`: the most starts whose KV is held (a start read at two layers counts twice)."""

    def __init__(self, model, decoder_layers: nn.ModuleList, pad_id: int, kept: int = 256):
        self.model, self.decoder_layers, self.pad_id, self.kept = model, decoder_layers, pad_id, kept
        self._kv: OrderedDict[tuple[int, tuple[int, ...]], KV] = OrderedDict()

    def __len__(self) -> int:
        """How many starts' KV is kept."""
        return len(self._kv)

    def __contains__(self, kept: tuple[int, tuple[int, ...]]) -> bool:
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
        self.keep(list(dict.fromkeys(tuple(s) for s in starts if s)), layer)
        # Batched in order of what is left to compute: a batch is padded to its longest.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) - len(starts[i]))
        parts = [
            self._after_starts([prompts[i] for i in c], [starts[i] for i in c], layer, count) for c in _batches(order, 32)
        ]
        while len(self._kv) > self.kept:  # after the batches: they read this call's starts
            self._kv.popitem(last=False)
        states = torch.cat(parts).float()
        return states[torch.tensor(order, device=states.device).argsort()]

    @torch.no_grad()
    def keep(self, starts: list[tuple[int, ...]], layer: int) -> None:
        """Computes and keeps the KV of the starts not yet kept; marks the others recently used."""
        new = [s for s in starts if (layer, s) not in self._kv]
        for start in starts:
            if (layer, start) in self._kv:
                self._kv.move_to_end((layer, start))
        device = next(self.model.parameters()).device
        for chunk in _batches(new, 32):
            ids, attention = (t.to(device) for t in left_padded([list(s) for s in chunk], self.pad_id))
            cache = DynamicCache(config=self.model.config)
            layer_output(self.model, self.decoder_layers[layer], ids, attention, cache)
            done = [c for c in kv_layers(cache) if c.is_initialized]
            for row, start in enumerate(chunk):
                cut = slice(ids.shape[1] - len(start), None)
                self._kv[(layer, start)] = [
                    (c.keys[row : row + 1, :, cut].clone(), c.values[row : row + 1, :, cut].clone()) for c in done
                ]

    def _after_starts(self, prompts: list[list[int]], starts: list[list[int]], layer: int, count: int) -> torch.Tensor:
        """One batch: each prompt's tokens after its start, over its start's KV (left-padded to the
        longest start), right-padded; the output at each prompt's last `count` tokens [batch,
        count, d], zeros where fewer follow its start."""
        rests = [p[len(s) :] for p, s in zip(prompts, starts)]
        ids, rest_mask = right_padded(rests, self.pad_id)
        device = next(self.model.parameters()).device
        ids, rest_mask = ids.to(device), rest_mask.to(device)
        longest = max(len(s) for s in starts)
        cache = None
        start_mask = rest_mask.new_zeros(len(prompts), longest)
        if longest:
            kvs = [self._kv[(layer, tuple(s))] if s else None for s in starts]
            shapes = next(kv for kv in kvs if kv is not None)
            padded: KV = []
            for depth, (keys, values) in enumerate(shapes):
                k = keys.new_zeros(len(prompts), keys.shape[1], longest, keys.shape[3])
                v = values.new_zeros(len(prompts), values.shape[1], longest, values.shape[3])
                for row, kv in enumerate(kvs):
                    if kv is not None:
                        length = kv[depth][0].shape[2]
                        k[row, :, longest - length :] = kv[depth][0][0]
                        v[row, :, longest - length :] = kv[depth][1][0]
                padded.append((k, v))
            for row, s in enumerate(starts):
                start_mask[row, longest - len(s) :] = 1
            cache = DynamicCache(ddp_cache_data=padded, config=self.model.config)
        attention = torch.cat([start_mask, rest_mask], dim=-1)
        lengths = torch.tensor([len(s) for s in starts], device=device)
        positions = lengths[:, None] + torch.arange(ids.shape[1], device=device)
        output = layer_output(self.model, self.decoder_layers[layer], ids, attention, cache, positions)
        lengths = torch.tensor([len(r) for r in rests], device=device)
        at = lengths[:, None] - count + torch.arange(count, device=device)  # [batch, count]
        rows = output[torch.arange(len(prompts), device=device)[:, None], at.clamp(min=0)]
        return rows * (at >= 0).unsqueeze(-1)


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
