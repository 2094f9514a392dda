"""Unrelated prompts: what gates, routes and the relation check learn to stay off, and what is
computed from them once. The built-in pool serves a caller that has none of its own (the service
adds its edit log's locality probes)."""
from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import torch

from .attach import text_config
from .encoding import Example, encode_prompt
from .generation import generate
from .intervention import statistics
from .routing import Router, routable

if TYPE_CHECKING:
    from .editor import Editor

Statistics = tuple[torch.Tensor, torch.Tensor]  # per-coordinate center and scale (`intervention.statistics`)
BATCH = 32  # prompts a forward


def default_unrelated_prompts() -> list[str]:
    text = resources.files("baft_core").joinpath("unrelated_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class UnrelatedPool:
    """A list of unrelated prompts and the unedited model's states and statistics on them, each
    computed on first use and kept: every fresh adapter is calibrated with the same. The editor
    makes a new pool when its prompts change, so nothing here is ever invalidated; only the route
    keys follow the router they are read for (a loaded state may write its standardisation)."""

    def __init__(self, editor: Editor, prompts: list[str]):
        self.editor, self.prompts = editor, list(prompts)
        self._features: dict[int, torch.Tensor] | None = None
        self._routing_states: dict[int, torch.Tensor] = {}
        self._statistics: dict[object, Statistics] = {}
        self._relation_centers: dict[int, torch.Tensor] = {}
        self._routes: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __bool__(self) -> bool:
        return bool(self.prompts)

    @torch.no_grad()
    def features(self) -> dict[int, torch.Tensor]:
        """The unedited states at the positions an intervention would touch on the prompts, by
        edited layer: their last P positions and a few greedily generated tokens."""
        if self._features is None:
            editor = self.editor
            prompts = [encode_prompt(editor.tokenizer, p, editor.context) for p in self.prompts]
            examples = []
            for start in range(0, len(prompts), 32):
                chunk = prompts[start : start + 32]
                continuations = generate(
                    editor.model, editor.tokenizer, chunk, editor.config.unrelated_generate_tokens + 1, lock=editor.lock
                )
                examples += [Example(p, c if len(c) > 1 else c + [editor.pad_id]) for p, c in zip(chunk, continuations)]
            per_example = editor.hidden_states(examples)
            self._features = {layer: torch.cat([f[layer] for f in per_example]) for layer in editor.layers}
        return self._features

    @torch.no_grad()
    def routing_states(self, layer: int) -> torch.Tensor:
        """The unedited output of decoder layer `layer` at every position but the first [n, d]:
        what the router is standardised with and what route keys' thresholds stay above."""
        if layer not in self._routing_states:
            editor = self.editor
            parts = [torch.zeros(0, text_config(editor.model).hidden_size, device=editor.device)]
            for start in range(0, len(self.prompts), BATCH):
                ids = [encode_prompt(editor.tokenizer, p, editor.context) for p in self.prompts[start : start + BATCH]]
                hidden, mask = editor.routing_layer_output(ids, layer)
                parts.append(hidden[routable(mask.bool())].float())
            self._routing_states[layer] = torch.cat(parts)
        return self._routing_states[layer]

    def standardisations(self, router: Router) -> tuple[dict[int, Statistics], Statistics | None]:
        """The statistics at each edited layer, and at the router's layer where it routes (else
        None): what a fresh adapter's gates and router are calibrated with."""
        features = self.features()
        by_layer = {layer: self._statistics_of(layer, features[layer]) for layer in self.editor.layers}
        if not router.enabled:
            return by_layer, None
        return by_layer, self._statistics_of(("route", router.layer), self.routing_states(router.layer))

    def _statistics_of(self, key: object, states: torch.Tensor) -> Statistics:
        if key not in self._statistics:
            self._statistics[key] = statistics(states)
        return self._statistics[key]

    def routes(self, router: Router) -> torch.Tensor:
        """The prompts' positions as `router` compares them (unit rows), kept while its layer
        and standardisation stay the same."""
        cached = self._routes
        if cached is None or not (
            cached[0] == router.layer and torch.equal(cached[1], router.center) and torch.equal(cached[2], router.scale)
        ):
            keys = router.key(self.routing_states(router.layer))
            # Copies: a loaded state may write the router's buffers in place.
            self._routes = cached = (router.layer, router.center.clone(), router.scale.clone(), keys)
        return cached[3]

    def relation_center(self, layer: int) -> torch.Tensor:
        """The mean of the prompts' states at their last position at decoder layer `layer`: what
        the relation check is standardised with (relations.py)."""
        if layer not in self._relation_centers:
            self._relation_centers[layer] = self.editor.last_prompt_states(self.prompts, layer).mean(0)
        return self._relation_centers[layer]
