"""Edit requests as plain data, and loaders for the public benchmark formats."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Probe:
    """A prompt and the answer expected after it (locality: the unedited model's answer), and the
    benchmark's group it belongs to (KnowEdit's Relation_Specificity, Subject_Aliasing, ...)."""

    prompt: str
    answer: str
    group: str | None = None


@dataclass
class EditRequest:
    prompt: str
    target: str
    subject: str | None = None
    rephrases: list[str] = field(default_factory=list)
    locality: list[Probe] = field(default_factory=list)
    portability: list[Probe] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt or not self.prompt.strip():
            raise ValueError("edit prompt is empty")
        if not self.target or not self.target.strip():
            raise ValueError("edit target is empty")
        self.locality = [p if isinstance(p, Probe) else Probe(**p) for p in self.locality]
        self.portability = [p if isinstance(p, Probe) else Probe(**p) for p in self.portability]

    @classmethod
    def from_triple(cls, subject: str, relation: str, target: str, **extra: Any) -> EditRequest:
        """`relation` is a template with {subject} ("The mother tongue of {subject} is") or a
        phrase that follows the subject ("was born in")."""
        if not subject.strip():
            raise ValueError("subject is empty")
        if "{subject}" in relation:
            try:
                prompt = relation.format(subject=subject)
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"bad relation template {relation!r}: {err}") from None
        else:
            prompt = f"{subject} {relation.strip()}"
        return cls(prompt=prompt, target=target, subject=subject, **extra)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EditRequest:
        return cls(**data)


def _first_answer(value: Any) -> str:
    """KnowEdit answers come as a string, a list of aliases, or a list of alias lists."""
    while isinstance(value, list):
        if not value:
            return ""
        value = value[0]
    return str(value)


def _zsre(record: dict) -> EditRequest:
    portability = record.get("portability") or {}
    return EditRequest(
        prompt=record["src"],
        target=record["alt"],
        subject=record.get("subject"),
        rephrases=[record["rephrase"]] if record.get("rephrase") else [],
        locality=[Probe(record["loc"], record["loc_ans"])] if record.get("loc") else [],
        portability=(
            [Probe(portability["New Question"], portability["New Answer"])]
            if "New Question" in portability
            else []
        ),
    )


def _counterfact(record: dict) -> EditRequest:
    return EditRequest(
        prompt=record["prompt"],
        target=record["target_new"],
        subject=record.get("subject"),
        rephrases=[record["rephrase_prompt"]] if record.get("rephrase_prompt") else [],
        locality=(
            [Probe(record["locality_prompt"], record["locality_ground_truth"])]
            if record.get("locality_prompt")
            else []
        ),
    )


def _knowedit(record: dict) -> EditRequest:
    def probes(groups: dict | None) -> list[Probe]:
        out = []
        for group, items in (groups or {}).items():
            for item in items:
                answer = _first_answer(item.get("ground_truth"))
                if item.get("prompt") and answer:
                    out.append(Probe(item["prompt"], answer, group))
        return out

    rephrase = record.get("rephrase") or record.get("rephrase_prompt")
    return EditRequest(
        prompt=record["prompt"],
        target=_first_answer(record["target_new"]),
        subject=record.get("subject"),
        rephrases=[rephrase] if rephrase else [],
        locality=probes(record.get("locality")),
        portability=probes(record.get("portability")),
    )


def _wikibio(record: dict) -> EditRequest:
    """KnowEdit WikiBio: a Wikipedia passage about `concept` continued by a new sentence
    (`labels`); its locality asks other facts of the same person."""
    return _knowedit(
        {"prompt": record["text"], "target_new": record["labels"], "subject": record["concept"], "locality": record.get("locality")}
    )


def _mquake(record: dict) -> list[EditRequest]:
    """MQuAKE: a case's rewrites (several facts of a chain) are edits of their own, each with its
    question as a rephrase; the case's multi-hop questions, whose answer follows from all of
    them, are portability probes (group `multi_hop`) of its first rewrite."""
    edits = []
    for rewrite in record["requested_rewrite"]:
        subject = rewrite["subject"]
        edits.append(
            EditRequest(
                prompt=rewrite["prompt"].format(subject),
                target=rewrite["target_new"]["str"],
                subject=subject,
                rephrases=[rewrite["question"]] if rewrite.get("question") else [],
            )
        )
    if edits:
        edits[0].portability = [Probe(q, record["new_answer"], "multi_hop") for q in record["questions"]]
    return edits


# A record is one edit, or (MQuAKE) several.
FORMATS: dict[str, Callable[[dict], EditRequest | list[EditRequest]]] = {
    "zsre": _zsre,
    "counterfact": _counterfact,
    "knowedit": _knowedit,
    "wikibio": _wikibio,
    "mquake": _mquake,
}


def load_edits(
    path: str | Path, fmt: str, limit: int | None = None, skip_invalid: bool = False
) -> list[EditRequest]:
    """Read a benchmark file (a JSON list, or JSON lines) of the given format. With skip_invalid,
    records that are of the format but no valid edit (the ZsRE train split has two with an
    empty target) are left out with a warning instead of failing the whole file."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}: expected one of {sorted(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of records")
    convert = FORMATS[fmt]
    edits: list[EditRequest] = []
    skipped = []
    # Records that share an edit (MQuAKE's cases share rewrites) make it once, with the probes
    # of every record that asks for it.
    seen: dict[tuple[str, str], EditRequest] = {}
    for index, record in enumerate(records[:limit] if limit else records):
        try:
            converted = convert(record)
            for edit in converted if isinstance(converted, list) else [converted]:
                key = (edit.prompt, edit.target)
                if isinstance(converted, list) and key in seen:
                    seen[key].portability += edit.portability
                    continue
                seen[key] = edit
                edits.append(edit)
        except ValueError as err:
            if not skip_invalid:
                raise ValueError(f"{path}: record {index} is not a valid edit ({err})") from None
            skipped.append(index)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: record {index} is not {fmt} format ({err!r})") from None
    if skipped:
        logging.getLogger(__name__).warning("%s: skipped invalid records %s", path, skipped)
    return edits
