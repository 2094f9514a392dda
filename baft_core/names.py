"""Other spellings of a subject's name that its aliases often use.

A route key reads its subject's last tokens (routing.py), so a name spelled otherwise opens
nothing: "Manuel Ramon Alarcon" not the block of "Manuel Ramón Alarcón", "Jean Kim" not that of
"Jean H. Kim". An edit also leaves keys for its subject's name without diacritics (letters such as
æ, ø, ß spelled out) and without middle initials, where those differ from the name it was given.
Both are spellings, not knowledge: a name the model would have to know ("Gorsedd of Brittany" for
"Goursez Vreizh") is out of reach of a key read at an early layer.
"""
from __future__ import annotations

import unicodedata

_SPELLED_OUT = str.maketrans(
    {"æ": "ae", "Æ": "Ae", "œ": "oe", "Œ": "Oe", "ø": "o", "Ø": "O", "ß": "ss", "ł": "l", "Ł": "L",
     "đ": "d", "Đ": "D", "ı": "i", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D"}
)


def without_diacritics(name: str) -> str:
    """`name` with its letters' marks dropped and letters such as æ, ø, ß spelled out."""
    decomposed = unicodedata.normalize("NFKD", name.translate(_SPELLED_OUT))
    # Composed again: scripts without marks (Hangul) come back as they were.
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if not unicodedata.combining(c)))


def _is_name_word(word: str) -> bool:
    return len(word) >= 2 and word[0].isupper() and word.rstrip(",").isalpha()


def _is_initial(word: str) -> bool:
    letter = word[:-1] if word.endswith(".") else word
    return len(letter) == 1 and letter.isupper()


def without_initials(name: str) -> str:
    """`name` without the initials that stand between two capitalised words ("Jean H. Kim" ->
    "Jean Kim"); a first initial ("S. Van Schaick"), a regnal number ("Eustache I of Conflans")
    and a catalogue number ("D. 946") stay."""
    words = name.split(" ")
    kept: list[str] = []
    for i, word in enumerate(words):
        if _is_initial(word) and kept and _is_name_word(kept[-1]):
            after = next((w for w in words[i + 1 :] if not _is_initial(w)), "")
            if _is_name_word(after):
                continue
        kept.append(word)
    return " ".join(kept)


def name_variants(subject: str) -> list[str]:
    """The subject's other spellings (`without_diacritics`, `without_initials`, both), each once
    and none equal to the subject."""
    variants: list[str] = []
    for variant in (without_diacritics(subject), without_initials(subject), without_initials(without_diacritics(subject))):
        if variant != subject and variant.strip() and variant not in variants:
            variants.append(variant)
    return variants
