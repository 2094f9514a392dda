"""Splits a continual run's locality by what its prompts are about: other subjects, or a subject
that some edit of the run changed.

At thousands of CounterFact edits many locality prompts name a subject that another record of the
same run edits, often asking the very fact that edit rewrote ("The native language of Jean-Baptiste
Say is", while another record moves Say's native language): the edited model should then give the
new answer, and `loc` counts that as a miss. This script reports locality on the prompts that name
no edited subject apart from those that do, and among the latter the prompts whose expected answer
is the unedited answer an edit of that subject replaced (the same fact, rewritten).

python bench/locality_by_subject.py bench/results/counterfact-continual-10000-baft
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_scores import group_means, parse_run, run_scores, write_result  # noqa: E402


def split(records: list[dict], scores: dict[int, float]) -> dict:
    """Locality of CounterFact `records` (the run's edits, in order) at the indices in `scores`,
    by group."""
    edited: dict[str, list[dict]] = {}
    for record in records:
        edited.setdefault(record["subject"], []).append(record)
    groups: dict[str, list[float]] = {"other_subjects": [], "edited_subject": [], "rewritten_fact": []}
    for index, score in scores.items():
        record = records[index]
        named = [s for s in edited if s in record["locality_prompt"]]
        if not named:
            groups["other_subjects"].append(score)
            continue
        groups["edited_subject"].append(score)
        truth = record["locality_ground_truth"]
        if any(other["ground_truth"] == truth for s in named for other in edited[s]):
            groups["rewritten_fact"].append(score)
    return group_means(groups, "prompts", "loc")


def main() -> None:
    run = parse_run(__doc__.split("\n")[0])
    records, scores = run_scores(run, "loc", "CounterFact")
    result = {"command": "python bench/locality_by_subject.py " + " ".join(sys.argv[1:]), **split(records, scores)}
    write_result(run, "locality_by_subject.json", result)


if __name__ == "__main__":
    main()
