"""The editor: trains one adapter state with single, continual or batched edits."""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import torch

from .attach import Attachment, InterventionSet, text_config
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .config import EditConfig
from .data import EditRequest
from .encoding import (
    Example,
    context_limit,
    encode,
    encode_prompt,
    left_padded,
    pad_token_id,
    teacher_forced,
)
from .generation import generate
from .intervention import kept_span, statistics
from .objective import continuation_drift, load_balance, locality_margin, target_cross_entropy
from .prefix_cache import CachedBatch, SharedPrefixes, layer_output
from .routing import Router, routable, subject_token
from .subject_probes import probe_prompts
from .unrelated import default_unrelated_prompts

Statistics = tuple[torch.Tensor, torch.Tensor]  # per-coordinate center and scale (`intervention.statistics`)


@dataclass
class EditResult:
    steps: int
    loss: float
    seconds: float = 0.0  # the whole edit (route keys, neighbours, continuations, training)
    losses: dict[str, float] = field(default_factory=dict)
    basis_weights: dict[int, list[float]] = field(default_factory=dict)  # mean w_k on the edit


class Editor:
    """Holds a frozen model, an attached adapter and the edits applied to it (for replay)."""

    def __init__(
        self,
        model,
        tokenizer,
        config: EditConfig | None = None,
        unrelated_prompts: list[str] | None = None,
        interventions: InterventionSet | None = None,
    ):
        self.config = config or EditConfig()
        self.config.validate()
        self.model, self.tokenizer = model, tokenizer
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        self.device = next(model.parameters()).device
        self.pad_id = pad_token_id(tokenizer)
        self.context = context_limit(model)
        self.layers = self.config.resolved_layers(text_config(model).num_hidden_layers)
        self.history: list[EditRequest] = []
        self.attachment = Attachment(model, interventions or self.new_interventions())
        self.unrelated_prompts = (
            unrelated_prompts if unrelated_prompts is not None else default_unrelated_prompts()
        )
        self._unrelated_features: dict[int, torch.Tensor] | None = None
        # (routing layer, its states at the routable positions of the unrelated prompts)
        self._unrelated_states: tuple[int, torch.Tensor] | None = None
        # Their standardisation statistics by layer (`_statistics`), and the router keys of their
        # routing-layer states under one standardisation (layer, center, scale, keys).
        self._unrelated_statistics: dict = {}
        self._unrelated_keys: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # (routing layer, the route contexts' KV up to it): see `_route_contexts`.
        self._route_context_cache: tuple[int, SharedPrefixes] | None = None
        # (history index, {layer: hidden states}) of a sample of earlier edits; None: rebuild
        # from the history when needed (after a state was loaded).
        self._edit_features: list[tuple[int, dict[int, torch.Tensor]]] | None = []
        self._rng = random.Random(self.config.seed)
        # Held around every forward through the shared model (training steps, generation steps,
        # evaluation), so that generation interleaves with training at step granularity.
        self.lock = threading.RLock()

    # ----- adapter state -----
    @property
    def interventions(self) -> InterventionSet:
        return self.attachment.interventions

    def new_interventions(self) -> InterventionSet:
        text = text_config(self.model)
        cfg = self.config
        interventions = InterventionSet(
            text.hidden_size,
            self.layers,
            cfg.rank,
            cfg.method == "baft",
            cfg.sealed_cutoff,
            cfg.route_threshold if cfg.block_edits else 0.0,
            cfg.sealed_gates,
            cfg.resolved_route_layer(text.num_hidden_layers),
            cfg.seed,
        )
        return interventions.to(self.device)

    def reset(self) -> None:
        """Back to the unedited model: a fresh adapter and an empty history."""
        self.attachment.swap(self.new_interventions())
        self.history = []
        self._edit_features = []

    def load_state(self, interventions: InterventionSet, history: list[EditRequest]) -> None:
        self.attachment.swap(interventions.to(self.device))
        self.history = list(history)
        self._edit_features = None

    def save(self, directory, base_model: str, segments=None, parent: Checkpoint | None = None) -> dict:
        """Checkpoint the adapter state; returns the manifest (with the file's sha256). Sealed
        blocks go to `segments` (default: inside `directory`), which checkpoints may share.
        `parent`: a saved checkpoint this state extends, so that only what it adds is written."""
        return save_checkpoint(directory, self.interventions, self.config, base_model, self.history, segments, parent)

    def load(self, directory, base_model: str | None = None, segments=None) -> dict:
        """Swap in a saved adapter state (no reload of the base model); returns its manifest."""
        checkpoint = load_checkpoint(directory, base_model, self.device, segments)
        if checkpoint.interventions.layers != self.layers:
            raise CheckpointError(
                f"checkpoint edits layers {checkpoint.interventions.layers}, this editor {self.layers}"
            )
        self.load_state(checkpoint.interventions, checkpoint.history)
        return checkpoint.manifest

    # ----- editing -----
    def edit(self, request: EditRequest) -> EditResult:
        """Continual editing: one more edit into the current adapter, replaying earlier ones."""
        return self._apply([request], self.config.max_steps)

    def edit_batch(self, requests: list[EditRequest]) -> EditResult:
        """Batched editing: several edits trained together in one run."""
        if not requests:
            raise ValueError("no edits in the batch")
        return self._apply(list(requests), self.config.max_steps_batched)

    def _apply(self, requests: list[EditRequest], max_steps: int) -> EditResult:
        """Trains a copy of the current adapter and publishes it when done: readers never see a
        half-trained state."""
        cfg = self.config
        start = time.perf_counter()  # the whole edit: keys, neighbours, continuations, training
        block = cfg.block_edits
        sealing = bool(block) and int(self.interventions.edit_count) + len(requests) >= block
        # A block sealed now without its gates acts at full weight on the prompts routed to it:
        # train it so, and with every edit it holds. (The adapter decides: one loaded from
        # before routing keeps gated blocks.)
        sealed_gates = self.interventions.sealed_gates
        gated = cfg.method == "baft" and (sealed_gates or not sealing)
        earlier = self._block_history() if sealing and not sealed_gates else self._replay_sample()
        new = [self.encode(r.prompt, r.target) for r in requests]
        keys, owners = self._route_states(requests) if self.interventions.router.enabled else (None, None)
        replayed = [self.encode(r.prompt, r.target) for r in earlier + self._neighbours(keys)]
        working = self.interventions.fork()
        # A routed block acts within its answers' window (routing.py), while it trains too: a
        # block sealed now is not there after the answer to be trained.
        windowed = cfg.answer_window and working.router.enabled
        if windowed:
            working.router.widen_window(max(len(e.answer) for e in new))
        result = self._train(
            working, new, replayed, max_steps, gated, acts_after_answer=not (sealing and windowed), requests=requests
        )
        if keys is not None:
            self._add_route_keys(working, keys, owners + len(self.history))
        if sealing:
            working.seal()
        with self.lock:
            self.attachment.swap(working)
            self.history.extend(requests)
        result.seconds = time.perf_counter() - start
        return result

    def keep_prompts(self, request: EditRequest) -> list[str]:
        """The prompts the request's block must leave as they are: other relations of its subject
        (`subject_probes.py`) and the request's own `locality` prompts; those that do not fit the
        model's context are left out."""
        prompts = probe_prompts(request.prompt, request.subject, self.config.subject_probes)
        prompts += [p.prompt for p in request.locality]
        return [p for p in prompts if len(encode_prompt(self.tokenizer, p)) < self.context]

    def _block_history(self) -> list[EditRequest]:
        """The edits the trainable block holds: the latest `edit_count` (sealing resets it)."""
        count = int(self.interventions.edit_count)
        return self.history[len(self.history) - count :] if count else []

    def _replay_sample(self) -> list[EditRequest]:
        """A bounded sample of the edits that share the trainable block (all edits when no block
        is ever sealed): those are the ones a new edit can overwrite."""
        pool = self._block_history() if self.config.block_edits else self.history
        k = min(self.config.replay_size, len(pool))
        return self._rng.sample(pool, k) if k else []

    @torch.no_grad()
    def _route_states(self, requests: list[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """The unedited routing-layer states [k, d] the requests' route keys are made of: at the
        subject of each prompt, alone and after each of `route_contexts` (a context that would
        overflow the model's context is left out); and the request of each [k]."""
        contexts = self._route_contexts() if self.config.route_contexts else None
        states, owners = [], []
        for j, request in enumerate(requests):
            cuts = []
            for context in ["", *self.config.route_contexts]:
                text = f"{context} {request.prompt}" if context else request.prompt
                ids = encode_prompt(self.tokenizer, text)
                if len(ids) <= self.context:
                    # Attention is causal: what follows the subject cannot change its state, so
                    # it is not computed (a sixth to a quarter of the tokens on ZsRE and CounterFact).
                    cuts.append(ids[: subject_token(self.tokenizer, text, request.subject) + 1])
            suffix = None
            if contexts is not None and len(cuts) == len(contexts.prefixes) + 1:
                suffix = _shared_suffix(cuts[1:], contexts.prefixes)
            with self.lock:
                if suffix is None:  # the contexts' tokens change at the seam: each prompt whole
                    hidden, _ = self.routing_layer_output(cuts)
                    states.append(hidden[:, -1])  # left-padded: each subject is last
                else:  # the contexts' KV is cached: only the prompts' own tokens are computed
                    states += [self.routing_layer_output([cuts[0]])[0][:, -1], contexts.last_states(suffix)]
            owners += [j] * len(cuts)
        return torch.cat(states).float(), torch.tensor(owners)

    def _route_contexts(self) -> SharedPrefixes:
        """The route contexts' unedited KV up to the routing layer, computed once per layer."""
        layer = self.interventions.routing_layer
        if self._route_context_cache is None or self._route_context_cache[0] != layer:
            prefixes = [encode_prompt(self.tokenizer, c) for c in self.config.route_contexts]
            with self.lock:
                shared = SharedPrefixes(self.model, self.attachment.decoder_layers[layer], prefixes, self.pad_id)
            self._route_context_cache = (layer, shared)
        return self._route_context_cache[1]

    @torch.no_grad()
    def routing_layer_output(
        self, prompts: list[list[int]], layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The unedited output [batch, seq, d] of decoder layer `layer` (default: the adapter's
        routing layer) for encoded prompts, left-padded, and their attention mask [batch, seq]."""
        layer = self.interventions.routing_layer if layer is None else layer
        ids, attention = left_padded(prompts, self.pad_id)
        ids, attention = ids.to(self.device), attention.to(self.device)
        with self.lock:
            return layer_output(self.model, self.attachment.decoder_layers[layer], ids, attention), attention

    @torch.no_grad()
    def _neighbours(self, states: torch.Tensor | None) -> list[EditRequest]:
        """Sealed edits with a route key within its threshold of one of the new edits' key
        states, nearest first (at most `route_neighbours`): their prompts will open the new block
        too, so it is trained to leave their answers as they are."""
        router, limit = self.interventions.router, self.config.route_neighbours
        if states is None or not limit or not len(router.keys):
            return []
        scores = (router.key(states) @ router.keys.T).amax(0)  # best match of each stored key
        near = (scores > router.key_threshold).nonzero().squeeze(1)
        chosen: list[int] = []
        for i in near[scores[near].argsort(descending=True)].tolist():
            edit = int(router.key_edit[i])
            if edit not in chosen:
                chosen.append(edit)
        return [self.history[i] for i in chosen[:limit]]

    def _add_route_keys(self, interventions: InterventionSet, states: torch.Tensor, edits: torch.Tensor) -> None:
        """Leaves the new edits' route keys (history index `edits` each) in the trainable block,
        each with its threshold above the unrelated prompts (`route_margin`)."""
        router, margin = interventions.router, self.config.route_margin
        thresholds = None
        if margin is not None:
            thresholds = router.thresholds(router.key(states), self._unrelated_routes(interventions), margin)
        router.add_pending(states, edits, thresholds)

    def encode(self, prompt: str, answer: str) -> Example:
        return encode(self.tokenizer, prompt, answer, self.context)

    def _optimizer(self, interventions: InterventionSet) -> torch.optim.Optimizer:
        cfg = self.config
        rotations, sources, gates = [], [], []
        for intervention in interventions.by_layer.values():
            rotations += list(intervention.rotation.parameters())
            sources += list(intervention.source.parameters())
            if intervention.gated:
                gates += list(intervention.gate.parameters())
        groups = [
            # Never decay R: decay pulls it off the orthonormal set (to zero, with torch's
            # Householder parametrization).
            {"params": rotations, "lr": cfg.lr, "weight_decay": 0.0},
            {"params": sources, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        ]
        if gates:
            groups.append({"params": gates, "lr": cfg.gate_lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups)
        # Keep every R orthonormal after each step, whoever drives this optimizer.
        optimizer.register_step_post_hook(
            lambda *_: [i.orthonormalize() for i in interventions.by_layer.values()]
        )
        return optimizer

    def _train(
        self,
        interventions: InterventionSet,
        new: list[Example],
        replayed: list[Example],
        max_steps: int,
        gated: bool = True,
        acts_after_answer: bool = True,
        requests: list[EditRequest] | None = None,
    ) -> EditResult:
        """Trains the new edits (and replayed ones) into the trainable block, with its gates
        (BaFT's objective) or with every gate fixed at 1 (gated=False, or ReFT).
        `acts_after_answer`: whether the block will act on what follows the answer (False for a
        block sealed within its answer's window). `requests`: the new edits, whose prompts about
        the same subject (`keep_prompts`) the gates learn to stay closed on."""
        cfg = self.config
        gated = gated and cfg.method == "baft"
        features = None
        if (gated or interventions.router.enabled) and self.unrelated_prompts:
            features = self.unrelated_features()
            if not interventions.calibrated:  # the gates' and the routes' standardisation
                by_layer, routes = self._standardisations(interventions.router)
                for layer in interventions.layers:
                    interventions[layer].calibrate(*by_layer[layer])
                if routes is not None:
                    interventions.router.calibrate(*routes)
        unrelated = opened = kept = None
        if gated and features is not None:
            unrelated, opened = self._gate_examples(interventions, features, requests or [])
        elif not gated and interventions.router.enabled:
            kept = self._kept_states(requests or [])
        blocks = list(interventions.by_layer.values())
        for intervention in blocks:
            intervention.gated = intervention.gated and gated
        try:
            # An ungated block that acts after the answer is trained to leave what the unedited
            # model says there as it was (gated blocks close their gates there instead).
            continuation = not gated and acts_after_answer and cfg.continuation_weight > 0
            return self._fit(
                interventions, new, replayed, max_steps, gated=gated, unrelated=unrelated, continuation=continuation,
                opened=opened, kept=kept,
            )
        finally:
            for intervention in blocks:
                intervention.gated = cfg.method == "baft"

    @torch.no_grad()
    def _kept_states(self, requests: list[EditRequest]) -> dict[int, torch.Tensor] | None:
        """The unedited states, by edited layer, at every position where a block acts on the
        `locality` prompts that name the new edits' subjects (their last prompt positions, and
        their answers' when given): those the new edits came with, and those earlier edits of the
        same subject came with, since the new block opens on that subject too (without them a
        second edit of a subject undid what the first was told to keep); None where there are
        none. A prompt about another subject does not open the block (routing) and is left out:
        CounterFact's (other subjects, the same relation), projected out, took most of the edit's
        paraphrases with them. Nor is a prompt that a new edit itself asks: its new answer wins."""
        subjects = {r.subject.strip().lower() for r in requests if r.subject and r.subject.strip()}
        earlier = [r for r in self.history if r.subject and r.subject.strip().lower() in subjects]
        asked = {" ".join(r.prompt.lower().split()) for r in requests}
        probes = [
            p
            for r in earlier + requests
            for p in r.locality
            if (not r.subject or r.subject.strip().lower() in p.prompt.lower())
            and " ".join(p.prompt.lower().split()) not in asked
            and len(encode_prompt(self.tokenizer, p.prompt)) < self.context
        ]
        if not probes:
            return None
        examples = [
            self.encode(p.prompt, p.answer) if p.answer.strip() else Example(encode_prompt(self.tokenizer, p.prompt), [self.pad_id])
            for p in probes
        ]
        states = self._hidden_states(examples)
        return {layer: torch.cat([s[layer] for s in states]) for layer in self.layers}

    @torch.no_grad()
    def _gate_examples(
        self, interventions: InterventionSet, features: dict[int, torch.Tensor], requests: list[EditRequest]
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
        """What the gates learn besides the edit's own positions, as gate inputs by layer: where
        to stay closed, and where else to open (None: nowhere else).

        A block that routing opens only on its subject's prompts (sealed with gates) must tell
        the subject's relations apart: it stays closed on other relations of the same subject
        (`keep_prompts`) and opens on its prompt after each route context, since paraphrases
        say something before the subject. Other blocks (no routing, or no same-subject
        prompts) stay closed on the unrelated prompts and on the edits of sealed blocks."""
        layers = interventions.layers
        probes = [p for r in requests for p in self.keep_prompts(r)]
        routed = interventions.router.enabled and interventions.sealed_gates
        if routed and probes:
            contexts = [f"{c} {r.prompt}" for r in requests for c in self.config.route_contexts]
            states = self._prompt_states(probes + contexts)  # one pass for both

            def inputs(part: list[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
                return {layer: interventions[layer].gate_inputs(torch.cat([s[layer] for s in part])) for layer in layers}

            return inputs(states[: len(probes)]), inputs(states[len(probes) :]) if contexts else None
        sealed_edits = self.sealed_edit_features()
        return {layer: interventions[layer].gate_inputs(torch.cat([features[layer], sealed_edits[layer]])) for layer in layers}, None

    def _fit(
        self,
        interventions: InterventionSet,
        new: list[Example],
        replayed: list[Example],
        max_steps: int,
        *,
        gated: bool,
        unrelated: dict[int, torch.Tensor] | None,
        continuation: bool,
        opened: dict[int, torch.Tensor] | None = None,
        kept: dict[int, torch.Tensor] | None = None,
    ) -> EditResult:
        """The optimisation itself (see `_train`); `unrelated`: the gate inputs the gates must stay
        closed on, None for no locality margins; `opened`: gate inputs they must open on beside
        the edits' own positions; `continuation`: train the distribution after the answer to stay
        the unedited model's (`objective.continuation_drift`); `kept`: states where the block's
        change must stay zero (`_kept_states`)."""
        cfg = self.config
        keep_after = cfg.continuation_tokens if continuation else None
        with self.lock, torch.no_grad():
            batch = CachedBatch(
                self.model,
                self.attachment,
                interventions,
                new + replayed,
                cfg.prompt_positions,
                self.pad_id,
                keep_after,
                self.tokenizer.eos_token_id,
            )
        is_new = batch.rows < len(new)
        on_edit = ~batch.after_answer
        optimizer = self._optimizer(interventions)
        if kept is not None:
            # The request's own locality prompts about its subject: after every step the block's
            # change is made exactly zero at their states (a null-space constraint, as AlphaEdit
            # puts on its updates). Not the built-in probes (`subject_probes`): projected out too,
            # they kept the subject's other facts but took most paraphrases with them, as the
            # gates do (docs/method.md).
            spans = {layer: kept_span(kept[layer]) for layer in interventions.layers}
            optimizer.register_step_post_hook(
                lambda *_: [interventions[layer].leave_alone(*spans[layer]) for layer in interventions.layers]
            )
        interventions.train()
        # The edit loss does not train the gates, only the margins do: letting it made the gates
        # open on unrelated inputs (locality 0.67 against 0.99 on 8 ZsRE edits) and the loss swing.
        for intervention in interventions.by_layer.values():
            intervention.gate_follows_edit = False
        steps, parts = 0, {}
        for steps in range(1, max_steps + 1):  # noqa: B007 (the count is read after the loop)
            with self.lock:
                step = batch.forward()
            logits, record = step.logits, step.record
            ce = target_cross_entropy(logits, batch.targets)
            loss, parts = ce, {"ce": ce.item()}
            if continuation:
                drift = continuation_drift(step.continuation, batch.unedited_continuation)
                loss = loss + cfg.continuation_weight * drift
                parts["continuation"] = drift.item()
            if gated:
                usage, margin = [], 0.0
                for layer in interventions.layers:
                    weights, hidden = record[layer]
                    usage.append(weights[is_new & on_edit, : interventions.rank].mean(0))
                    if unrelated is not None:
                        logits = interventions[layer].gate_logits(hidden)
                        closed = torch.cat([interventions[layer].gate(unrelated[layer]), logits[~on_edit]])
                        edit_logits = logits[on_edit]
                        if opened is not None:
                            edit_logits = torch.cat([edit_logits, interventions[layer].gate(opened[layer])])
                        margin = margin + locality_margin(edit_logits, closed, cfg.alpha, cfg.beta, cfg.gamma)
                balance = load_balance(
                    torch.stack(usage), interventions.usage_sum, int(interventions.edit_count)
                )
                loss = loss + cfg.balance_weight * balance
                parts["balance"] = balance.item()
                if unrelated is not None:
                    margin = margin / len(interventions.layers)
                    loss = loss + cfg.locality_weight * margin
                    parts["margin"] = margin.item()
            parts["loss"] = loss.item()
            # Stop once the edit is learnt (cross-entropy and balancing): what is left of the
            # margins then costs the gate polish microseconds, where each step here costs a
            # forward and backward pass. The continuation's drift shapes the steps but does not
            # hold the stop: bringing it under 0.01 took 30-40 steps instead of 5.
            if parts["ce"] + cfg.balance_weight * parts.get("balance", 0.0) < cfg.stop_loss:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        interventions.eval()
        for intervention in interventions.by_layer.values():
            intervention.gate_follows_edit = True
        if unrelated is not None and cfg.gate_polish_steps:
            parts["margin_polished"] = self._polish_gates(interventions, record, on_edit, unrelated, opened)
        if gated and cfg.block_edits and interventions.sealed_gates:
            record, extra, parts["ce_sealed"] = self._fit_under_cutoff(interventions, batch, optimizer, max_steps)
            steps += extra
        weights = self._record_usage(interventions, record, is_new & ~batch.after_answer, len(new))
        self._remember_edit_features(record, batch.rows, on_edit, len(new))
        return EditResult(
            steps=steps,
            loss=parts["loss"],
            losses=parts,
            basis_weights=weights,
        )

    def _fit_under_cutoff(
        self, interventions: InterventionSet, batch: CachedBatch, optimizer, max_steps: int
    ) -> tuple[dict, int, float]:
        """Sealing cuts gates below `sealed_cutoff` to exactly 0, and the polish has moved the
        gates: fit R, A, b again under the gates as they will be sealed, so that the sealed
        block does what was trained. Usually the first check already passes. Returns the last
        forward's record, the extra steps and the edit's cross-entropy as sealed."""
        cfg = self.config
        for intervention in interventions.by_layer.values():
            intervention.cutoff = cfg.sealed_cutoff
            intervention.gate_follows_edit = False
        interventions.train()
        try:
            for extra in range(max_steps + 1):
                with self.lock:
                    logits, _, record = batch.forward()
                ce = target_cross_entropy(logits, batch.targets)
                if ce.item() < cfg.stop_loss or extra == max_steps:
                    return record, extra, ce.item()
                optimizer.zero_grad(set_to_none=True)
                ce.backward()  # the gates are untouched: the edit loss does not reach them
                optimizer.step()
        finally:
            interventions.eval()
            for intervention in interventions.by_layer.values():
                intervention.cutoff = 0.0
                intervention.gate_follows_edit = True
        raise AssertionError("unreachable: the loop returns on its last iteration")

    def _polish_gates(self, interventions, record, on_edit, unrelated, opened) -> float:
        """Meets the locality margins on the gates alone, from the hidden states of the last
        training forward: no model forward is needed, so a step costs a few small matrix
        products. The gates on the edit are held where training left them."""
        cfg = self.config
        layers = interventions.layers
        optimizer = torch.optim.Adam(
            [p for layer in layers for p in interventions[layer].gate.parameters()], lr=cfg.gate_lr
        )
        with torch.no_grad():
            inputs = {layer: interventions[layer].gate_inputs(record[layer][1]) for layer in layers}
            anchor = {layer: interventions[layer].gate(inputs[layer][on_edit]) for layer in layers}
        margin = torch.zeros(())
        for _ in range(cfg.gate_polish_steps):
            margin, drift = torch.zeros(()), torch.zeros(())
            for layer in layers:
                logits = interventions[layer].gate(inputs[layer])
                closed = torch.cat([interventions[layer].gate(unrelated[layer]), logits[~on_edit]])
                edit_logits = logits[on_edit]
                if opened is not None:
                    edit_logits = torch.cat([edit_logits, interventions[layer].gate(opened[layer])])
                margin = margin + locality_margin(edit_logits, closed, cfg.alpha, cfg.beta, cfg.gamma)
                drift = drift + (logits[on_edit] - anchor[layer]).pow(2).mean()
            if margin.item() / len(layers) <= cfg.polish_tolerance:
                break
            optimizer.zero_grad(set_to_none=True)
            (margin + drift).backward()
            optimizer.step()
        return margin.item() / len(layers)

    @torch.no_grad()
    def _record_usage(
        self, interventions: InterventionSet, record: dict, on_new_edit: torch.Tensor, count: int
    ) -> dict[int, list[float]]:
        """Adds this edit's mean basis weights to the running usage, and returns them. The weights
        are the final gates' on the hidden states of the last training forward (no extra pass)."""
        usage = torch.stack(
            [
                interventions[layer].weights(record[layer][1][on_new_edit]).mean(0)
                for layer in interventions.layers
            ]
        )
        interventions.usage_sum += usage * count
        interventions.edit_count += count
        return {layer: usage[i].tolist() for i, layer in enumerate(interventions.layers)}

    # ----- edits of sealed blocks: negatives for the gates of new blocks -----
    def sealed_edit_features(self) -> dict[int, torch.Tensor]:
        """Hidden states at the intervened positions of a bounded, uniform sample of the edits in
        sealed blocks (kept by reservoir sampling as edits arrive), stacked per layer."""
        sealed_count = len(self.history) - int(self.interventions.edit_count)
        if self._edit_features is None:  # a loaded state: rebuild the sample from the edit log
            k = min(self.config.negative_edits, sealed_count)
            sample = sorted(self._rng.sample(range(sealed_count), k))
            examples = [self.encode(self.history[i].prompt, self.history[i].target) for i in sample]
            self._edit_features = list(zip(sample, self._hidden_states(examples)))
        chosen = [features for index, features in self._edit_features if index < sealed_count]
        hidden = text_config(self.model).hidden_size
        return {
            layer: torch.cat([f[layer] for f in chosen]) if chosen else torch.zeros(0, hidden, device=self.device)
            for layer in self.layers
        }

    @torch.no_grad()
    def _remember_edit_features(self, record, rows, on_edit, count: int) -> None:
        """Adds the new edits' hidden states (from their last training forward) to the sample."""
        capacity = self.config.negative_edits
        if not self.config.block_edits or not capacity or self._edit_features is None:
            return
        for j in range(count):
            index = len(self.history) + j
            features = {layer: record[layer][1][(rows == j) & on_edit].float().clone() for layer in self.layers}
            if len(self._edit_features) < capacity:
                self._edit_features.append((index, features))
            else:  # reservoir sampling: every edit so far is in the sample with equal odds
                slot = self._rng.randrange(index + 1)
                if slot < capacity:
                    self._edit_features[slot] = (index, features)

    # ----- unrelated inputs the gates must stay closed on -----
    def prepare(self) -> None:
        """Computes now what the first edit would otherwise compute once (about 9 s for the
        default 100 unrelated prompts on two CPU cores): the unrelated prompts' states and their
        statistics at the edited and routing layers, and the route contexts' KV."""
        router = self.interventions.router
        if (self.config.method == "baft" or router.enabled) and self.unrelated_prompts:
            self._standardisations(router)
        if router.enabled and self.config.route_contexts:
            self._route_contexts()

    def _standardisations(self, router: Router) -> tuple[dict[int, Statistics], Statistics | None]:
        """The unrelated prompts' statistics at each edited layer, and at the router's layer where
        it routes (else None): what a fresh adapter's gates and router are calibrated with."""
        features = self.unrelated_features()
        by_layer = {layer: self._statistics(layer, features[layer]) for layer in self.layers}
        if not router.enabled:
            return by_layer, None
        return by_layer, self._statistics(("route", router.layer), self._unrelated_routing_states(router.layer))

    def set_unrelated_prompts(self, prompts: list[str]) -> None:
        self.unrelated_prompts = list(prompts)
        self._unrelated_features = None
        self._unrelated_states = None
        self._unrelated_statistics = {}
        self._unrelated_keys = None

    @torch.no_grad()
    def _unrelated_routing_states(self, layer: int) -> torch.Tensor:
        """The unedited output of decoder layer `layer` at every position but the first of the
        unrelated prompts [n, d]: what the router is standardised with and what route keys'
        thresholds must stay above. Computed once per layer."""
        if self._unrelated_states is None or self._unrelated_states[0] != layer:
            parts = [torch.zeros(0, text_config(self.model).hidden_size, device=self.device)]
            for start in range(0, len(self.unrelated_prompts), 32):
                chunk = self.unrelated_prompts[start : start + 32]
                ids = [encode_prompt(self.tokenizer, p, self.context) for p in chunk]
                hidden, attention = self.routing_layer_output(ids, layer)
                parts.append(hidden[routable(attention.bool())].float())
            self._unrelated_states = (layer, torch.cat(parts))
        return self._unrelated_states[1]

    def _statistics(self, key, states: torch.Tensor) -> Statistics:
        """The standardisation of the unrelated prompts' `states` at an edited layer (key: the
        layer) or the routing layer (key: ("route", layer)), computed once: every fresh adapter
        is calibrated with the same (a single edit on a fresh adapter spent 9 ms on it)."""
        if key not in self._unrelated_statistics:
            self._unrelated_statistics[key] = statistics(states)
        return self._unrelated_statistics[key]

    def _unrelated_routes(self, interventions: InterventionSet) -> torch.Tensor:
        """The unrelated prompts' positions as the adapter's router compares them (unit rows);
        kept while the router's standardisation stays the same."""
        router, cached = interventions.router, self._unrelated_keys
        if cached is None or not (
            cached[0] == router.layer and torch.equal(cached[1], router.center) and torch.equal(cached[2], router.scale)
        ):
            keys = router.key(self._unrelated_routing_states(router.layer))
            # Copies: a loaded state may write the router's buffers in place.
            self._unrelated_keys = cached = (router.layer, router.center.clone(), router.scale.clone(), keys)
        return cached[3]

    @torch.no_grad()
    def unrelated_features(self) -> dict[int, torch.Tensor]:
        """Hidden states of the unedited model at the positions an intervention would touch on the
        unrelated prompts: their last P positions and a few greedily generated tokens."""
        if self._unrelated_features is not None:
            return self._unrelated_features
        prompts = [encode_prompt(self.tokenizer, p, self.context) for p in self.unrelated_prompts]
        examples = []
        for start in range(0, len(prompts), 32):
            chunk = prompts[start : start + 32]
            continuations = generate(
                self.model, self.tokenizer, chunk, self.config.unrelated_generate_tokens + 1, lock=self.lock
            )
            examples += [
                Example(p, c if len(c) > 1 else c + [self.pad_id]) for p, c in zip(chunk, continuations)
            ]
        per_example = self._hidden_states(examples)
        self._unrelated_features = {layer: torch.cat([f[layer] for f in per_example]) for layer in self.layers}
        return self._unrelated_features

    def _prompt_states(self, prompts: list[str]) -> list[dict[int, torch.Tensor]]:
        """Per prompt, the unedited states [positions, d] at each edited layer at its last P
        positions (where a block acts on a prompt)."""
        # One answer token: teacher forcing feeds none of it, so only prompt positions are read.
        return self._hidden_states([Example(encode_prompt(self.tokenizer, p), [self.pad_id]) for p in prompts])

    @torch.no_grad()
    def _hidden_states(self, examples: list[Example]) -> list[dict[int, torch.Tensor]]:
        """Per example, the unedited model's hidden states [positions, d] at each edited layer's
        intervened positions, teacher-forced."""
        out: list[dict[int, torch.Tensor]] = []
        for start in range(0, len(examples), 32):
            tf = teacher_forced(examples[start : start + 32], self.config.prompt_positions, self.pad_id)
            with self.lock:  # the decoder alone: no logits are needed
                result = self.model.base_model(
                    input_ids=tf.input_ids.to(self.device),
                    attention_mask=tf.attention_mask.to(self.device),
                    output_hidden_states=True,
                )
            mask = tf.intervene.to(self.device)
            for row in range(mask.shape[0]):
                out.append({layer: result.hidden_states[layer + 1][row][mask[row]].float() for layer in self.layers})
        return out

    # ----- using the edited model -----
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 32,
        edited: bool = True,
        interventions: InterventionSet | None = None,
        **sampling,
    ) -> list[str]:
        """Decoded continuations; `interventions` generates from another adapter state (an older
        version) without swapping it in, `edited=False` from the unedited model."""
        ids = [encode_prompt(self.tokenizer, p, self.context) for p in prompts]
        rows = generate(
            self.model,
            self.tokenizer,
            ids,
            max_new_tokens,
            self.attachment if edited else None,
            self.config.prompt_positions,
            interventions=interventions,
            lock=self.lock,
            **sampling,
        )
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]


def _shared_suffix(prompts: list[list[int]], prefixes: list[list[int]]) -> list[int] | None:
    """The tokens every prompt has after its prefix, when each prompt is its prefix followed by
    one and the same non-empty suffix (else None: a tokenizer may merge tokens across the seam)."""
    suffixes = [p[len(q) :] for p, q in zip(prompts, prefixes) if p[: len(q)] == q]
    if len(suffixes) != len(prefixes) or not suffixes[0] or any(s != suffixes[0] for s in suffixes):
        return None
    return suffixes[0]
