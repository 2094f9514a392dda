"""Splits a KnowEdit run's Relation_Specificity by how its prompts are worded: like one of the
built-in probes the relation check holds prompts against (`subject_probes.RELATIONS`, the very text
with the edit's subject), or otherwise.

The built-in list was written for the service, not taken from a benchmark, but its second wordings
take the form of questions built from Wikidata property labels, which is KnowEdit's form, and many
of its prompts read the same ("The gender of {subject} is"): on those prompts the check compares a
prompt with itself. The other prompts say how the check carries to wordings it has never seen.
Each edit is placed by its Relation_Specificity prompts: all worded like a probe, none, or some
(per-prompt scores are not in the run's rows).

python bench/locality_by_wording.py bench/results/knowedit-counterfact-continual-714-baft
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_scores import REPO, group_means, parse_run, run_scores, write_result  # noqa: E402

sys.path.insert(0, str(REPO))

from baft_core.subject_probes import RELATIONS  # noqa: E402

GROUP = "Relation_Specificity"


def worded_like_a_probe(prompt: str, subject: str) -> bool:
    return any(r.template.format(subject=subject.strip()) == prompt for r in RELATIONS)


def split(records: list[dict], scores: dict[int, float]) -> dict:
    """Relation_Specificity of KnowEdit `records` (the run's edits, in order) at the indices in
    `scores`, by how the edit's prompts are worded."""
    groups: dict[str, list[float]] = {"all_like_a_probe": [], "none_like_a_probe": [], "some_like_a_probe": []}
    for index, score in scores.items():
        record = records[index]
        prompts = [p["prompt"] for p in (record.get("locality") or {}).get(GROUP) or []]
        like = [worded_like_a_probe(p, record["subject"]) for p in prompts]
        name = "all_like_a_probe" if all(like) else "none_like_a_probe" if not any(like) else "some_like_a_probe"
        groups[name].append(score)
    return group_means(groups, "edits", GROUP)


def main() -> None:
    run = parse_run(__doc__.split("\n")[0])
    records, scores = run_scores(run, f"loc/{GROUP}", "KnowEdit")
    result = {"run": str(run), "command": "python " + " ".join(sys.argv), **split(records, scores)}
    write_result(run, "locality_by_wording.json", result)


if __name__ == "__main__":
    main()
