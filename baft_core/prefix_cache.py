"""A training batch whose unchanging part is computed once.

The base model is frozen and only layers >= the first edited layer L0 are intervened, at the
positions from the last P prompt tokens on. So per edit, in one unedited forward: the KV cache of
every position before the first intervened one (the "prefix"), and the input of layer L0 at the
intervened positions (the "suffix"). Each optimisation step then runs layers L0.. on the suffix
alone.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import nn
from transformers import DynamicCache

from .attach import Attachment, InterventionSet, final_logits
from .encoding import Example, positions_from_mask
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
        target_mask = (targets != -100).to(device)
        self.targets = targets.to(device)[target_mask]
        self.continuation_mask = after_answer.to(device)  # [batch, suffix]
        # Targets and continuations go through the output head together: one pass over its
        # (vocab x d) weight per step, not two. `is_target` splits the rows again.
        self.output_mask = target_mask | self.continuation_mask
        self.is_target = target_mask[self.output_mask]

        in_head = torch.arange(suffix_width) < torch.tensor([len(h) for h in heads]).unsqueeze(1)
        prompt_mask = torch.cat([prefix_mask.bool(), in_head], dim=-1).to(device)
        self.prefix_kv, self.layer_input, self.unedited_continuation, self.routes = self._unedited_pass(
            prefix_ids.to(device), prefix_mask.to(device), prompt_mask
        )

    def _fresh_cache(self) -> DynamicCache:
        if self.prefix_kv is None:
            return DynamicCache(config=self.model.config)
        return DynamicCache(ddp_cache_data=self.prefix_kv, config=self.model.config)

    @torch.no_grad()
    def _unedited_pass(self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, prompt_mask: torch.Tensor):
        """One unedited forward of prefix + suffix gives all that stays fixed while training: the
        prefix's KV cache, the input of layer L0 at the suffix [batch, suffix, d], the
        log-probabilities after the answers [n_after, vocab], and the sealed blocks each prompt
        (`prompt_mask` [batch, prefix + suffix]) opens."""
        width = prefix_ids.shape[1]
        layers, captured, handles = self.attachment.decoder_layers, {}, []

        def grab_input(module, args, kwargs):
            captured["input"] = (args[0] if args else kwargs["hidden_states"])[:, width:]

        def grab_routing(module, args, output):
            captured["routing"] = output[0] if isinstance(output, tuple) else output

        routing = self.interventions.router.enabled and self.interventions.sealed_blocks
        cache = DynamicCache(config=self.model.config)
        handles.append(layers[self.first_layer].register_forward_pre_hook(grab_input, with_kwargs=True))
        if routing:
            handles.append(layers[self.interventions.routing_layer].register_forward_hook(grab_routing))
        try:
            hidden = self.model.base_model(
                input_ids=torch.cat([prefix_ids, self.suffix_ids], dim=1),
                attention_mask=self.attention,
                position_ids=torch.cat([positions_from_mask(prefix_mask), self.position_ids], dim=1),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, width:]
        finally:
            for handle in handles:
                handle.remove()
        continuation = torch.log_softmax(final_logits(self.model, hidden[self.continuation_mask]).float(), -1)
        routes = Routes(open=self.interventions.route(captured["routing"], prompt_mask)) if routing else Routes()
        if not width:
            return None, captured["input"], continuation, routes
        total = width + self.suffix_ids.shape[1]
        if any(layer.keys.shape[-2] != total for layer in cache.layers):
            raise ValueError(f"an edit example of {total} tokens is longer than the model's sliding window")
        prefix_kv = [(layer.keys[..., :width, :], layer.values[..., :width, :]) for layer in cache.layers]
        return prefix_kv, captured["input"], continuation, routes

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
        logits = final_logits(self.model, hidden[self.output_mask])
        continuation = torch.log_softmax(logits[~self.is_target].float(), -1)
        return Step(logits[self.is_target], continuation, dict(record))
