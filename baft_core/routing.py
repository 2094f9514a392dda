"""Prompt-level routing in front of sealed blocks.

A sealed block's gates are logistic regressions fitted on a handful of positions of one edit.
Over a thousand blocks their false positives add up (ZsRE, 1000 continual edits: locality 0.87),
and they key on the relation more than on the subject (CounterFact's locality prompts, which share
the relation, opened them more often than the edit's own paraphrases did). So each sealed edit
also leaves route keys: its subject as an early layer sees it, i.e. the unedited hidden state at
the subject's last token, standardised with the statistics of ordinary prompts and scaled to unit
norm. A prompt opens a block when one of its positions comes within a key's cosine threshold of
one of the block's keys. The decision is taken once, over the prompt, and held for the answer and
every generated token; a closed block is skipped, exactly. Inside an open block the bases act at
full weight (or, with `EditConfig.sealed_gates`, under their learned gates).

The key is the subject's state: the state at the last prompt position, which predicts the answer,
is alike across ZsRE's questions (an exploratory check found a rephrase's nearest last-position key
to be its own edit's about a third of the time). It is read early (layer 4 of SmolLM2's 30), before
the context has mixed into it, and each edit leaves one key per context: its prompt alone and after
each of a few generic prefixes (`EditConfig.route_contexts`), since paraphrases put text before the
subject, and its subject alone, for texts that start with it. On 100 CounterFact edits this raised
the share of paraphrases that open their own edit's block from 0.52 (one key, at the first edited
layer 17) to 0.89 (one key at layer 4) and 0.98 (with the context keys), with locality prompts
opening some block 0.02 of the time against 0.01 (docs/benchmarks.md).

A subject's last token alone is a weak key: at so early a layer its state is mostly that token's,
and subjects that end alike ("Otis Taylor" and "Phoebe Atwood Taylor", "Weddell Sea" and
"Bellingshausen Sea") opened each other's blocks: at 5,000 CounterFact edits 0.30 of the locality
prompts opened some block, two thirds of them on such a collision. So a key also holds the states
of up to `EditConfig.route_tokens - 1` subject tokens before its last (`prefixes`), and a position
that matches the key opens its block only if the positions before it match those too, at the looser
`prefix_threshold` (an early state varies with what precedes it). An edit stores its earlier tokens
twice, as they read mid-text and at the start of a text, where the attention sink before them
changes them; its keys share those two (an exploratory check on those 5,000 edits: locality prompts
opening some block 0.30 -> 0.16, paraphrases opening their own 0.978 -> 0.995 with the subject-
alone key; docs/method.md). A subject's other names often put a middle name between those
tokens ("Ines Sylvia Perg" for "Ines Perg"): each earlier token may match any of the positions
before the matched one, within as many as the key has earlier tokens plus
`EditConfig.route_prefix_gap`, rather than its own place in a row; and only
`EditConfig.route_prefix_needed` of them need be found, so that a name that drops or respells one
("Jessica Cooke" for "Jessica E Cooke", "Martin Solares" for "Martín Solares") opens the block too.
What a name drops is a word; the earlier tokens of the word the key matched are that word's own
pieces (" Or" of " Or"+"tis"), so those are each needed in their place
(`EditConfig.route_prefix_word`): "F Ortis" opens the block of "Fernanda Ortis", "Fernanda
Xtis" no longer does, as the matched token's first name alone let it. A name whose last token
differs ("Alarcon" for "Alarcón") has keys of its own (names.py).

Subjects of a series end alike over more tokens than a key reads ("1981 Lithuanian Badminton
Championships – women's singles", "1965 New Zealand Badminton Championships – women's singles"),
and at so early a layer a differing earlier token ("Lithuanian", "Zealand") is as near as the
same token in another context: state thresholds cannot tell them apart. So an edit whose subject
ends in the tokens an earlier edited subject's key reads (`spelling.py`) also spells its subject:
its keys hold the ids of its subject's last tokens, up to the first that differs from every such
subject, and open its block only where the prompt has those very tokens before the matched
position. A spelled key that matches marks the position as its subject's: keys of other blocks
that match there reading fewer tokens (the earlier subject's, whose key cannot tell) do not open
theirs. Spellings are exact, so they are only made where the states cannot decide; an alias of
such a subject that words those tokens otherwise no longer opens its block.

A block acts at the positions its edit was trained on: on a prompt it opens, the last P prompt
positions and the first T - 1 answer tokens fed after them (T: the block's longest answer in
tokens; they predict the rest of its answer). From the answer's last token on the model goes on
unedited: a block that acted on every generated token made greedy decoding say its answer again
and again ("Argentina Argentina Argentina ..."; `EditConfig.answer_window`).
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import appended, take_checkpoint_sizes
from .spelling import SPELLING_TOKENS, TokenClasses


def subject_token(tokenizer, prompt: str, subject: str | None) -> int:
    """Index, in the encoded prompt (`encoding.encode_prompt`), of the subject's last token; the
    prompt's last token when no subject is given or it does not occur in the prompt. Never the
    first token (an attention sink, alike in every prompt) when there is a second."""
    return subject_tokens(tokenizer, prompt, subject)[0]


def subject_tokens(tokenizer, prompt: str, subject: str | None) -> tuple[int, int]:
    """(`subject_token`, how many of the subject's tokens end there, the first position left out:
    1 when no subject is given or it does not occur in the prompt)."""
    text = prompt.rstrip()
    full = tokenizer(text, add_special_tokens=True).input_ids
    start = text.rfind(subject) if subject and subject.strip() else -1
    if start < 0 or not subject:  # (a subject was found only if there is one)
        return len(full) - 1, 1
    before = len(tokenizer(text[:start].rstrip(), add_special_tokens=True).input_ids) if text[:start].strip() else 0
    prefix = tokenizer(text[: start + len(subject)], add_special_tokens=True).input_ids
    last = max(min(len(prefix), len(full)) - 1, min(1, len(full) - 1))
    return last, max(1, min(last - before + 1, last))


# The span of a block that acts on every answer position (sealed without a window).
UNLIMITED = torch.iinfo(torch.long).max


def answer_offsets(prompt: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """[batch, seq]: how many answer tokens are fed up to each position, 0 on the prompt (`prompt`
    and `attention` [batch, seq] mark the prompt's and the real tokens)."""
    return (attention.bool() & ~prompt.bool()).long().cumsum(-1)


def routable(prompt: torch.Tensor) -> torch.Tensor:
    """The prompt positions [batch, seq] routing reads: all but each row's first, an attention
    sink whose state is alike in every prompt."""
    return prompt & (prompt.long().cumsum(-1) > 1)


class Routes:
    """Which sealed blocks each row of a batch opens. Set `prompt` (a [batch, seq] mask of prompt
    positions) for the forward that sees the prompt, and None for later ones (cached decoding):
    the routing layer's hook fills `open` [batch, blocks] from the prompt and later forwards keep
    it. `open` may also be set directly. `offsets` [batch, seq] (`answer_offsets`) says where each
    position of the current forward stands in the answer, for the blocks' windows; None: every
    intervened position is in every open block's window."""

    def __init__(
        self,
        prompt: torch.Tensor | None = None,
        open: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ):
        self.prompt = prompt
        self.open = open
        self.offsets = offsets


# The buffers that grow with the edits.
_GROWING = (
    "keys", "key_threshold", "key_block", "key_edit", "pending", "pending_threshold", "pending_edit",
    "block_span", "pending_span", "key_tokens", "key_prefix", "prefixes", "pending_tokens",
    "pending_prefix", "pending_prefixes", "key_spelling", "spellings", "pending_spelling", "pending_spellings",
)


class Router(nn.Module):
    """The route keys of sealed edits with each key's cosine threshold, block and edit (its index
    in the editor's history), each sealed block's answer window, the keys of the trainable block's
    edits awaiting sealing, and the lowest threshold a key may have (0: no routing). Keys are read
    at decoder layer `layer`. A block without keys (sealed before routing existed) stays open."""

    # Buffers (`__init__` says what each holds)
    keys: torch.Tensor
    key_threshold: torch.Tensor
    key_block: torch.Tensor
    key_edit: torch.Tensor
    pending: torch.Tensor
    pending_threshold: torch.Tensor
    pending_edit: torch.Tensor
    key_tokens: torch.Tensor
    key_prefix: torch.Tensor
    prefixes: torch.Tensor
    pending_tokens: torch.Tensor
    pending_prefix: torch.Tensor
    pending_prefixes: torch.Tensor
    key_spelling: torch.Tensor
    spellings: torch.Tensor
    pending_spelling: torch.Tensor
    pending_spellings: torch.Tensor
    prefix_threshold: torch.Tensor
    block_span: torch.Tensor
    pending_span: torch.Tensor
    threshold: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self,
        hidden_size: int,
        threshold: float,
        layer: int,
        subject_tokens: int = 1,
        prefix_threshold: float = 0.3,
        prefix_gap: int = 0,
        prefix_needed: int | None = None,
        spelling_normalised: bool = False,
        prefix_word: bool = False,
    ):
        super().__init__()
        self.layer = layer
        self.register_buffer("keys", torch.zeros(0, hidden_size))  # unit rows
        self.register_buffer("key_threshold", torch.zeros(0))
        self.register_buffer("key_block", torch.zeros(0, dtype=torch.long))  # sealed block of each key
        self.register_buffer("key_edit", torch.zeros(0, dtype=torch.long))  # history index of its edit
        self.register_buffer("pending", torch.zeros(0, hidden_size))  # keys of the trainable block
        self.register_buffer("pending_threshold", torch.zeros(0))
        self.register_buffer("pending_edit", torch.zeros(0, dtype=torch.long))
        # How many subject tokens each key reads (1: its last alone), and the row of `prefixes`
        # with the keyed states of the ones before its last (-1: none); `prefixes` [g,
        # subject_tokens - 1, d] holds them nearest first, in fp16: they are only held to the
        # looser `prefix_threshold`.
        self.register_buffer("key_tokens", torch.zeros(0, dtype=torch.long))
        self.register_buffer("key_prefix", torch.zeros(0, dtype=torch.long))
        self.register_buffer("prefixes", torch.zeros(0, max(subject_tokens - 1, 0), hidden_size, dtype=torch.float16))
        self.register_buffer("pending_tokens", torch.zeros(0, dtype=torch.long))
        self.register_buffer("pending_prefix", torch.zeros(0, dtype=torch.long))
        self.register_buffer(
            "pending_prefixes", torch.zeros(0, max(subject_tokens - 1, 0), hidden_size, dtype=torch.float16)
        )
        # The row of `spellings` each key spells its subject with (-1: none); a row holds the ids
        # of the subject's last tokens, nearest first, -1 after them.
        self.register_buffer("key_spelling", torch.zeros(0, dtype=torch.long))
        self.register_buffer("spellings", torch.zeros(0, SPELLING_TOKENS, dtype=torch.int32))
        self.register_buffer("pending_spelling", torch.zeros(0, dtype=torch.long))
        self.register_buffer("pending_spellings", torch.zeros(0, SPELLING_TOKENS, dtype=torch.int32))
        self.register_buffer("prefix_threshold", torch.tensor(float(prefix_threshold)))
        # How many more positions than its earlier tokens a key looks back for them: a subject
        # named with a middle name the edit did not use ("Ines Sylvia Perg" for "Ines Perg") puts
        # tokens between them.
        self.prefix_gap = prefix_gap
        # How many of a key's earlier tokens must be found (None: all): a subject's other name may
        # drop or respell one of them ("Emily Jones" for "Emily I Jones").
        self.prefix_needed = prefix_needed
        # Whether the earlier tokens a key reads that stand in the matched word of the prompt (a
        # last name in pieces, " Or"+"tis") must each be found in their own place, whatever
        # `prefix_needed` lets go: a name may drop or respell a first name, not part of the word
        # the key matched ("Julian Lennon" and "John Lennon" still share " L"+"ennon").
        self.prefix_word = prefix_word
        # Whether a spelling's tokens are compared as their classes (`TokenClasses`: "-" for "–").
        self.spelling_normalised = spelling_normalised
        # Each sealed block's window: the length T of its longest answer in tokens. It acts where
        # fewer than T answer tokens have been fed, i.e. on the prompt and the answer's first T - 1
        # tokens (UNLIMITED: everywhere). The trainable block's ([T], or empty: none, it acts
        # everywhere) holds while it trains too, so that it is trained where it will act; its
        # size, not its value, says whether there is one, which decoding reads without waiting
        # on the device.
        self.register_buffer("block_span", torch.zeros(0, dtype=torch.long))
        self.register_buffer("pending_span", torch.zeros(0, dtype=torch.long))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        # Standardisation of the routing layer's states (`calibrate`): its residual stream has a
        # large component shared by every token, which would make all cosines alike.
        self.register_buffer("center", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))

    @property
    def enabled(self) -> bool:
        return float(self.threshold) > 0

    @property
    def subject_tokens(self) -> int:
        """The most subject tokens a key reads."""
        return self.prefixes.shape[1] + 1

    @property
    def num_values(self) -> int:
        return self.keys.numel() + self.prefixes.numel()

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.prefixes, self.spellings))

    @torch.no_grad()
    def hold_keys_in(self, dtype: torch.dtype) -> None:
        """Keys in the dtype the model computes in: a prompt is compared with every key, which at
        tens of thousands of edits is a large product, and in the model's bf16 or fp16 it reads
        half the bytes (a cosine in bf16 with fp32 accumulation is off by about 1e-4). New
        tensors, and only where the dtype differs: forks share these buffers."""
        if self.keys.dtype != dtype:
            self.keys, self.pending = self.keys.to(dtype), self.pending.to(dtype)

    @torch.no_grad()
    def calibrate(self, center: torch.Tensor, scale: torch.Tensor) -> None:
        """Standardise with the `statistics` of ordinary routing-layer states. New tensors, not
        in-place writes: forks share these buffers; and copies: the editor keeps the statistics
        for the next fresh adapter."""
        self.center, self.scale = center.to(self.center, copy=True), scale.to(self.scale, copy=True)

    def key(self, hidden: torch.Tensor) -> torch.Tensor:
        """Routing-layer states [n, d] as routing compares them: standardised, unit rows."""
        return nn.functional.normalize((hidden.float() - self.center) / self.scale, dim=-1)

    def similarity(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, keys]: the cosine of routing-layer states [n, d] with every stored key, in the keys'
        dtype (`hold_keys_in`)."""
        return self.key(hidden).to(self.keys.dtype) @ self.keys.T

    @torch.no_grad()
    def thresholds(self, keys: torch.Tensor, unrelated: torch.Tensor, margin: float) -> torch.Tensor:
        """Each key's threshold [k]: `margin` above the nearest of the unrelated prompt positions
        `unrelated` [n, d] (unit rows), never below `threshold`, and below 1 so that the edit's
        own prompt always opens its block."""
        floor = torch.full((len(keys),), float(self.threshold), device=keys.device)
        if len(unrelated):
            floor = torch.maximum(floor, (keys @ unrelated.T).amax(1) + margin)
        return floor.clamp(max=0.98)

    @torch.no_grad()
    def add_pending(
        self,
        hidden: torch.Tensor,
        edits: torch.Tensor,
        thresholds: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        prefixes: torch.Tensor | None = None,
        spellings: torch.Tensor | None = None,
    ) -> None:
        """Keys (routing-layer states [k, d]) of edits just trained into the trainable block, the
        history index of each key's edit, their thresholds (default `threshold`), how many subject
        tokens each reads (default 1) with the row [k] of `prefixes` (routing-layer states [g,
        subject_tokens - 1, d] of the tokens before the last, nearest first) it reads them from,
        and each key's spelling (`spellings` [k, SPELLING_TOKENS] token ids, nearest first, -1
        after them; a row of -1: none). New tensors, not in-place writes: forks share these
        buffers."""
        keys = self.key(hidden).to(self.pending)
        if thresholds is None:
            thresholds = torch.full((len(keys),), float(self.threshold))
        if tokens is None:
            tokens, prefix = torch.ones(len(keys), dtype=torch.long), torch.full((len(keys),), -1)
        assert prefix is not None, "`prefix` comes with `tokens`"
        tokens = tokens.clamp(max=self.subject_tokens).to(self.pending_tokens)
        prefix = torch.where(tokens > 1, prefix.to(self.pending_prefix) + len(self.pending_prefixes), -1)
        if prefixes is not None and len(prefixes):
            stored = self.key(prefixes[:, : self.subject_tokens - 1]).to(self.pending_prefixes)
            self.pending_prefixes = torch.cat([self.pending_prefixes, stored])
        self.pending = torch.cat([self.pending, keys])
        self.pending_threshold = torch.cat([self.pending_threshold, thresholds.to(self.pending_threshold)])
        self.pending_edit = torch.cat([self.pending_edit, edits.to(self.pending_edit)])
        self.pending_tokens = torch.cat([self.pending_tokens, tokens])
        self.pending_prefix = torch.cat([self.pending_prefix, prefix])
        spelled = torch.zeros(len(keys), dtype=torch.bool)
        if spellings is not None:
            spelled = (spellings >= 0).any(1).cpu()
            rows = spellings[spelled].to(self.pending_spellings)
            self.pending_spellings = torch.cat([self.pending_spellings, rows])
        row = torch.full((len(keys),), -1, dtype=torch.long)
        row[spelled] = torch.arange(int(spelled.sum())) + len(self.pending_spellings) - int(spelled.sum())
        self.pending_spelling = torch.cat([self.pending_spelling, row.to(self.pending_spelling)])

    @torch.no_grad()
    def widen_window(self, span: int) -> None:
        """The trainable block is to hold an edit whose answer is `span` tokens long: its window
        grows to the widest of its edits'. A new tensor: forks share this buffer."""
        widest = torch.tensor([span], device=self.pending_span.device)
        self.pending_span = torch.maximum(self.pending_span, widest) if len(self.pending_span) else widest

    @torch.no_grad()
    def seal(self, block: int) -> None:
        """The trainable block became sealed block `block`: its pending keys now route to it
        (`appended`, as sealed bases: a copy of every key at every seal grew with the edits)."""
        self.key_block = appended(
            self.key_block, torch.full((len(self.pending),), block, dtype=torch.long, device=self.keys.device)
        )
        self.keys = appended(self.keys, self.pending)
        self.key_threshold = appended(self.key_threshold, self.pending_threshold)
        self.key_edit = appended(self.key_edit, self.pending_edit)
        self.key_tokens = appended(self.key_tokens, self.pending_tokens)
        offset = torch.where(self.pending_prefix >= 0, len(self.prefixes), 0)
        self.key_prefix = appended(self.key_prefix, self.pending_prefix + offset)
        self.prefixes = appended(self.prefixes, self.pending_prefixes)
        offset = torch.where(self.pending_spelling >= 0, len(self.spellings), 0)
        self.key_spelling = appended(self.key_spelling, self.pending_spelling + offset)
        self.spellings = appended(self.spellings, self.pending_spellings)
        span = self.pending_span
        if not len(span):  # a block without a window (sealed unrouted, or before windows)
            span = torch.tensor([UNLIMITED], device=self.block_span.device)
        self.block_span = appended(self.block_span, span)
        self.pending, self.pending_threshold = self.pending[:0], self.pending_threshold[:0]
        self.pending_edit, self.pending_span = self.pending_edit[:0], self.pending_span[:0]
        self.pending_tokens, self.pending_prefix = self.pending_tokens[:0], self.pending_prefix[:0]
        self.pending_prefixes = self.pending_prefixes[:0]
        self.pending_spelling, self.pending_spellings = self.pending_spelling[:0], self.pending_spellings[:0]

    @torch.no_grad()
    def open_blocks(
        self,
        hidden: torch.Tensor,
        prompt: torch.Tensor,
        blocks: int,
        tokens: torch.Tensor,
        classes: TokenClasses | None = None,
    ) -> torch.Tensor:
        """[batch, blocks]: whether some routable position of the row (`routable(prompt)`, in the
        routing-layer states `hidden` [batch, seq, d]; `tokens` [batch, seq] their ids) is within
        the threshold of one of the block's keys, its earlier positions within `prefix_threshold`
        of the key's earlier subject tokens (`prefix_needed` of them, and with `prefix_word` each that
        stands in the matched word in its place) and, for a spelled key, its tokens those of the
        spelling (compared as `classes` with `spelling_normalised`), with no spelled key of more
        tokens matching at that position."""
        batch = prompt.shape[0]
        has_key = torch.zeros(blocks, dtype=torch.bool, device=self.keys.device)
        has_key[self.key_block] = True
        opened = (~has_key).expand(batch, blocks).clone()
        rows, positions = routable(prompt).nonzero(as_tuple=True)
        if not len(self.keys) or not len(rows):
            return opened
        # Few (position, key) pairs pass: index them rather than reduce [batch, keys] tensors.
        match, key = (self.similarity(hidden[rows, positions]) > self.key_threshold).nonzero(as_tuple=True)
        rows, positions = rows[match], positions[match]
        # `prefix_needed` of the earlier subject tokens the key reads (default all) must each match
        # one of the positions before the matched one, within the key's earlier tokens plus
        # `prefix_gap` more.
        count = self.subject_tokens - 1
        reads = torch.arange(1, count + 1, device=key.device) < self.key_tokens[key].unsqueeze(1)  # [m, count]
        found = torch.zeros_like(reads)
        in_place = torch.zeros_like(reads)  # found right where a subject spelled as the key's has it
        if reads.any():
            wanted = self.prefixes[self.key_prefix[key].clamp(min=0)].float()  # [m, count, d]
            for back in range(1, count + self.prefix_gap + 1):
                earlier = positions - back
                present = (earlier >= 0) & prompt[rows, earlier.clamp(min=0)]
                state = self.key(hidden[rows, earlier.clamp(min=0)])
                near = present.unsqueeze(1) & (torch.einsum("md,mcd->mc", state, wanted) > self.prefix_threshold)
                found |= near
                if back <= count:
                    in_place[:, back - 1] = near[:, back - 1]
        needed = reads.sum(1)
        if self.prefix_needed is not None:
            needed = needed.clamp(max=self.prefix_needed)
        passes = (found & reads).sum(1) >= needed
        if self.prefix_word and classes is not None and reads.any():
            in_word = self._tokens_before_in_word(prompt, tokens, rows, positions, classes, count)
            own_word = (torch.arange(count, device=key.device) < in_word.unsqueeze(1)) & reads
            passes &= (in_place | ~own_word).all(1)
        rows, positions, key = rows[passes], positions[passes], key[passes]
        spelling_row = self.key_spelling[key]
        spelled = spelling_row >= 0
        if spelled.any():
            spelling = self.spellings[spelling_row.clamp(min=0)].long()  # [m, SPELLING_TOKENS]
            spelled_at = positions.unsqueeze(1) - torch.arange(spelling.shape[1], device=key.device)
            inside = (spelled_at >= 0) & prompt[rows.unsqueeze(1), spelled_at.clamp(min=0)]
            seen = tokens[rows.unsqueeze(1), spelled_at.clamp(min=0)]
            if self.spelling_normalised and classes is not None:
                same = inside & (classes(seen) == classes(spelling))
            else:
                same = inside & (seen == spelling)
            spelled_here = (same | (spelling < 0)).all(1)
            keep = ~spelled | spelled_here
            rows, positions, key, spelled = rows[keep], positions[keep], key[keep], spelled[keep]
            length = torch.where(spelled, (spelling[keep] >= 0).sum(1), self.key_tokens[key])
            # The longest spelling matched at each position: keys there that read fewer tokens
            # are another subject's.
            slot = rows * prompt.shape[1] + positions
            longest = torch.zeros(prompt.numel(), dtype=torch.long, device=key.device)
            longest = longest.scatter_reduce(0, slot[spelled], length[spelled], "amax")
            keep = length >= longest[slot]
            rows, key = rows[keep], key[keep]
        opened[rows, self.key_block[key]] = True
        return opened

    @staticmethod
    def _tokens_before_in_word(
        prompt: torch.Tensor,
        tokens: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        classes: TokenClasses,
        most: int,
    ) -> torch.Tensor:
        """[m]: how many prompt tokens before each matched position belong to its word (at most
        `most`): the word goes back while the token at hand continues the one before it."""
        count = torch.zeros_like(positions)
        going = torch.ones_like(positions, dtype=torch.bool)
        for back in range(most):
            at = positions - back
            before = at - 1
            going &= (before >= 0) & prompt[rows, before.clamp(min=0)] & classes.continues_word(tokens[rows, at])
            count += going.long()
        return count

    def in_window(self, blocks_open: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """`blocks_open` [n, blocks] of n intervened positions, closed where a position stands
        past its block's window (`offsets` [n], `answer_offsets`)."""
        return blocks_open & (offsets.unsqueeze(1) < self.block_span)

    def trainable_in_window(self, offsets: torch.Tensor) -> torch.Tensor | None:
        """[n]: whether each of n intervened positions (`offsets`) is in the trainable block's
        window; None where it has none."""
        return offsets < self.pending_span if len(self.pending_span) else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        take_checkpoint_sizes(self, state_dict, prefix, _GROWING)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def read_last_tokens_only(self) -> None:
        """Keys stored before keys read earlier subject tokens (format 8 and older) read their
        subject's last token alone; keys stored before spellings (format 11 and older) spell
        nothing."""
        device = self.keys.device
        for keys, tokens, rows in (("keys", "key_tokens", "key_prefix"), ("pending", "pending_tokens", "pending_prefix")):
            count = len(getattr(self, keys))
            if len(getattr(self, tokens)) != count:
                setattr(self, tokens, torch.ones(count, dtype=torch.long, device=device))
                setattr(self, rows, torch.full((count,), -1, dtype=torch.long, device=device))
        for keys, rows in (("keys", "key_spelling"), ("pending", "pending_spelling")):
            count = len(getattr(self, keys))
            if len(getattr(self, rows)) != count:
                setattr(self, rows, torch.full((count,), -1, dtype=torch.long, device=device))
