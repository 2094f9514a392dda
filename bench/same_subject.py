"""Builds a same-subject edit set from KnowEdit: two edits about one subject, then its other facts.

For each record with at least three Relation_Specificity probes (other facts of its subject), two
consecutive records in KnowEdit's format: the record's own edit, and an edit of its first probe's
relation to a new object (the answer another subject has for the same relation). The remaining
probes are the first record's locality: after both edits, the subject's other facts must stay.

python bench/same_subject.py ../shared/data/knowedit/wiki_recent_dev.json --subjects 100 \
    --out bench/results/data/same_subject_recent.json
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def _answer(value) -> str:
    while isinstance(value, list):
        value = value[0] if value else ""
    return str(value)


def build(records: list[dict], subjects: int, seed: int = 0) -> list[dict]:
    # Every answer a relation template has across the file: where new objects come from.
    answers: dict[str, list[str]] = {}
    for record in records:
        for probe in (record.get("locality") or {}).get("Relation_Specificity", []):
            template = probe["prompt"].replace(record["subject"], "{subject}")
            answers.setdefault(template, []).append(_answer(probe["ground_truth"]))
    rng = random.Random(seed)
    out: list[dict] = []
    for record in records:
        probes = (record.get("locality") or {}).get("Relation_Specificity", [])
        if len(probes) < 3 or record["subject"] not in probes[0]["prompt"]:
            continue
        first, rest = probes[0], probes[1:]
        old = _answer(first["ground_truth"])
        template = first["prompt"].replace(record["subject"], "{subject}")
        candidates = sorted({a for a in answers[template] if a and a != old})
        if not candidates:
            continue
        out.append(
            {
                "subject": record["subject"],
                "prompt": record["prompt"],
                "target_new": _answer(record["target_new"]),
                "locality": {"Relation_Specificity": rest},
            }
        )
        out.append(
            {
                "subject": record["subject"],
                "prompt": first["prompt"],
                "target_new": rng.choice(candidates),
                "ground_truth": old,
            }
        )
        if len(out) == 2 * subjects:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", help="a KnowEdit file (wiki_recent_dev.json)")
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    records = build(json.loads(Path(args.data).read_text(encoding="utf-8")), args.subjects, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"{len(records) // 2} subjects, {len(records)} edits -> {args.out}")


if __name__ == "__main__":
    main()
