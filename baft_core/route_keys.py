"""Route keys of new edits (routing.py): what an edit leaves in the adapter so that the prompts
about its subject open its block, and the sealed edits whose keys a new edit's come near."""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from .attach import InterventionSet, text_config
from .data import EditRequest
from .encoding import encode_prompt
from .names import name_variants
from .routing import subject_tokens
from .spelling import SPELLING_TOKENS, SubjectEndings, subject_ids

if TYPE_CHECKING:
    from .editor import Editor


class RouteStates(NamedTuple):
    """What new edits' route keys are made of (`Router.add_pending`): unedited routing-layer
    states [k, d] at each key's subject token, the request of each key [k], how many subject
    tokens each reads [k] and its row [k] of `prefixes` [g, route_tokens - 1, d], the states of
    the subject tokens before the last, nearest first (-1: none), and each key's spelling [k,
    SPELLING_TOKENS] (`spelling.py`; token ids nearest first, -1 after them)."""

    states: torch.Tensor
    owners: torch.Tensor
    tokens: torch.Tensor
    prefix: torch.Tensor
    prefixes: torch.Tensor
    spellings: torch.Tensor


class RouteKeys:
    """Makes new edits' route keys from the unedited model's routing-layer states, leaves them in
    a trainable block, and finds the sealed edits that share a new edit's route. The editor is
    the collaborator for the model, tokenizer, config, lock, history, kept prompt starts and
    unrelated prompts."""

    def __init__(self, editor: Editor):
        self.editor = editor
        # (the history, how many of its edits are in, their subjects by ending): `_subject_endings`.
        self._endings: tuple[list[EditRequest], int, SubjectEndings] | None = None

    @torch.no_grad()
    def states(self, requests: list[EditRequest]) -> RouteStates:
        """The unedited routing-layer states the requests' route keys are made of: at the subject
        of each prompt, alone and after each of `route_contexts`, and of the subject alone (a text
        that would overflow the model's context is left out); the same, without the contexts, for
        each of the subject's other spellings (`names.py`, `route_name_variants`); with each
        name's earlier subject tokens as they read mid-text and at the start of a text (`Router`),
        and the spelling of each key whose name ends like an earlier edited subject's
        (`spelling.py`)."""
        editor = self.editor
        config, tokenizer = editor.config, editor.tokenizer
        contexts = [encode_prompt(tokenizer, c) for c in config.route_contexts]
        count = config.route_tokens
        states: list[torch.Tensor] = []
        owners: list[int] = []
        tokens: list[int] = []
        prefix: list[int] = []
        prefixes: list[torch.Tensor] = []
        spellings: list[list[int]] = []
        edited = self._subject_endings() if config.route_spelling else None
        batch = SubjectEndings(count)  # the requests before each one in this batch
        for j, request in enumerate(requests):
            subject = (request.subject or "").strip()
            names = [(request.subject or "", [f"{c} {request.prompt}" if c else request.prompt for c in ["", *config.route_contexts]])]
            if subject and subject in request.prompt:
                names[0][1].append(subject)
                if config.route_name_variants:
                    names += [(v, [request.prompt.replace(subject, v), v]) for v in name_variants(subject)]
            for n, (name, texts) in enumerate(names):
                cuts, spans, at_start = [], [], []
                for text in texts:
                    ids = encode_prompt(tokenizer, text)
                    if len(ids) <= editor.context:
                        # Attention is causal: what follows the subject cannot change its state, so
                        # it is not computed (a sixth to a quarter of the tokens on ZsRE and CounterFact).
                        last, span = subject_tokens(tokenizer, text, name)
                        cuts.append(ids[: last + 1])
                        spans.append(span)
                        at_start.append(bool(subject) and text.lstrip().startswith(name.strip()))
                spelled = 0
                if edited is not None and subject:
                    ids_of_name = subject_ids(tokenizer, name)
                    spelled = max(edited.spelling_length(ids_of_name), batch.spelling_length(ids_of_name))
                    if n == 0:
                        batch.add(ids_of_name)
                for cut in cuts:
                    # Ids, not states: a subject at a text's start spells its first token too.
                    spelling = cut[len(cut) - min(spelled, len(cut)) :][::-1]
                    spellings.append(spelling + [-1] * (SPELLING_TOKENS - len(spelling)))
                # [texts, count, d]; only the subject's own texts follow the contexts
                name_states = self._last_states(cuts, contexts if n == 0 else [], count)
                # Mid-text and at a text's start: the first text of each kind whose key reads
                # earlier tokens gives them for every key of its kind.
                groups: dict[bool, int] = {}
                for start, span, text_states in zip(at_start, spans, name_states):
                    if span > 1 and count > 1 and start not in groups:
                        groups[start] = len(prefixes)
                        prefixes.append(text_states[:-1].flip(0))
                states.append(name_states[:, -1])
                owners += [j] * len(cuts)
                tokens += spans
                prefix += [groups.get(start, -1) if span > 1 else -1 for start, span in zip(at_start, spans)]
        d = text_config(editor.model).hidden_size
        return RouteStates(
            torch.cat(states).float(),
            torch.tensor(owners),
            torch.tensor(tokens),
            torch.tensor(prefix),
            torch.stack(prefixes).float() if prefixes else torch.zeros(0, count - 1, d),
            torch.tensor(spellings, dtype=torch.long).reshape(-1, SPELLING_TOKENS),
        )

    def _subject_endings(self) -> SubjectEndings:
        """The history's subjects by ending (`spelling.py`): kept up to date as edits are added,
        built anew when the history is replaced (reset, load)."""
        held = self._endings
        if held is None or held[0] is not self.editor.history or held[1] > len(self.editor.history):
            held = (self.editor.history, 0, SubjectEndings(self.editor.config.route_tokens))
        history, count, endings = held
        for request in history[count:]:
            if request.subject and request.subject.strip():
                endings.add(subject_ids(self.editor.tokenizer, request.subject))
        self._endings = (history, len(history), endings)
        return endings

    def _last_states(self, cuts: list[list[int]], contexts: list[list[int]], count: int) -> torch.Tensor:
        """The routing layer's unedited output at the last `count` positions of each of `cuts`,
        [cuts, count, d], zeros before a text's start. A cut that begins with one of `contexts`
        (route contexts, encoded) reads that context's KV, kept across edits (`PromptStarts`): its
        own tokens after the context are computed, zeros before them."""
        starts = [next((c for c in contexts if len(c) < len(cut) and cut[: len(c)] == c), []) for cut in cuts]
        with self.editor.lock:
            return self.editor.prompt_starts.last_positions(cuts, starts, self.editor.interventions.routing_layer, count)

    @torch.no_grad()
    def neighbours(self, states: RouteStates | None) -> list[EditRequest]:
        """Sealed edits with a route key within its threshold of one of the new edits' key
        states, nearest first (at most `route_neighbours`): their prompts will open the new block
        too, so it is trained to leave their answers as they are."""
        router, limit = self.editor.interventions.router, self.editor.config.route_neighbours
        if states is None or not limit or not len(router.keys):
            return []
        scores = router.similarity(states.states).amax(0)  # best match of each stored key
        near = (scores > router.key_threshold).nonzero().squeeze(1)
        chosen: list[int] = []
        for i in near[scores[near].argsort(descending=True)].tolist():
            edit = int(router.key_edit[i])
            if edit not in chosen:
                chosen.append(edit)
        return [self.editor.history[i] for i in chosen[:limit]]

    def add(self, interventions: InterventionSet, keys: RouteStates) -> None:
        """Leaves the new edits' route keys (`owners`: the history index of each key's edit) in
        the trainable block, each with its threshold above the unrelated prompts (`route_margin`)."""
        router, margin = interventions.router, self.editor.config.route_margin
        thresholds = None
        if margin is not None:
            thresholds = router.thresholds(router.key(keys.states), self.editor.unrelated.routes(interventions.router), margin)
        router.add_pending(
            keys.states, keys.owners, thresholds, keys.tokens, keys.prefix, keys.prefixes, keys.spellings
        )
