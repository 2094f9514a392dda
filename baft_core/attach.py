"""Attaching interventions to a Hugging Face decoder: forward hooks on the chosen layers.

Which positions are intervened is set per forward call with `Attachment.intervene(mask)`: a
boolean [batch, seq] mask. Outside that context the model runs unedited.
"""
from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from .blocks import SealedBases
from .intervention import BasisIntervention
from .relations import RelationCheck
from .routing import Router, Routes
from .spelling import TokenClasses

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel


def text_config(model: PreTrainedModel) -> PreTrainedConfig:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def final_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The output head on hidden states [n, d], as the model's own forward applies it. Callers
    pass 2-D rows: a 3-D slice such as `hidden[:, -1:]` sends torch's matmul down a path that
    copies the whole (vocab x d) head first, 50 ms a call on SmolLM2 on a CPU."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(text_config(model), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def find_decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's stack of decoder blocks, found by shape rather than by family-specific names."""
    depth = text_config(model).num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise ValueError(f"no ModuleList of {depth} decoder layers found in {type(model).__name__}")


class InterventionSet(nn.Module):
    """One trainable intervention (block) per edited layer, the frozen bases of sealed blocks, the
    route keys that open them, and the running basis usage of the trainable block for load
    balancing."""

    # Buffers (`__init__`)
    usage_sum: torch.Tensor
    edit_count: torch.Tensor

    def __init__(
        self,
        hidden_size: int,
        layers: list[int],
        rank: int,
        gated: bool,
        cutoff: float = 0.01,
        route_threshold: float = 0.0,
        sealed_gates: bool = True,
        routing_layer: int | None = None,
        seed: int = 0,
        sealed_rank: int | None = None,
        route_tokens: int = 1,
        route_prefix_threshold: float = 0.3,
        route_prefix_gap: int = 0,
        route_prefix_needed: int | None = None,
        route_spelling_normalised: bool = False,
        route_prefix_word: bool = False,
        relation_layer: int | None = None,
        relation_threshold: float = 0.0,
        relation_margin: float = 0.0,
        relation_other_name_ratio: float = 1.0,
    ):
        """`routing_layer` (default: the first edited layer) must not be above it: routes are
        decided before any block acts. `relation_layer` (default: the routing layer), between the
        two, is where the relation check reads (relations.py; `relation_threshold` 0: no check).
        `seed` fixes every block's random draw (`block_generator`).
        `sealed_rank`: the directions a block keeps when sealed without gates (None: all).
        `route_tokens`, `route_prefix_threshold`, `route_prefix_gap`, `route_prefix_needed`,
        `route_spelling_normalised`, `route_prefix_word`: how many subject tokens a route key
        reads, the threshold of those before its last, how many tokens may stand between them, how
        many of them must be found, whether spellings compare token classes, and whether those in
        the matched word must be found in place (`Router`)."""
        super().__init__()
        routing_layer = min(layers) if routing_layer is None else routing_layer
        if routing_layer > min(layers):
            raise ValueError(f"routing layer {routing_layer} is above the first edited layer {min(layers)}")
        self.hidden_size, self.rank, self.gated, self.seed = hidden_size, rank, gated, seed
        self.layers = list(layers)
        # A checkpoint stores a block that holds no edit as the generator state it was drawn
        # from, not as its values.
        generator = self.block_generator(0)
        self.draw_state: torch.Tensor | None = generator.get_state()
        self.by_layer = nn.ModuleDict(self._fresh_blocks(generator))
        self.sealed = nn.ModuleDict(
            {str(layer): SealedBases(hidden_size, cutoff, sealed_gates, sealed_rank) for layer in self.layers}
        )
        self.router = Router(
            hidden_size, route_threshold, routing_layer, route_tokens, route_prefix_threshold, route_prefix_gap,
            route_prefix_needed, route_spelling_normalised, route_prefix_word,
        )
        relation_layer = routing_layer if relation_layer is None else relation_layer
        if not routing_layer <= relation_layer <= min(layers):
            raise ValueError(
                f"relation layer {relation_layer} must be between the routing layer {routing_layer} and the first "
                f"edited layer {min(layers)}"
            )
        self.relations = RelationCheck(
            hidden_size, relation_layer, relation_threshold, relation_margin, relation_other_name_ratio
        )
        # Sum over the block's edits of each basis' mean weight on that edit, and the edit count:
        # the running average the load-balancing term evens out.
        self.register_buffer("usage_sum", torch.zeros(len(self.layers), rank))
        self.register_buffer("edit_count", torch.zeros((), dtype=torch.long))
        # sha256 of each sealed block as stored by checkpoint.py, filled as blocks are saved.
        self.segment_ids: list[str] = []

    def block_generator(self, index: int) -> torch.Generator:
        """The generator that draws block `index` (0: the first trainable block, n: the one that
        follows the n-th seal): a function of the seed and the index alone, so that an adapter
        reloaded halfway through a history draws the same blocks as one that never was (a replay
        of the edit log gives the same adapter, bit for bit)."""
        digest = hashlib.sha256(f"baft-block:{self.seed}:{index}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def _fresh_blocks(self, generator: torch.Generator) -> dict[str, BasisIntervention]:
        """A new trainable block per layer, drawn on the CPU from `generator`: every layer's bases
        before any gate (see `BasisIntervention.add_gates`)."""
        blocks = {
            str(layer): BasisIntervention(self.hidden_size, self.rank, gated=False, generator=generator)
            for layer in self.layers
        }
        if self.gated:
            for block in blocks.values():
                block.add_gates(generator=generator)
        return blocks

    def __getitem__(self, layer: int) -> BasisIntervention:
        block = self.by_layer[str(layer)]
        assert isinstance(block, BasisIntervention)
        return block

    def trainable_blocks(self) -> list[BasisIntervention]:
        """The trainable block of each edited layer (`by_layer`'s values)."""
        blocks = []
        for block in self.by_layer.values():
            assert isinstance(block, BasisIntervention)
            blocks.append(block)
        return blocks

    def _sealed_at(self, layer: int) -> SealedBases:
        """The sealed bases of one edited layer."""
        sealed = self.sealed[str(layer)]
        assert isinstance(sealed, SealedBases)
        return sealed

    def _all_sealed(self) -> Iterator[SealedBases]:
        """The sealed bases of every edited layer (`sealed`'s values)."""
        for sealed in self.sealed.values():
            assert isinstance(sealed, SealedBases)
            yield sealed

    @property
    def routing_layer(self) -> int:
        """The decoder layer whose output routes are decided on (no intervention has touched it)."""
        return self.router.layer

    def route(
        self,
        layer_output: torch.Tensor,
        prompt: torch.Tensor,
        tokens: torch.Tensor,
        classes: TokenClasses | None = None,
    ) -> torch.Tensor:
        """[batch, sealed blocks]: the blocks each row's prompt opens, from the routing layer's
        output [batch, seq, d] at the `prompt` positions [batch, seq] and their token ids
        `tokens` [batch, seq] (`classes`: the tokenizer's, for spellings compared normalised)."""
        return self.router.open_blocks(layer_output, prompt, self.sealed_blocks, tokens, classes)

    def forward(
        self,
        layer: int,
        h: torch.Tensor,
        blocks_open: torch.Tensor | None = None,
        trainable_open: torch.Tensor | None = None,
        weighed: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Phi(h) at one layer, summing the trainable block and the sealed ones, and the weights
        [n, rank + sealed bases] (the trainable block's first; None unless `weighed`).
        `blocks_open` [n, sealed blocks] limits the sealed blocks that may act at each position
        (None: all may), `trainable_open` [n] the trainable block (None: it acts everywhere).
        Without weights and gradients, blocks that cannot change h are not computed: a fresh
        trainable block (after every seal, in the defaults) and sealed blocks none of which is
        open (most positions of most prompts)."""
        h32 = h.float()
        block = self[layer]
        sealed = self._sealed_at(layer)
        if not weighed and not torch.is_grad_enabled():
            edited = h32 if block.is_identity else self._trainable(block, h32, trainable_open)[0]
            if sealed.num_bases and (blocks_open is None or blocks_open.any()):
                edited = edited + self._sealed(layer, h32, blocks_open)[0]
            return edited.to(h.dtype), None
        edited, weights = self._trainable(block, h32, trainable_open)
        if sealed.num_bases:
            delta, sealed_weights = self._sealed(layer, h32, blocks_open)
            edited, weights = edited + delta, torch.cat([weights, sealed_weights], dim=-1)
        return edited.to(h.dtype), weights

    @staticmethod
    def _trainable(
        block: BasisIntervention, h32: torch.Tensor, trainable_open: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        edited, weights = block(h32)
        if trainable_open is not None:
            edited = torch.where(trainable_open.unsqueeze(1), edited, h32)
            weights = weights * trainable_open.unsqueeze(1)
        return edited, weights

    def _sealed(
        self, layer: int, h32: torch.Tensor, blocks_open: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        candidates = None if blocks_open is None else blocks_open.repeat_interleave(self.sealed_rank, dim=1)
        return self._sealed_at(layer)(h32, self[layer].gate_inputs(h32), candidates)

    @property
    def sealed_gates(self) -> bool:
        """Whether sealed blocks keep their learned gates (else routing alone decides)."""
        return self._sealed_at(self.layers[0]).use_gates

    @property
    def sealed_rank(self) -> int:
        """The bases each sealed block keeps at each layer."""
        return self._sealed_at(self.layers[0]).bases_of(self.rank)

    @property
    def sealed_blocks(self) -> int:
        return self._sealed_at(self.layers[0]).num_bases // self.sealed_rank

    def seal(self) -> None:
        """Freeze the trainable block into the sealed bases and start a fresh one, standardising
        its gate input like the others."""
        generator = self.block_generator(self.sealed_blocks + 1)
        self.draw_state = generator.get_state()
        fresh_blocks = self._fresh_blocks(generator)
        self.router.seal(self.sealed_blocks)
        self.relations.seal(self.sealed_blocks)
        for layer in self.layers:
            block = self[layer]
            self._sealed_at(layer).append(block)
            fresh = fresh_blocks[str(layer)].to(block.rotation.weight.device)
            fresh.gate_center.copy_(block.gate_center)
            fresh.gate_scale.copy_(block.gate_scale)
            self.by_layer[str(layer)] = fresh
        self.usage_sum.zero_()
        self.edit_count.zero_()

    @property
    def calibrated(self) -> bool:
        return int(self.edit_count) > 0 or self.sealed_blocks > 0

    def fork(self) -> InterventionSet:
        """A copy to train: the trainable blocks are copied, the sealed bases shared (they are
        never written in place)."""
        frozen = [t for sealed in self.sealed.values() for t in sealed.buffers()]
        frozen += [*self.router.buffers(), *self.relations.buffers()]
        memo = {id(t): t for t in frozen}
        return copy.deepcopy(self, memo)

    def num_parameters(self) -> int:
        """Trainable parameters plus the frozen ones of sealed blocks, their route keys and
        relation check."""
        sealed = sum(s.num_values for s in self._all_sealed()) + self.router.num_values
        relations = self.relations
        sealed += sum(t.numel() for t in (relations.keys, relations.key_scale, relations.probes, relations.probe_scale))
        return sum(p.numel() for p in self.parameters()) + sealed

    def num_bytes(self) -> int:
        """What `num_parameters` counts, in bytes as held (ungated sealed bases, route keys'
        earlier tokens in fp16, the relation check in int8)."""
        sealed = sum(s.num_bytes for s in self._all_sealed()) + self.router.num_bytes + self.relations.num_bytes
        return sum(p.numel() * p.element_size() for p in self.parameters()) + sealed


class Attachment:
    """Hooks an InterventionSet into a model. `detach()` removes the hooks.

    Forwards through one model must not overlap: callers that share a model between threads
    hold one lock around each forward (the Editor's `lock`)."""

    def __init__(self, model: PreTrainedModel, interventions: InterventionSet, classes: TokenClasses | None = None):
        """`classes`: the tokenizer's token classes, which spelled route keys may compare."""
        self.model, self.classes = model, classes
        # The dtype hidden states come in: route keys are held in it (`Router.hold_keys_in`).
        self.key_dtype: torch.dtype = next(model.get_input_embeddings().parameters()).dtype
        interventions.router.hold_keys_in(self.key_dtype)
        self.interventions = interventions
        self.decoder_layers = find_decoder_layers(model)
        self._mask: torch.Tensor | None = None
        self._record: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._active: InterventionSet | None = None
        self._routes: Routes | None = None
        self._implicit = Routes()  # the fallback routes of the current forward
        self._groups: list[RowGroup] | None = None  # rows on different adapters (intervene_rows)
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._hook_layers(interventions)
        # The token ids of the current forward, which spelled route keys are held to (routing.py).
        self._tokens: torch.Tensor | None = None
        self._token_handle = model.get_input_embeddings().register_forward_pre_hook(self._take_tokens)

    def _hook_layers(self, interventions: InterventionSet) -> None:
        """Hooks the layers the adapter edits, routes or checks relations at. Hooks stay: on a
        layer the active adapter does none of these at, a hook does nothing."""
        for layer in [*interventions.layers, interventions.routing_layer, interventions.relations.layer]:
            if layer not in self._handles:
                self._handles[layer] = self.decoder_layers[layer].register_forward_hook(self._hook(layer))

    def detach(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}
        self._token_handle.remove()

    def _take_tokens(self, module: nn.Module, args) -> None:
        self._tokens = args[0]

    def _forward_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The token ids [batch, seq] of the forward whose states `hidden` are."""
        if self._tokens is None or self._tokens.shape != hidden.shape[:2]:
            raise RuntimeError("routing needs the forward's token ids: call the model with input_ids")
        return self._tokens

    def swap(self, interventions: InterventionSet) -> None:
        """Point the hooks at another adapter with the same layers (version switch, rollback)."""
        if interventions.layers != self.interventions.layers:
            raise ValueError("the new adapter edits other layers than the attached one")
        self._hook_layers(interventions)
        interventions.router.hold_keys_in(self.key_dtype)
        self.interventions = interventions

    @contextmanager
    def intervene(
        self,
        mask: torch.Tensor | None,
        record: bool = False,
        interventions: InterventionSet | None = None,
        routes: Routes | None = None,
    ) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Intervene at `mask` positions during the forwards inside, with the attached adapter or
        the given one (same layers). `routes` (routing.py) decides which sealed blocks each row's
        prompt opens; without it every sealed block may act (no routing). With record=True the
        yielded dict fills with {layer: (weights [n, r], hidden [n, d])} for the intervened
        positions."""
        if interventions is not None and interventions.layers != self.interventions.layers:
            raise ValueError("that adapter edits other layers than the attached one")
        if interventions is not None and not {interventions.routing_layer, interventions.relations.layer} <= set(self._handles):
            raise ValueError("that adapter routes or checks relations at a layer that is not hooked")
        previous = self._mask, self._record, self._active, self._routes
        recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if record else None
        self._mask = mask
        self._record = recorded
        self._active = interventions
        self._routes = routes
        try:
            yield recorded if recorded is not None else {}
        finally:
            self._mask, self._record, self._active, self._routes = previous

    def _fallback_routes(self, layer: int, interventions: InterventionSet, mask: torch.Tensor) -> Routes:
        if layer == interventions.routing_layer:
            self._implicit = Routes(prompt=mask)
        return self._implicit

    def _hook(self, layer: int):
        def hook(module: nn.Module, args, output):
            mask = self._mask
            if mask is None:
                return output
            if self._groups is not None:
                return self._grouped(layer, module, args, output)
            hidden = output[0] if isinstance(output, tuple) else output
            if mask.shape != hidden.shape[:2]:
                raise RuntimeError(
                    f"intervention mask {tuple(mask.shape)} does not match hidden states "
                    f"{tuple(hidden.shape[:2])}"
                )
            interventions = self._active or self.interventions
            routes = None
            if interventions.router.enabled and interventions.sealed_blocks:
                # A caller that gives no routes gets them decided on this forward's intervened
                # positions: blocks that need routing never act unrouted.
                routes = self._routes or self._fallback_routes(layer, interventions, mask)
            if routes is not None and routes.prompt is not None and layer == interventions.routing_layer:
                routes.open = interventions.route(hidden, routes.prompt, self._forward_tokens(hidden), self.classes)
            relations = interventions.relations
            if (
                routes is not None
                and routes.prompt is not None
                and routes.open is not None
                and layer == relations.layer
                and relations.enabled
            ):
                routes.open = relations.shut(hidden, routes.prompt, self._forward_tokens(hidden), routes.open)
            if layer not in interventions.layers or not mask.any():  # nothing to edit here
                return output
            # Where each intervened position stands in the answer (only a caller's routes say).
            offsets = None if self._routes is None or self._routes.offsets is None else self._routes.offsets[mask]
            blocks_open = trainable_open = None
            if routes is not None and routes.open is not None:
                blocks_open = routes.open[mask.nonzero()[:, 0]]
                if offsets is not None:
                    blocks_open = interventions.router.in_window(blocks_open, offsets)
            if offsets is not None:
                trainable_open = interventions.router.trainable_in_window(offsets)
            selected = hidden[mask]
            record = self._record
            edited, weights = interventions(layer, selected, blocks_open, trainable_open, weighed=record is not None)
            if record is not None and weights is not None:
                record[layer] = (weights, selected)
            hidden = hidden.masked_scatter(mask.unsqueeze(-1), edited)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook


    # ----- rows on different adapters in one batch (continuous batching across versions) -----

    @contextmanager
    def intervene_rows(self, mask: torch.Tensor, groups: list[RowGroup]) -> Iterator[None]:
        """Intervene at `mask` positions [batch, seq] during the forwards inside, each group's
        rows with its own adapter (same layers as the attached one) and routes. Rows in no group
        run unedited."""
        for group in groups:
            if group.interventions.layers != self.interventions.layers:
                raise ValueError("that adapter edits other layers than the attached one")
            if not {group.interventions.routing_layer, group.interventions.relations.layer} <= set(self._handles):
                raise ValueError("that adapter routes or checks relations at a layer that is not hooked")
        previous = self._mask, self._groups
        self._mask, self._groups = mask, groups
        try:
            yield
        finally:
            self._mask, self._groups = previous

    def _grouped(self, layer: int, module: nn.Module, args, output):
        """Each group's rows go through the single-adapter hook with that group's adapter and
        routes; the other rows are left as they are."""
        hidden = output[0] if isinstance(output, tuple) else output
        groups, mask = self._groups, self._mask
        assert groups is not None and mask is not None  # the hook calls this only inside `intervene_rows`
        self._groups = None  # the single-adapter path below, not this one again
        tokens = self._tokens
        try:
            for group in groups:
                self._tokens = None if tokens is None else tokens[group.rows]
                with self.intervene(mask[group.rows], interventions=group.interventions, routes=group.routes):
                    edited = self._hook(layer)(module, args, hidden[group.rows])
                hidden = hidden.index_copy(0, group.rows, edited)
        finally:
            self._groups, self._tokens = groups, tokens
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class RowGroup:
    """The rows [k] of a batch that use one adapter, with their routes (`Routes` over those rows
    only, as `Attachment.intervene` takes them)."""

    def __init__(self, interventions: InterventionSet, rows: torch.Tensor, routes: Routes | None = None):
        self.interventions, self.rows, self.routes = interventions, rows, routes
