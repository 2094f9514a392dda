"""All settings of an edit in one object."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Method = Literal["baft", "reft"]

# The paper's upper three intervention layers on a 32-layer model (18, 24, 28 of 9, 18, 24, 28),
# as depth fractions so that any depth gets the same relative placement. Without the paper's
# lowest layer a training step is cheaper (layers below the first edited one are not recomputed)
# at equal reliability and locality; without the next one as well, CounterFact generality fell.
DEFAULT_LAYER_FRACTIONS = (0.56, 0.75, 0.875)
# Where route keys are read, as a depth fraction (layer 4 of SmolLM2's 30): early enough that a
# subject's state carries little of the text around it (routing.py).
ROUTE_LAYER_FRACTION = 0.15
# Where the relation check reads a prompt's last position (relations.py), as a depth fraction
# (the output of layer 11 of SmolLM2's 30): the relation is there, and reading it costs each
# edit's probes a forward through fewer layers than the first edited one.
RELATION_LAYER_FRACTION = 0.38
# Generic text put before an edit's prompt for its extra route keys: paraphrases often say
# something before the subject, which shifts its state even at an early layer.
# An edit also leaves a key for its subject alone, which stands for the texts that start with it.
ROUTE_CONTEXTS = ("The following is true.", "I read this yesterday.", "Here is a fact:", "She said that")


@dataclass
class EditConfig:
    method: Method = "baft"  # "reft" is BaFT with every gate fixed at 1
    # Bases per block and layer, the same for both methods: ReFT is BaFT with W = I, so a
    # comparison of the two measures the gates, not a rank. A higher rank buys generality at the
    # price of memory per edit and portability (the rank ablation: docs/method.md).
    rank: int = 24
    layers: list[int] | None = None  # None: DEFAULT_LAYER_FRACTIONS of the model's depth
    prompt_positions: int = 3  # P: last prompt positions that are intervened

    # Optimisation
    lr: float = 1e-2
    gate_lr: float = 5e-3
    weight_decay: float = 0.0  # applied to A only; never to R (it would collapse the rotation)
    max_steps: int = 40
    max_steps_batched: int = 70
    stop_loss: float = 0.01

    # Locality margins on the gates (paper: alpha, beta, gamma)
    alpha: float = 0.01
    # The paper's 0.05 keeps edit gates barely above alpha; sealed blocks cut gates below
    # `sealed_cutoff`, so an edit's own gates must clear it with room (0.2 against 0.1).
    beta: float = 0.2
    gamma: float = 0.02
    # The gates learn from the margins alone (the edit loss does not reach them), so with Adam this weight
    # only sets how far the margins must be met before the early stop: 0.1 makes a residual
    # margin of 0.1 (a few unrelated positions just above alpha) count as 0.01.
    locality_weight: float = 0.1
    balance_weight: float = 0.01
    # A routed block sealed with its edit acts, on the prompts it opens, where it was trained: the
    # last P prompt positions and the first T - 1 answer tokens generated after them (T: its
    # answer's length in tokens), which predict the rest of the answer (routing.py). After the
    # answer the model goes on unedited. False: it acts on every generated token, and greedy
    # decoding says the answer again ("Argentina Argentina ..."; the ablation: docs/method.md).
    answer_window: bool = True
    # Blocks trained without gates that act after the answer (ReFT; routed blocks without
    # `answer_window`) must keep the unedited model's next-token distribution there
    # (`objective.continuation_drift`), over the answer's last position and this many tokens the
    # unedited model says after it. 0 weight turns that off. Each token costs a decoding step per
    # edit, and more than one left `rep` and generality within noise.
    continuation_weight: float = 1.0
    continuation_tokens: int = 1
    gate_polish_steps: int = 100  # gate-only steps after training, until the margins hold
    polish_tolerance: float = 0.0  # mean margin (in logits) left at which the polish may stop
    unrelated_generate_tokens: int = 4  # generated positions of each unrelated prompt the gates see

    # Continual editing: replay a bounded sample of the trainable block's earlier edits with
    # each new one. Only one block for all edits (`block_edits=0`, the paper's layout) has any to
    # replay; a block per edit has none.
    replay_size: int = 0
    # Capacity in fixed-size blocks: a block (rank `rank` at each layer) holds this many edits,
    # then it is sealed (frozen) and a fresh block takes the next ones. 0: one block for all
    # edits, as in the paper (which forgets earlier edits: docs/method.md). None: 1 for BaFT, 0
    # for ReFT (ungated blocks would all act on every input).
    block_edits: int | None = None
    # A block sealed without gates keeps this many of its strongest directions at each layer
    # (blocks.py), a third of its rank's memory: on 100 continual edits ZsRE and CounterFact kept
    # their metrics (docs/benchmarks.md). None: all `rank`.
    sealed_rank: int | None = 8
    # In sealed blocks a gate below this is exactly off (thousands of small leaks add up).
    sealed_cutoff: float = 0.1
    # Edits of sealed blocks the new block's gates learn to stay closed on (a uniform sample).
    negative_edits: int = 256
    # Prompt-level routing (routing.py): a sealed block acts only on prompts with a position within
    # this cosine of one of its edits' subject keys. 0 turns routing off (every block's gates
    # decide alone; needs sealed_gates).
    route_threshold: float = 0.8
    route_layer: int | None = None  # None: ROUTE_LAYER_FRACTION of the model's depth
    # Each edit leaves a route key for its prompt, one for its prompt after each of these, and one
    # for its subject alone (a text that starts with the subject).
    route_contexts: list[str] = field(default_factory=lambda: list(ROUTE_CONTEXTS))
    # How many of its subject's last tokens a route key reads, and the cosine each position before
    # the key's must reach (routing.py). 1: the subject's last token alone.
    route_tokens: int = 3
    route_prefix_threshold: float = 0.3
    # How many tokens may stand between a key's subject tokens in a prompt (a middle name:
    # "Ines Sylvia Perg" for "Ines Perg"): a key looks this many positions further back for its
    # earlier tokens (routing.py). Adapters saved before it existed load with 0.
    route_prefix_gap: int = 2
    # How many of a key's earlier subject tokens must be found there (all, where it reads fewer;
    # None: all): with one of two, a name that drops or respells a middle part ("Emily Jones"
    # for "Emily I Jones", "Martin Solares" for "Martín Solares") opens the block. Adapters saved
    # before it existed load with None.
    route_prefix_needed: int | None = 1
    # Whether a key's earlier tokens that stand in the prompt's matched word (a name's last word
    # in pieces: " Or"+"tis") must each be found in their own place, however few of the others
    # `route_prefix_needed` asks for: a name may drop its first name, not part of the word the
    # key matched (routing.py). Adapters saved before it existed load with false.
    route_prefix_word: bool = True
    # Whether an edit also leaves keys for its subject's other spellings: without diacritics,
    # without middle initials (names.py), where they differ from the subject.
    route_name_variants: bool = True
    # Whether an edit whose subject ends in the tokens an earlier edited subject's key reads
    # spells its subject (its last token ids, up to the first that differs) and holds its keys to
    # them (spelling.py, routing.py): a question about one of a series of alike-ending names
    # ("... Badminton Championships – women's singles") then opens its own block, not the others'.
    route_spelling: bool = True
    # Whether a spelling's tokens are compared as their classes (spelling.py: NFKC, dashes as "-",
    # case folded), so that an alias that writes "-" for "–" opens the block. Adapters saved
    # before it existed load with false.
    route_spelling_normalised: bool = True
    # Each key's threshold is also this far above its nearest unrelated prompt position (None:
    # every key has route_threshold): fewer unrelated prompts open a block.
    route_margin: float | None = 0.05
    # Whether a sealed block's learned gates also apply inside the prompts routed to it (BaFT's
    # w(h) behind the route), trained to tell its subject's relations apart: closed on other
    # relations of the same subject (`subject_probes`), open on the edit's prompt, also after each
    # route context. False: a routed block acts at full weight on every prompt about its subject
    # and is trained without gates. True costs generality and several times the time per edit
    # (the gates close on paraphrases too: docs/method.md).
    sealed_gates: bool = False
    # Sealed edits whose route key is within the threshold of a new edit's key (at most this
    # many, nearest first) are replayed while training it: their prompts will open the new block
    # too, so it is trained to leave their answers as they are.
    route_neighbours: int = 8

    # Same-subject probes (subject_probes.py): up to this many other relations of an edit's
    # subject, beside the request's own `locality` prompts, which the relation check keeps its
    # block shut on (and, with `sealed_gates`, its gates learn to stay closed on). 0: none. The
    # list has 59 prompts (subject_probes.py); an edit's own relation leaves out at least one.
    subject_probes: int = 64
    # The relation check (relations.py): a routed block stays shut on a prompt whose state at the
    # last position comes within this cosine of one of its probes' and is no nearer its edit's
    # prompt's than that by `relation_margin`. 0 turns it off.
    relation_threshold: float = 0.8
    relation_margin: float = 0.0
    # Where a prompt does not spell the block's subject (routing let it in on another of its
    # names), the block stays shut only when a probe's distance (1 - cosine) to the prompt is at
    # most 1 / this of the edit's prompt's: 1 holds such prompts to the rule above.
    relation_other_name_ratio: float = 1.2
    relation_layer: int | None = None  # None: RELATION_LAYER_FRACTION of the model's depth

    # Each fresh adapter's random draw: its bases (the same for BaFT and ReFT), then its gates.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_edits is None:
            self.block_edits = 1 if self.method == "baft" else 0

    def resolved_layers(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            bad = [layer for layer in self.layers if not 0 <= layer < num_layers]
            if bad:
                raise ValueError(f"layers {bad} out of range for a model with {num_layers} layers")
            return sorted(set(self.layers))
        return sorted({min(num_layers - 1, round(f * num_layers)) for f in DEFAULT_LAYER_FRACTIONS})

    def resolved_route_layer(self, num_layers: int) -> int:
        """The routing layer: `route_layer`, or its default capped at the first edited layer."""
        first = self.resolved_layers(num_layers)[0]
        if self.route_layer is None:
            return min(first, int(ROUTE_LAYER_FRACTION * num_layers))
        if not 0 <= self.route_layer <= first:
            raise ValueError(f"route_layer {self.route_layer} must be in [0, {first}] (the first edited layer)")
        return self.route_layer

    def resolved_relation_layer(self, num_layers: int) -> int:
        """The layer the relation check reads: `relation_layer`, or its default, between the
        routing layer and the first edited layer."""
        route, first = self.resolved_route_layer(num_layers), self.resolved_layers(num_layers)[0]
        if self.relation_layer is None:
            return min(max(route, int(RELATION_LAYER_FRACTION * num_layers)), first)
        if not route <= self.relation_layer <= first:
            raise ValueError(f"relation_layer {self.relation_layer} must be in [{route}, {first}] (routing to first edited layer)")
        return self.relation_layer

    def validate(self) -> None:
        if self.method not in ("baft", "reft"):
            raise ValueError(f"unknown method {self.method!r}: expected 'baft' or 'reft'")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError("rank must be an integer >= 1")
        if self.sealed_rank is not None and (
            not isinstance(self.sealed_rank, int) or isinstance(self.sealed_rank, bool) or self.sealed_rank < 1
        ):
            raise ValueError("sealed_rank must be an integer >= 1 or null")
        if self.prompt_positions < 1:
            raise ValueError("prompt_positions must be >= 1")
        if min(self.max_steps, self.max_steps_batched) < 1:  # an edit takes at least one step
            raise ValueError("max_steps and max_steps_batched must be >= 1")
        assert self.block_edits is not None, "__post_init__ resolves block_edits"
        if min(self.block_edits, self.replay_size, self.negative_edits, self.continuation_tokens, self.subject_probes) < 0:
            raise ValueError(
                "block_edits, replay_size, negative_edits, continuation_tokens and subject_probes must be >= 0"
            )
        if self.block_edits and self.method != "baft":
            raise ValueError("block_edits needs gates (method 'baft'): ungated blocks would all act on every input")
        if not 0 <= self.route_threshold < 1:
            raise ValueError("route_threshold must be in [0, 1)")
        if self.block_edits and not self.sealed_gates and not self.route_threshold:
            raise ValueError("sealed blocks without gates need routing (route_threshold > 0)")
        if self.route_neighbours < 0:
            raise ValueError("route_neighbours must be >= 0")
        if min(self.lr, self.gate_lr) <= 0:
            raise ValueError("lr and gate_lr must be > 0")
        if not isinstance(self.answer_window, bool):  # JSON "false" would otherwise read as on
            raise ValueError("answer_window must be true or false")
        if not isinstance(self.route_name_variants, bool):
            raise ValueError("route_name_variants must be true or false")
        if self.route_prefix_needed is not None and (
            not isinstance(self.route_prefix_needed, int) or isinstance(self.route_prefix_needed, bool)
            or self.route_prefix_needed < 1
        ):
            raise ValueError("route_prefix_needed must be an integer >= 1 or null")
        if not isinstance(self.route_spelling_normalised, bool):
            raise ValueError("route_spelling_normalised must be true or false")
        if not isinstance(self.route_spelling, bool):
            raise ValueError("route_spelling must be true or false")
        if self.continuation_weight < 0:
            raise ValueError("continuation_weight must be >= 0")
        if not isinstance(self.route_contexts, (list, tuple)) or not all(
            isinstance(c, str) and c.strip() for c in self.route_contexts
        ):
            raise ValueError("route_contexts must be a list of non-empty strings")
        if not isinstance(self.route_tokens, int) or isinstance(self.route_tokens, bool) or self.route_tokens < 1:
            raise ValueError("route_tokens must be an integer >= 1")
        if not -1 <= self.route_prefix_threshold < 1:
            raise ValueError("route_prefix_threshold must be in [-1, 1)")
        if not isinstance(self.route_prefix_gap, int) or isinstance(self.route_prefix_gap, bool) or self.route_prefix_gap < 0:
            raise ValueError("route_prefix_gap must be an integer >= 0")
        if not 0 <= self.relation_threshold < 1 or not -1 <= self.relation_margin < 1:
            raise ValueError("relation_threshold must be in [0, 1) and relation_margin in [-1, 1)")
        if not self.relation_other_name_ratio >= 1:
            raise ValueError("relation_other_name_ratio must be >= 1")
        if self.route_margin is not None and not 0 <= self.route_margin < 1:
            raise ValueError("route_margin must be in [0, 1) or None")
        if not 0 <= self.alpha < self.beta <= 1:
            raise ValueError("need 0 <= alpha < beta <= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EditConfig:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
