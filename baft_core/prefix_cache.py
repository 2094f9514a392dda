"""A training batch whose unchanging part is computed once.

The base model is frozen and only layers >= the first edited layer L0 are intervened, at the
positions from the last P prompt tokens on. So per edit, once: the KV cache of every position
before the first intervened one (the "prefix"), and the input of layer L0 at the intervened
positions (the "suffix"). Each optimisation step then runs layers L0.. on the suffix alone.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import nn
from transformers import DynamicCache

from .attach import Attachment, InterventionSet
from .encoding import Example, left_padded, positions_from_mask
from .routing import Routes


class _Captured(Exception):
    pass


class _Replay(nn.Module):
    """Stands in for a skipped lower layer: returns the cached input of L0, or passes through."""

    def __init__(self, original: nn.Module, output: torch.Tensor | None):
        super().__init__()
        self.output = output
        if hasattr(original, "attention_type"):  # read by models with sliding-window layers
            self.attention_type = original.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states if self.output is None else self.output


@torch.no_grad()
def layer_output(model, layer: nn.Module, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """The unedited output [batch, seq, d] of one decoder layer; the layers above are not run."""
    captured = {}

    def grab(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Captured

    handle = layer.register_forward_hook(grab)
    try:
        position_ids = positions_from_mask(attention)
        model.base_model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["h"]


def final_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class Step(NamedTuple):
    """One training forward: logits at the target positions [n_targets, vocab], log-probabilities
    at the positions after the answers [n_after, vocab], and the recorded {layer: (weights, hidden)}."""

    logits: torch.Tensor
    continuation: torch.Tensor
    record: dict[int, tuple[torch.Tensor, torch.Tensor]]


class CachedBatch:
    def __init__(
        self,
        model,
        attachment: Attachment,
        interventions: InterventionSet,
        examples: list[Example],
        positions: int,
        pad_id: int,
    ):
        self.model, self.attachment, self.interventions = model, attachment, interventions
        self.first_layer = min(interventions.layers)
        device = next(model.parameters()).device
        heads = [e.prompt[-positions:] for e in examples]
        prefixes = [e.prompt[: len(e.prompt) - len(h)] for e, h in zip(examples, heads)]
        # The whole answer is fed, then the example's continuation: from the answer's last
        # token on, positions predict what follows the answer, and there the edit must not act
        # (else generation keeps repeating it).
        suffixes = [h + e.answer + e.continuation for h, e in zip(heads, examples)]
        batch = len(examples)
        prefix_width = max(len(p) for p in prefixes)
        suffix_width = max(len(s) for s in suffixes)

        prefix_ids = torch.full((batch, prefix_width), pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((batch, prefix_width), dtype=torch.long)
        suffix_ids = torch.full((batch, suffix_width), pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((batch, suffix_width), dtype=torch.long)
        targets = torch.full((batch, suffix_width), -100, dtype=torch.long)
        after_answer = torch.zeros((batch, suffix_width), dtype=torch.bool)
        for row, (prefix, suffix, head, e) in enumerate(zip(prefixes, suffixes, heads, examples)):
            if prefix:  # left-padded, so every suffix starts at the same column
                prefix_ids[row, prefix_width - len(prefix) :] = torch.tensor(prefix)
                prefix_mask[row, prefix_width - len(prefix) :] = 1
            suffix_ids[row, : len(suffix)] = torch.tensor(suffix)
            suffix_mask[row, : len(suffix)] = 1
            targets[row, len(head) - 1 : len(head) - 1 + len(e.answer)] = torch.tensor(e.answer)
            after_answer[row, len(head) + len(e.answer) - 1 : len(suffix)] = True

        self.suffix_ids = suffix_ids.to(device)
        self.attention = torch.cat([prefix_mask, suffix_mask], dim=-1).to(device)
        self.position_ids = positions_from_mask(suffix_mask, prefix_mask.sum(-1)).to(device)
        self.intervene = suffix_mask.bool().to(device)
        # Row of each intervened position, in the order the hooks see them (row-major).
        self.rows = self.intervene.nonzero()[:, 0]
        self.after_answer = after_answer.to(device)[self.intervene]
        self.target_mask = (targets != -100).to(device)
        self.targets = targets.to(device)[self.target_mask]
        self.continuation_mask = after_answer.to(device)  # [batch, suffix]

        self.prefix_kv = self._prefix_cache(prefix_ids.to(device), prefix_mask.to(device))
        self.layer_input = self._capture_layer_input()
        self.routes = self._route(examples, pad_id)
        self.unedited_continuation = self._unedited_continuation()

    def _fresh_cache(self) -> DynamicCache:
        if self.prefix_kv is None:
            return DynamicCache(config=self.model.config)
        return DynamicCache(ddp_cache_data=self.prefix_kv, config=self.model.config)

    @torch.no_grad()
    def _prefix_cache(self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor):
        if prefix_ids.shape[1] == 0:
            return None
        cache = DynamicCache(config=self.model.config)
        self.model.base_model(
            input_ids=prefix_ids,
            attention_mask=prefix_mask,
            position_ids=positions_from_mask(prefix_mask),
            past_key_values=cache,
            use_cache=True,
        )
        return [(layer.keys, layer.values) for layer in cache.layers]

    @torch.no_grad()
    def _capture_layer_input(self) -> torch.Tensor:
        captured = {}

        def grab(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Captured  # the layers above are not needed now

        handle = self.attachment.decoder_layers[self.first_layer].register_forward_pre_hook(
            grab, with_kwargs=True
        )
        try:
            self._run(self._fresh_cache())
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured["h"]

    @torch.no_grad()
    def _unedited_continuation(self) -> torch.Tensor:
        """The unedited model's log-probabilities at the positions after the answers [n_after, vocab]."""
        with self._skip_lower_layers():
            hidden = self._run(self._fresh_cache()).last_hidden_state
        return torch.log_softmax(final_logits(self.model, hidden[self.continuation_mask]).float(), -1)

    @torch.no_grad()
    def _route(self, examples: list[Example], pad_id: int) -> Routes:
        """The sealed blocks each prompt opens, fixed while training (the prompt does not change):
        one forward of the prompts up to the routing layer."""
        if not (self.interventions.router.enabled and self.interventions.sealed_blocks):
            return Routes()
        device = self.suffix_ids.device
        input_ids, attention = left_padded([e.prompt for e in examples], pad_id)
        input_ids, attention = input_ids.to(device), attention.to(device)
        layer = self.attachment.decoder_layers[self.interventions.routing_layer]
        hidden = layer_output(self.model, layer, input_ids, attention)
        return Routes(open=self.interventions.route(hidden, attention.bool()))

    def _run(self, cache: DynamicCache):
        return self.model.base_model(
            input_ids=self.suffix_ids,
            attention_mask=self.attention,
            position_ids=self.position_ids,
            past_key_values=cache,
            use_cache=True,
        )

    @contextmanager
    def _skip_lower_layers(self) -> Iterator[None]:
        layers = self.attachment.decoder_layers
        originals = [layers[i] for i in range(self.first_layer)]
        for i, original in enumerate(originals):
            layers[i] = _Replay(original, self.layer_input if i == 0 else None)
        try:
            yield
        finally:
            for i, original in enumerate(originals):
                layers[i] = original

    def forward(self) -> Step:
        with self._skip_lower_layers(), self.attachment.intervene(
            self.intervene, record=True, interventions=self.interventions, routes=self.routes
        ) as record:
            hidden = self._run(self._fresh_cache()).last_hidden_state
        continuation = torch.log_softmax(final_logits(self.model, hidden[self.continuation_mask]).float(), -1)
        return Step(final_logits(self.model, hidden[self.target_mask]), continuation, dict(record))
