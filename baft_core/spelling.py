"""Which edits spell their subject: those whose subject ends in the tokens an earlier edited
subject's route key reads (routing.py).

A route key reads its subject's last `route_tokens` tokens as an early layer sees them, which
tells "Otis Taylor" from "Phoebe Atwood Taylor" but not "1981 Lithuanian Badminton Championships
– women's singles" from "1965 New Zealand Badminton Championships – women's singles": a question
about either opens the other's block. An edit whose subject ends like an earlier edited one's
keeps the ids of as many of its subject's last tokens as it takes to differ from each of them
(the spelling), and routing holds its keys to those very tokens. Where the subjects are the same
there is nothing to spell (the relation check tells their edits apart), and where the new subject
is the end of an earlier one ("Taylor" after "Otis Taylor") it has no token to spell that the
other lacks.
"""
from __future__ import annotations

import functools
import unicodedata
from collections import defaultdict

import torch

# The most subject tokens a spelling holds: subjects that differ only further back stay unspelled.
SPELLING_TOKENS = 32

# Dashes and the minus sign, which names write interchangeably ("Championships – women's" and
# "Championships - women's").
_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212"), "-")


def subject_ids(tokenizer, subject: str) -> tuple[int, ...]:
    """The subject's token ids as it reads mid-text (after a space)."""
    return tuple(tokenizer(" " + subject.strip(), add_special_tokens=False).input_ids)


def common_ending(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many last tokens `a` and `b` share."""
    count = 0
    while count < min(len(a), len(b)) and a[-1 - count] == b[-1 - count]:
        count += 1
    return count


class SubjectEndings:
    """The edited subjects' token ids by the ending their route keys read: their last
    `route_tokens` tokens, or all of a shorter subject's."""

    def __init__(self, route_tokens: int):
        self.route_tokens = route_tokens
        self.by_ending: dict[tuple[int, ...], set[tuple[int, ...]]] = defaultdict(set)

    def add(self, ids: tuple[int, ...]) -> None:
        if ids:
            self.by_ending[ids[-self.route_tokens :]].add(ids)

    def spelling_length(self, ids: tuple[int, ...]) -> int:
        """How many of its last tokens a subject (`ids`) spells: one more than it shares with
        the added subjects whose keys read its ending, 0 where there is none."""
        length = 0
        for count in range(1, min(self.route_tokens, len(ids)) + 1):
            for other in self.by_ending.get(ids[-count:], ()):
                shared = common_ending(ids, other)
                if other != ids and shared < len(ids) and shared < SPELLING_TOKENS:
                    length = max(length, shared + 1)
        return length


class TokenClasses:
    """Token ids to the id of the first token that reads the same once normalised (NFKC, dashes
    as "-", case folded), which spelled keys compare (with `route_spelling_normalised`): a
    subject's other names write "-" for "–" or change its case. A token that decodes to part of a
    character is a class of its own. The table takes a pass over the vocabulary (about a second
    for 49,152 tokens), made on first use (`build` makes it at once): only a prompt that matches a
    spelled key needs it. Also which tokens go on the word before them (`continues_word`, for
    `route_prefix_word`)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def build(self) -> None:
        """Makes both tables now: a server at start-up, rather than in the first request whose
        prompt matches a key."""
        _ = self._classes, self._continues

    @functools.cached_property
    def _texts(self) -> list[str]:
        """Each token of the vocabulary decoded alone: the one pass both tables are made from."""
        return self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])

    @functools.cached_property
    def _classes(self) -> torch.Tensor:
        first: dict[str, int] = {}
        return torch.tensor([
            i if "\ufffd" in text else first.setdefault(unicodedata.normalize("NFKC", text).translate(_DASHES).casefold(), i)
            for i, text in enumerate(self._texts)
        ])

    @functools.cached_property
    def _continues(self) -> torch.Tensor:
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return torch.tensor([bool(p) and p[0] not in "Ġ▁" and text[:1].isalnum() for p, text in zip(pieces, self._texts)])

    def continues_word(self, ids: torch.Tensor) -> torch.Tensor:
        """Whether each of `ids` (any shape) goes on the word before it ("tis" of " Or"+"tis"):
        it starts with a letter or digit and without the tokenizer's word marker (byte-level
        BPE's "Ġ", SentencePiece's "▁"). Ids outside the vocabulary do not."""
        inside, rows = _looked_up(self._continues, ids)
        return inside & rows

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """The classes of `ids` (any shape; ids outside the tokenizer's vocabulary are their own)."""
        inside, rows = _looked_up(self._classes, ids)
        return torch.where(inside, rows, ids)


def _looked_up(table: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each of `ids` is in `table`'s range, and its row (that of the nearest id outside)."""
    table = table.to(ids.device)
    return (ids >= 0) & (ids < len(table)), table[ids.clamp(0, len(table) - 1)]
