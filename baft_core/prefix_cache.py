"""A training batch whose unchanging part is computed once.

The base model is frozen and only layers >= the first edited layer L0 are intervened, at the
positions from the last P prompt tokens on. So per edit, in one unedited forward: the KV cache of
every position before the first intervened one (the "prefix"), and the input of layer L0 at the
intervened positions (the "suffix"); the same pass decodes what the unedited model says after
each answer. Each optimisation step then runs layers L0.. on the suffix alone.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import NamedTuple, Protocol, cast

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from .attach import Attachment, InterventionSet, final_logits
from .encoding import Example, context_limit, left_padded, positions_from_mask, right_padded
from .routing import Routes, answer_offsets


def training_attention(dtype: torch.dtype, device: torch.device) -> SDPBackend | None:
    """The attention kernel for training steps, None for torch's own choice. On a CPU with bf16
    (or fp16) activations: the math kernel, whose backward on these few-token batches is cheaper
    than flash attention's; in fp32 flash is the faster (`bench/attention_kernel_speed.py`)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return SDPBackend.MATH
    return None


def attention_context(kernel: SDPBackend | None):
    """Runs attention inside it on `kernel` (None: torch's own choice)."""
    return nullcontext() if kernel is None else sdpa_kernel(kernel)


@contextmanager
def attention_switched(model, name: str) -> Iterator[bool]:
    """The model's attention switched to the registered function `name` (one that calls SDPA
    itself), for an SDPA model; others keep their own (False). Inside the model lock: no other
    forward sees the switch."""
    config = model.config
    previous = config._attn_implementation
    if previous != "sdpa":
        yield False
        return
    config._attn_implementation = name
    try:
        yield True
    finally:
        config._attn_implementation = previous


class KVLayer(Protocol):
    """One layer of an attention KV cache, as this package reads and rewrites it."""

    keys: torch.Tensor  # [batch, kv heads, seq, head dim]
    values: torch.Tensor
    is_initialized: bool


def kv_layers(cache: DynamicCache) -> list[KVLayer]:
    """The cache's layers (the list itself). The caches here hold the keys and values of attention
    layers; transformers types a cache layer as any of its kinds, linear attention's included."""
    return cast(list[KVLayer], cache.layers)


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
def layer_output(
    model,
    layer: nn.Module,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    cache: DynamicCache | None = None,
    position_ids: torch.Tensor | None = None,
    **attention_kwargs,
) -> torch.Tensor:
    """The unedited output [batch, seq, d] of one decoder layer; the layers above are not run.
    With `cache`, the KV of earlier tokens (which `attention` then covers too) is read from it and
    that of `input_ids` added to it, up to `layer`. `attention_kwargs` reach the attention
    function."""
    return outputs_at_layers(model, [layer], input_ids, attention, cache, position_ids, **attention_kwargs)[0]


def outputs_at_layers(
    model,
    layers: list[nn.Module],
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    cache: DynamicCache | None = None,
    position_ids: torch.Tensor | None = None,
    **attention_kwargs,
) -> list[torch.Tensor]:
    """`layer_output` of several decoder layers from one forward, which stops after the last of
    `layers` (given in order of depth)."""
    captured: dict[int, torch.Tensor] = {}

    def grab(index: int):
        def hook(module, args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
            if index == len(layers) - 1:
                raise _Captured

        return hook

    handles = [layer.register_forward_hook(grab(i)) for i, layer in enumerate(layers)]
    try:
        position_ids = positions_from_mask(attention) if position_ids is None else position_ids
        model.base_model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            **attention_kwargs,
        )
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in range(len(layers))]


class Step(NamedTuple):
    """One training forward: logits at the target positions [n_targets, vocab], log-probabilities
    at the positions after the answers [n_after, vocab], and the recorded {layer: (weights, hidden)}."""

    logits: torch.Tensor
    continuation: torch.Tensor
    record: dict[int, tuple[torch.Tensor, torch.Tensor]]


class _Unedited(NamedTuple):
    """What the unedited pass leaves for training (see `CachedBatch._unedited_pass`)."""

    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    layer_input: torch.Tensor  # [batch, suffix, d], in the training layout
    continuations: list[list[int]]
    log_probs: torch.Tensor  # [n_after, vocab], row-major like `continuation_mask`
    routes: Routes


class CachedBatch:
    """`continuation_tokens`: also feed, after each answer, up to this many tokens the unedited
    model greedily says after prompt + answer (up to `eos_id`); they are decoded inside the one
    unedited pass, so finding them costs one single-token forward each. None: no distribution
    after the answers is computed, unedited or edited (nothing is trained there)."""

    def __init__(
        self,
        model,
        attachment: Attachment,
        interventions: InterventionSet,
        examples: list[Example],
        positions: int,
        pad_id: int,
        continuation_tokens: int | None = 0,
        eos_id: int | None = None,
    ):
        self.model, self.attachment, self.interventions = model, attachment, interventions
        self.first_layer = min(interventions.layers)
        device = next(model.parameters()).device
        heads = [e.prompt[-positions:] for e in examples]
        prefixes = [e.prompt[: len(e.prompt) - len(h)] for e, h in zip(examples, heads)]
        # Left-padded, so every suffix starts at the same column.
        prefix_ids, prefix_mask = (t.to(device) for t in left_padded(prefixes, pad_id))
        spoken = [h + e.answer for h, e in zip(heads, examples)]
        limit = context_limit(model)
        room = [limit - len(e.prompt) - len(e.answer) for e in examples]
        unedited = self._unedited_pass(
            prefix_ids, prefix_mask, spoken, [len(h) for h in heads], pad_id, continuation_tokens, eos_id, room
        )
        self.prefix_kv, self.layer_input, self.routes = unedited.prefix_kv, unedited.layer_input, unedited.routes
        self.attention_kernel = training_attention(self.layer_input.dtype, device)
        self.unedited_continuation = unedited.log_probs
        self.continuations = unedited.continuations

        # The whole answer is fed, then the continuation: from the answer's last token on,
        # positions predict what follows the answer, and there the edit must not act (else
        # generation keeps repeating it).
        suffix_ids, suffix_mask = right_padded([s + c for s, c in zip(spoken, self.continuations)], pad_id)
        targets = torch.full(suffix_ids.shape, -100, dtype=torch.long)
        after_answer = torch.zeros(suffix_ids.shape, dtype=torch.bool)
        for row, (head, e, tokens) in enumerate(zip(heads, examples, self.continuations)):
            targets[row, len(head) - 1 : len(head) - 1 + len(e.answer)] = torch.tensor(e.answer)
            after_answer[row, len(head) + len(e.answer) - 1 : len(head) + len(e.answer) + len(tokens)] = True

        self.suffix_ids, suffix_mask = suffix_ids.to(device), suffix_mask.to(device)
        head_lengths = torch.tensor([len(h) for h in heads], device=device)
        in_head = torch.arange(suffix_ids.shape[1], device=device) < head_lengths[:, None]
        self.routes.offsets = answer_offsets(in_head, suffix_mask)  # for the sealed blocks' windows
        self.attention = torch.cat([prefix_mask, suffix_mask], dim=-1)
        self.position_ids = positions_from_mask(suffix_mask, prefix_mask.sum(-1))
        self.intervene = suffix_mask.bool()
        # Row of each intervened position, in the order the hooks see them (row-major).
        self.rows = self.intervene.nonzero()[:, 0]
        self.after_answer = after_answer.to(device)[self.intervene]
        target_mask = (targets != -100).to(device)
        self.targets = targets.to(device)[target_mask]
        self.continuation_mask = after_answer.to(device)  # [batch, suffix]
        # Targets and continuations go through the output head together: one pass over its
        # (vocab x d) weight per step, not two. Target rows first, so that a slice splits the
        # logits again: its gradient is a concatenation, where a boolean mask's zero-filled a
        # (rows x vocab) tensor for each part and scattered into it.
        flat_targets = target_mask.flatten().nonzero()[:, 0]
        flat_continuations = (self.continuation_mask & ~target_mask).flatten().nonzero()[:, 0]
        if continuation_tokens is None:
            flat_continuations = flat_continuations[:0]
        self.output_rows = torch.cat([flat_targets, flat_continuations])
        self.head_split = [len(flat_targets), len(flat_continuations)]

    def _fresh_cache(self) -> DynamicCache:
        if self.prefix_kv is None:
            return DynamicCache(config=self.model.config)
        return DynamicCache(ddp_cache_data=self.prefix_kv, config=self.model.config)

    @torch.no_grad()
    def _unedited_pass(
        self,
        prefix_ids: torch.Tensor,
        prefix_mask: torch.Tensor,
        spoken: list[list[int]],
        head_lengths: list[int],
        pad_id: int,
        continuation_tokens: int | None,
        eos_id: int | None,
        room: list[int],
    ) -> _Unedited:
        """One unedited forward of prefix + head + answer, then greedy single-token steps for
        the continuations, gives all that stays fixed while training: the prefix's KV cache, the
        input of layer L0 at every suffix position, the continuations, the log-probabilities
        after each answer and each continuation token, and the sealed blocks each prompt opens."""
        device, width = prefix_ids.device, prefix_ids.shape[1]
        layers = self.attachment.decoder_layers
        inputs: list[torch.Tensor] = []
        captured: dict[str, torch.Tensor] = {}
        handles: list[torch.utils.hooks.RemovableHandle] = []

        def grab_input(module, args, kwargs):
            inputs.append(args[0] if args else kwargs["hidden_states"])

        def grab(name):
            def hook(module, args, output):
                captured.setdefault(name, output[0] if isinstance(output, tuple) else output)

            return hook

        spoken_ids, spoken_mask = right_padded(spoken, pad_id)
        spoken_ids, spoken_mask = spoken_ids.to(device), spoken_mask.to(device)
        lengths = spoken_mask.sum(-1)
        attention = torch.cat([prefix_mask, spoken_mask], dim=-1)
        position_ids = torch.cat(
            [positions_from_mask(prefix_mask), positions_from_mask(spoken_mask, prefix_mask.sum(-1))], dim=1
        )
        input_ids = torch.cat([prefix_ids, spoken_ids], dim=1)
        rows = torch.arange(len(spoken), device=device)
        last = width + lengths - 1  # each row's last answer column
        routing = self.interventions.router.enabled and self.interventions.sealed_blocks
        cache = DynamicCache(config=self.model.config)
        handles.append(layers[self.first_layer].register_forward_pre_hook(grab_input, with_kwargs=True))
        relations = self.interventions.relations
        if routing:
            handles.append(layers[self.interventions.routing_layer].register_forward_hook(grab("routing")))
            if relations.enabled:
                handles.append(layers[relations.layer].register_forward_hook(grab("relation")))
        said, log_probs = [], []
        try:
            hidden = self.model.base_model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            ).last_hidden_state[rows, last]
            next_position = position_ids[rows, last] + 1
            finished = torch.zeros(len(spoken), dtype=torch.bool, device=device)
            steps = 0 if continuation_tokens is None else continuation_tokens + 1
            for step in range(steps):
                log_probs.append(torch.log_softmax(final_logits(self.model, hidden).float(), -1))
                if step == steps - 1:
                    break
                token = log_probs[-1].argmax(-1)
                said.append(token)
                if eos_id is not None:
                    finished |= token == eos_id
                if bool(finished.all()):
                    break
                # Padding inside the row (after a shorter answer) is masked: the token follows
                # its own answer, at the position after it.
                attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
                hidden = self.model.base_model(
                    input_ids=token.unsqueeze(1),
                    attention_mask=attention,
                    position_ids=(next_position + step).unsqueeze(1),
                    cache=cache,
                    use_cache=True,
                ).last_hidden_state[:, -1]
        finally:
            for handle in handles:
                handle.remove()
        said_rows = torch.stack(said, 1).tolist() if said else [[] for _ in spoken]
        continuations = []
        for tokens, limit in zip(said_rows, room):
            tokens = tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
            continuations.append(tokens[: max(limit, 0)])

        # The training layout: head + answer + continuation, right-padded (padding stays zero).
        decoded = torch.cat(inputs[1:], dim=1) if len(inputs) > 1 else inputs[0][:, :0]
        width_out = max(len(s) + len(c) for s, c in zip(spoken, continuations))
        layer_input = inputs[0].new_zeros(len(spoken), width_out, inputs[0].shape[-1])
        for row, (tokens, extra) in enumerate(zip(spoken, continuations)):
            layer_input[row, : len(tokens)] = inputs[0][row, width : width + len(tokens)]
            layer_input[row, len(tokens) : len(tokens) + len(extra)] = decoded[row, : len(extra)]
        # After each answer: the distribution at its last token, then after each continuation token.
        after = hidden.new_zeros(0, 0)
        if log_probs:
            stacked = torch.stack(log_probs, 1)  # [batch, steps, vocab]
            after = torch.cat([stacked[row, : len(c) + 1] for row, c in enumerate(continuations)])

        in_head = torch.arange(spoken_ids.shape[1], device=device) < torch.tensor(head_lengths, device=device)[:, None]
        prompt_mask = torch.cat([prefix_mask.bool(), in_head], dim=-1)
        routes = Routes()
        if routing:
            routes.open = self.interventions.route(captured["routing"], prompt_mask, input_ids, self.attachment.classes)
            if relations.enabled:
                routes.open = relations.shut(captured["relation"], prompt_mask, input_ids, routes.open)
        if not width:
            return _Unedited(None, layer_input, continuations, after, routes)
        total = width + spoken_ids.shape[1] + len(inputs) - 1
        if any(layer.keys.shape[-2] != total for layer in kv_layers(cache)):
            raise ValueError(f"an edit example of {total} tokens is longer than the model's sliding window")
        prefix_kv = [(layer.keys[..., :width, :], layer.values[..., :width, :]) for layer in kv_layers(cache)]
        return _Unedited(prefix_kv, layer_input, continuations, after, routes)

    def _run(self, cache: DynamicCache):
        return self.model.base_model(
            input_ids=self.suffix_ids,
            attention_mask=self.attention,
            position_ids=self.position_ids,
            cache=cache,
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
        with attention_context(self.attention_kernel), self._skip_lower_layers(), self.attachment.intervene(
            self.intervene, record=True, interventions=self.interventions, routes=self.routes
        ) as record:
            hidden = self._run(self._fresh_cache()).last_hidden_state
        logits = final_logits(self.model, hidden.flatten(0, 1)[self.output_rows])
        targets, continuation = logits.split(self.head_split)
        return Step(targets, torch.log_softmax(continuation.float(), -1), dict(record))
