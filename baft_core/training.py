"""The training of one edit's trainable block: the optimizer, the gates' examples, the fit of R, A,
b (and the gates) to the new and replayed edits, the gate polish, the refit under the sealing
cutoff, and the sample of sealed edits whose states the gates of new blocks stay closed on."""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .attach import InterventionSet, text_config
from .data import EditRequest
from .encoding import Example, encode_prompt
from .intervention import kept_span
from .objective import continuation_drift, load_balance, locality_margin, target_cross_entropy
from .prefix_cache import CachedBatch

if TYPE_CHECKING:
    from .editor import Editor


@dataclass
class EditResult:
    steps: int
    loss: float
    seconds: float = 0.0  # the whole edit (route keys, neighbours, continuations, training)
    losses: dict[str, float] = field(default_factory=dict)
    basis_weights: dict[int, list[float]] = field(default_factory=dict)  # mean w_k on the edit


class Trainer:
    """Trains the trainable block of an adapter (the editor's fork, published when done) on one
    edit or batch, and keeps the sample of sealed edits its gates stay closed on. The editor is
    the collaborator for the model, tokenizer, attachment, lock, history and the unedited states
    of the prompts involved."""

    def __init__(self, editor: Editor, rng: random.Random):
        self.editor = editor
        # Shared with the editor's replay sample: one seeded stream for both.
        self.rng = rng
        # (history index, {layer: hidden states}) of a sample of earlier edits; None: rebuild
        # from the history when needed (after a state was loaded).
        self.edit_features: list[tuple[int, dict[int, torch.Tensor]]] | None = []

    def calibrate(self, interventions: InterventionSet) -> None:
        """Standardises a fresh adapter's gates, routes and relation check with the statistics of
        the unrelated prompts (a non-empty pool)."""
        unrelated_pool = self.editor.unrelated
        by_layer, routes = unrelated_pool.standardisations(interventions.router)
        for layer in interventions.layers:
            interventions[layer].calibrate(*by_layer[layer])
        if routes is not None:
            interventions.router.calibrate(*routes)
        if interventions.relations.enabled:
            interventions.relations.calibrate(unrelated_pool.relation_center(interventions.relations.layer))

    def train(
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
        the same subject (`Editor.keep_prompts`) the gates learn to stay closed on."""
        cfg = self.editor.config
        gated = gated and cfg.method == "baft"
        features = None
        unrelated_pool = self.editor.unrelated
        if (gated or interventions.router.enabled) and unrelated_pool:
            features = unrelated_pool.features()
            if not interventions.calibrated:
                self.calibrate(interventions)
        unrelated = opened = kept = None
        if gated and features is not None:
            unrelated, opened = self._gate_examples(interventions, features, requests or [])
        elif not gated and interventions.router.enabled:
            kept = self._kept_states(requests or [])
        blocks = interventions.trainable_blocks()
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

    def _optimizer(self, interventions: InterventionSet) -> torch.optim.Optimizer:
        cfg = self.editor.config
        rotations, sources, gates = [], [], []
        for intervention in interventions.trainable_blocks():
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
        def orthonormalize(*_: object) -> None:
            for block in interventions.trainable_blocks():  # the blocks in place when it steps
                block.orthonormalize()

        optimizer.register_step_post_hook(orthonormalize)
        return optimizer

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
        editor = self.editor
        subjects = {r.subject.strip().lower() for r in requests if r.subject and r.subject.strip()}
        earlier = [r for r in editor.history if r.subject and r.subject.strip().lower() in subjects]
        asked = {" ".join(r.prompt.lower().split()) for r in requests}
        probes = [
            p
            for r in earlier + requests
            for p in r.locality
            if (not r.subject or r.subject.strip().lower() in p.prompt.lower())
            and " ".join(p.prompt.lower().split()) not in asked
            and len(encode_prompt(editor.tokenizer, p.prompt)) < editor.context
        ]
        if not probes:
            return None
        examples = [
            editor.encode(p.prompt, p.answer) if p.answer.strip() else Example(encode_prompt(editor.tokenizer, p.prompt), [editor.pad_id])
            for p in probes
        ]
        states = editor.hidden_states(examples)
        return {layer: torch.cat([s[layer] for s in states]) for layer in editor.layers}

    @torch.no_grad()
    def _gate_examples(
        self, interventions: InterventionSet, features: dict[int, torch.Tensor], requests: list[EditRequest]
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
        """What the gates learn besides the edit's own positions, as gate inputs by layer: where
        to stay closed, and where else to open (None: nowhere else).

        A block that routing opens only on its subject's prompts (sealed with gates) must tell
        the subject's relations apart: it stays closed on other relations of the same subject
        (`Editor.keep_prompts`) and opens on its prompt after each route context, since paraphrases
        say something before the subject. Other blocks (no routing, or no same-subject
        prompts) stay closed on the unrelated prompts and on the edits of sealed blocks."""
        layers = interventions.layers
        routed = interventions.router.enabled and interventions.sealed_gates
        probes = [p for r in requests for p in self.editor.keep_prompts(r)] if routed else []
        if probes:
            contexts = [f"{c} {r.prompt}" for r in requests for c in self.editor.config.route_contexts]
            states = self.editor._prompt_states(probes + contexts)  # one pass for both

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
        """The optimisation itself (see `train`); `unrelated`: the gate inputs the gates must stay
        closed on, None for no locality margins; `opened`: gate inputs they must open on beside
        the edits' own positions; `continuation`: train the distribution after the answer to stay
        the unedited model's (`objective.continuation_drift`); `kept`: states where the block's
        change must stay zero (`_kept_states`)."""
        cfg = self.editor.config
        keep_after = cfg.continuation_tokens if continuation else None
        with self.editor.lock, torch.no_grad():
            batch = CachedBatch(
                self.editor.model,
                self.editor.attachment,
                interventions,
                new + replayed,
                cfg.prompt_positions,
                self.editor.pad_id,
                keep_after,
                self.editor.tokenizer.eos_token_id,
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

            def leave_kept_alone(*_: object) -> None:
                for layer in interventions.layers:
                    interventions[layer].leave_alone(*spans[layer])

            optimizer.register_step_post_hook(leave_kept_alone)
        steps, parts = 0, {}
        # The edit loss does not train the gates, only the margins do: letting it made the gates
        # open on unrelated inputs (locality 0.67 against 0.99 on 8 ZsRE edits) and the loss swing.
        with _training(interventions):
            for steps in range(1, max_steps + 1):  # noqa: B007 (the count is read after the loop)
                with self.editor.lock:
                    step = batch.forward()
                logits, record = step.logits, step.record
                ce = target_cross_entropy(logits, batch.targets)
                loss, parts = ce, {"ce": ce.item()}
                if continuation:
                    drift = continuation_drift(step.continuation, batch.unedited_continuation)
                    loss = loss + cfg.continuation_weight * drift
                    parts["continuation"] = drift.item()
                if gated:
                    usage: list[torch.Tensor] = []
                    margin: torch.Tensor | float = 0.0
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
                        assert isinstance(margin, torch.Tensor)  # summed over the layers
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
        if unrelated is not None and cfg.gate_polish_steps:
            parts["margin_polished"] = self._polish_gates(interventions, record, on_edit, unrelated, opened)
        if gated and cfg.block_edits and interventions.sealed_gates:
            record, extra, parts["ce_sealed"] = self._fit_under_cutoff(interventions, batch, optimizer, max_steps)
            steps += extra
        basis_weights = self._record_usage(interventions, record, is_new & ~batch.after_answer, len(new))
        self._remember_edit_features(record, batch.rows, on_edit, len(new))
        return EditResult(
            steps=steps,
            loss=parts["loss"],
            losses=parts,
            basis_weights=basis_weights,
        )

    def _fit_under_cutoff(
        self, interventions: InterventionSet, batch: CachedBatch, optimizer: torch.optim.Optimizer, max_steps: int
    ) -> tuple[dict, int, float]:
        """Sealing cuts gates below `sealed_cutoff` to exactly 0, and the polish has moved the
        gates: fit R, A, b again under the gates as they will be sealed, so that the sealed
        block does what was trained. Usually the first check already passes. Returns the last
        forward's record, the extra steps and the edit's cross-entropy as sealed."""
        cfg = self.editor.config
        with _training(interventions, cfg.sealed_cutoff):
            for extra in range(max_steps + 1):
                with self.editor.lock:
                    logits, _, record = batch.forward()
                ce = target_cross_entropy(logits, batch.targets)
                if ce.item() < cfg.stop_loss or extra == max_steps:
                    return record, extra, ce.item()
                optimizer.zero_grad(set_to_none=True)
                ce.backward()  # the gates are untouched: the edit loss does not reach them
                optimizer.step()
        raise AssertionError("unreachable: the loop returns on its last iteration")

    def _polish_gates(
        self,
        interventions: InterventionSet,
        record: dict,
        on_edit: torch.Tensor,
        unrelated: dict[int, torch.Tensor],
        opened: dict[int, torch.Tensor] | None,
    ) -> float:
        """Meets the locality margins on the gates alone, from the hidden states of the last
        training forward: no model forward is needed, so a step costs a few small matrix
        products. The gates on the edit are held where training left them."""
        cfg = self.editor.config
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
        editor = self.editor
        sealed_count = len(editor.history) - int(editor.interventions.edit_count)
        if self.edit_features is None:  # a loaded state: rebuild the sample from the edit log
            k = min(editor.config.negative_edits, sealed_count)
            sample = sorted(self.rng.sample(range(sealed_count), k))
            examples = [editor.encode(editor.history[i].prompt, editor.history[i].target) for i in sample]
            self.edit_features = list(zip(sample, editor.hidden_states(examples)))
        chosen = [features for index, features in self.edit_features if index < sealed_count]
        hidden = text_config(editor.model).hidden_size
        return {
            layer: torch.cat([f[layer] for f in chosen]) if chosen else torch.zeros(0, hidden, device=editor.device)
            for layer in editor.layers
        }

    @torch.no_grad()
    def _remember_edit_features(self, record: dict, rows: torch.Tensor, on_edit: torch.Tensor, count: int) -> None:
        """Adds the new edits' hidden states (from their last training forward) to the sample."""
        editor = self.editor
        capacity = editor.config.negative_edits
        if not editor.config.block_edits or not capacity or self.edit_features is None:
            return
        for j in range(count):
            index = len(editor.history) + j
            features = {layer: record[layer][1][(rows == j) & on_edit].float().clone() for layer in editor.layers}
            if len(self.edit_features) < capacity:
                self.edit_features.append((index, features))
            else:  # reservoir sampling: every edit so far is in the sample with equal odds
                slot = self.rng.randrange(index + 1)
                if slot < capacity:
                    self.edit_features[slot] = (index, features)


@contextmanager
def _training(interventions: InterventionSet, cutoff: float = 0.0) -> Iterator[None]:
    """The trainable block in train mode, the edit loss kept off its gates (`gate_follows_edit`)
    and gates below `cutoff` acting as 0; back to eval mode, gates that follow the edit and no
    cutoff however the training ends."""
    blocks = interventions.trainable_blocks()
    for intervention in blocks:
        intervention.cutoff = cutoff
        intervention.gate_follows_edit = False
    interventions.train()
    try:
        yield
    finally:
        interventions.eval()
        for intervention in blocks:
            intervention.cutoff = 0.0
            intervention.gate_follows_edit = True
