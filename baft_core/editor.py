"""The editor: trains one adapter state with single, continual or batched edits (the
optimisation of each edit's block is in training.py)."""
from __future__ import annotations

import functools
import random
import threading
import time
from contextlib import AbstractContextManager

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
from .prefix_cache import outputs_at_layers
from .prompt_starts import PromptStarts
from .relations import subject_rows
from .route_keys import RouteKeys
from .spelling import TokenClasses
from .subject_probes import probe_prompts
from .training import EditResult, Trainer
from .unrelated import UnrelatedPool, default_unrelated_prompts


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
        self.attachment = Attachment(model, interventions or self.new_interventions(), TokenClasses(tokenizer))
        self.unrelated = UnrelatedPool(
            self, unrelated_prompts if unrelated_prompts is not None else default_unrelated_prompts()
        )
        self.prompt_starts = PromptStarts(model, self.attachment.decoder_layers)
        # A prompt's start is a template's text or a subject: the same few recur at every edit.
        self._start_tokens = functools.lru_cache(maxsize=1024)(lambda text: tuple(encode_prompt(tokenizer, text)))
        # One seeded stream for the replay sample and the trainer's sample of sealed edits.
        self._rng = random.Random(self.config.seed)
        self.trainer = Trainer(self, self._rng)
        self.route_keys = RouteKeys(self)
        # Held around every forward through the shared model (training steps, generation steps,
        # evaluation), so that generation interleaves with training at step granularity. Any
        # re-entrant lock will do: the service puts in its FairLock.
        self.lock: AbstractContextManager[object] = threading.RLock()

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
            cfg.sealed_rank,
            cfg.route_tokens,
            cfg.route_prefix_threshold,
            cfg.route_prefix_gap,
            cfg.route_prefix_needed,
            cfg.route_spelling_normalised,
            cfg.route_prefix_word,
            cfg.resolved_relation_layer(text.num_hidden_layers),
            cfg.relation_threshold if cfg.block_edits and cfg.route_threshold else 0.0,
            cfg.relation_margin,
            cfg.relation_other_name_ratio,
        )
        return interventions.to(self.device)

    def reset(self) -> None:
        """Back to the unedited model: a fresh adapter and an empty history."""
        self.attachment.swap(self.new_interventions())
        self.history = []
        self.trainer.edit_features = []

    def load_state(self, interventions: InterventionSet, history: list[EditRequest]) -> None:
        self.attachment.swap(interventions.to(self.device))
        self.history = list(history)
        self.trainer.edit_features = None

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
        block = cfg.block_edits or 0  # (never None: `EditConfig.__post_init__` resolves it)
        sealing = bool(block) and int(self.interventions.edit_count) + len(requests) >= block
        # A block sealed now without its gates acts at full weight on the prompts routed to it:
        # train it so, and with every edit it holds. (The adapter decides: one loaded from
        # before routing keeps gated blocks.)
        sealed_gates = self.interventions.sealed_gates
        gated = cfg.method == "baft" and (sealed_gates or not sealing)
        earlier = self._block_history() if sealing and not sealed_gates else self._replay_sample()
        new = [self.encode(r.prompt, r.target) for r in requests]
        keys = self.route_keys.states(requests) if self.interventions.router.enabled else None
        replayed = [self.encode(r.prompt, r.target) for r in earlier + self.route_keys.neighbours(keys)]
        working = self.interventions.fork()
        # A routed block acts within its answers' window (routing.py), while it trains too: a
        # block sealed now is not there after the answer to be trained.
        windowed = cfg.answer_window and working.router.enabled
        if windowed:
            working.router.widen_window(max(len(e.answer) for e in new))
        result = self.trainer.train(
            working, new, replayed, max_steps, gated, acts_after_answer=not (sealing and windowed), requests=requests
        )
        if keys is not None:
            self.route_keys.add(working, keys._replace(owners=keys.owners + len(self.history)))
        if working.relations.enabled:
            self.add_relation_states(working, requests)
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
    def routing_layer_output(
        self, prompts: list[list[int]], layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The unedited output [batch, seq, d] of decoder layer `layer` (default: the adapter's
        routing layer) for encoded prompts, left-padded, and their attention mask [batch, seq]."""
        layer = self.interventions.routing_layer if layer is None else layer
        outputs, attention = self.outputs_at_layers(prompts, [layer])
        return outputs[0], attention

    def outputs_at_layers(self, prompts: list[list[int]], layers: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`routing_layer_output` at each of `layers` (decoder layer indices), from one forward."""
        ids, attention = left_padded(prompts, self.pad_id)
        ids, attention = ids.to(self.device), attention.to(self.device)
        depth = sorted(set(layers))
        with self.lock:
            outputs = outputs_at_layers(self.model, [self.attachment.decoder_layers[i] for i in depth], ids, attention)
        return [outputs[depth.index(i)] for i in layers], attention

    def relation_probes(self, request: EditRequest) -> list[str]:
        """The prompts the relation check keeps the request's block shut on: other relations of
        its subject (`subject_probes.py`) and its own `locality` prompts that name the subject
        (routing keeps the block shut on other subjects), those that fit the model's context."""
        return [prompt for prompt, _ in self._encoded_probes(request)]

    def _encoded_probes(self, request: EditRequest) -> list[tuple[str, list[int]]]:
        """`relation_probes` with their tokens."""
        subject = (request.subject or "").strip()
        prompts = probe_prompts(request.prompt, request.subject, self.config.subject_probes)
        prompts += [p.prompt for p in request.locality if subject and subject in p.prompt]
        encoded = [(prompt, encode_prompt(self.tokenizer, prompt)) for prompt in dict.fromkeys(prompts)]
        return [(prompt, ids) for prompt, ids in encoded if len(ids) < self.context]

    @torch.no_grad()
    def last_prompt_states(
        self, prompts: list[str], layer: int, subjects: list[str | None] | None = None
    ) -> torch.Tensor:
        """The unedited output [n, d] of decoder layer `layer` at each prompt's last position.
        With each prompt's subject: a prompt's text before its subject, or the subject where the
        prompt opens with it, is a start that other prompts share (`prompt_starts.py`)."""
        ids = [encode_prompt(self.tokenizer, p, self.context) for p in prompts]
        return self._last_prompt_states(prompts, ids, layer, subjects)

    def _last_prompt_states(
        self, prompts: list[str], ids: list[list[int]], layer: int, subjects: list[str | None] | None
    ) -> torch.Tensor:
        """`last_prompt_states` of prompts already tokenised (`ids`)."""
        if not prompts:
            return torch.zeros(0, text_config(self.model).hidden_size, device=self.device)
        subjects = subjects if subjects is not None else [None] * len(prompts)
        starts = [self.shared_start(*row) for row in zip(prompts, ids, subjects, strict=True)]
        with self.lock:
            return self.prompt_starts.last_states(ids, starts, layer)

    def shared_start(self, prompt: str, ids: list[int], subject: str | None) -> list[int]:
        """The tokens of `prompt`'s shared start (see `last_prompt_states`), [] where there is
        none or where its tokens are not the prompt's first."""
        at = prompt.find(subject) if subject and subject.strip() else -1
        text = prompt[:at] if at > 0 else subject if at == 0 else None
        if text is None or not text.strip():
            return []
        start = list(self._start_tokens(text))
        return start if len(start) < len(ids) and ids[: len(start)] == start else []

    def add_relation_states(self, interventions: InterventionSet, requests: list[EditRequest]) -> None:
        """Leaves the new edits' prompt states and their probes' in the trainable block's
        relation check (relations.py)."""
        relations = interventions.relations
        probes = [(prompt, ids, r.subject) for r in requests for prompt, ids in self._encoded_probes(r)]
        prompts = [r.prompt for r in requests] + [prompt for prompt, _, _ in probes]
        ids = [encode_prompt(self.tokenizer, r.prompt, self.context) for r in requests] + [i for _, i, _ in probes]
        subjects = [r.subject for r in requests] + [s for _, _, s in probes]
        states = self._last_prompt_states(prompts, ids, relations.layer, subjects)
        spelled = [subject_rows(self.tokenizer, r.subject) for r in requests if r.subject]
        relations.add_pending(
            states[: len(requests)],
            states[len(requests) :],
            torch.cat(spelled) if spelled else relations.pending_subjects[:0],
        )

    def encode(self, prompt: str, answer: str) -> Example:
        return encode(self.tokenizer, prompt, answer, self.context)

    def sealed_edit_features(self) -> dict[int, torch.Tensor]:
        """The trainer's sample of the sealed edits' hidden states (`Trainer.sealed_edit_features`)."""
        return self.trainer.sealed_edit_features()

    # ----- unrelated inputs the gates must stay closed on -----
    def prepare(self) -> None:
        """Computes now what the first edit would otherwise compute once: the unrelated prompts'
        states and their statistics at the edited and routing layers, and the route contexts' KV."""
        router = self.interventions.router
        if (self.config.method == "baft" or router.enabled) and self.unrelated:
            self.unrelated.standardisations(router)
        if router.enabled and self.config.route_contexts:
            contexts = [tuple(encode_prompt(self.tokenizer, c)) for c in self.config.route_contexts]
            with self.lock:
                self.prompt_starts.keep(contexts, router.layer)
        relations = self.interventions.relations
        if relations.enabled and self.unrelated:
            self.unrelated.relation_center(relations.layer)

    def set_unrelated_prompts(self, prompts: list[str]) -> None:
        self.unrelated = UnrelatedPool(self, prompts)

    def _prompt_states(self, prompts: list[str]) -> list[dict[int, torch.Tensor]]:
        """Per prompt, the unedited states [positions, d] at each edited layer at its last P
        positions (where a block acts on a prompt)."""
        # One answer token: teacher forcing feeds none of it, so only prompt positions are read.
        return self.hidden_states([Example(encode_prompt(self.tokenizer, p), [self.pad_id]) for p in prompts])

    @torch.no_grad()
    def hidden_states(self, examples: list[Example]) -> list[dict[int, torch.Tensor]]:
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
