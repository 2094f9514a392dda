"""Splits a KnowEdit run's Relation_Specificity by whether the edit's subject ends in the same
tokens as another subject the run edits.

A route key reads a subject's last `route_tokens` tokens (routing.py). KnowEdit's
WikiData_counterfact has series of names that end alike ("2012/2013 German Badminton Championships
U17 – women's doubles", "2012/2013 German Senior Badminton Championships O55 – women's doubles"):
a question about one of them opens the blocks of the others, and where another of them edited the
very relation asked, its new answer is given. The relation check cannot tell those apart (the
prompt reads like that block's own edit, not like one of its probes). This script reports
Relation_Specificity for the edits whose subject's last `route_tokens` tokens (as the subject reads
mid-text) are another edited subject's too, apart from the rest. Apart from both: the edits whose
subject another edit of the set edits too (`same_subject`), and among those the ones one of whose
Relation_Specificity prompts is the other edit's own prompt (`rewritten_fact`): there the edited
model should give the other edit's new answer, and the metric counts it as a miss.

python bench/locality_by_subject_ending.py bench/results/knowedit-counterfact-continual-714-baft
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_scores import REPO, group_means, parse_run, run_scores, write_result  # noqa: E402

sys.path.insert(0, str(REPO))

from transformers import AutoTokenizer  # noqa: E402

from baft_core.models import model_directory  # noqa: E402

GROUP = "Relation_Specificity"


def split(records: list[dict], scores: dict[int, float], endings: list[tuple[int, ...]]) -> dict:
    """Relation_Specificity of KnowEdit `records` (the run's edits, in order) at the indices in
    `scores`: where another edit rewrote a fact it asks, where another edit has its subject, else
    by whether the edit's subject `endings` (its last key tokens) recur in the run."""
    subjects = Counter(record["subject"].strip() for record in records)
    counts = Counter(endings)
    edit_prompts = {record["prompt"] for record in records}
    groups: dict[str, list[float]] = {"rewritten_fact": [], "same_subject": [], "ending_shared": [], "ending_unique": []}
    for index, score in scores.items():
        record = records[index]
        prompts = {p["prompt"] for p in (record.get("locality") or {}).get(GROUP) or []}
        if prompts & (edit_prompts - {record["prompt"]}):
            groups["rewritten_fact"].append(score)
        elif subjects[record["subject"].strip()] > 1:
            groups["same_subject"].append(score)
        else:
            groups["ending_shared" if counts[endings[index]] > 1 else "ending_unique"].append(score)
    return group_means(groups, "edits", GROUP)


def main() -> None:
    run = parse_run(__doc__.split("\n")[0])
    records, scores = run_scores(run, f"loc/{GROUP}", "KnowEdit")
    count = json.loads((run / "summary.json").read_text())["config"]["route_tokens"]
    tokenizer = AutoTokenizer.from_pretrained(model_directory()[0])
    endings = [
        tuple(tokenizer(" " + record["subject"].strip(), add_special_tokens=False).input_ids[-count:])
        for record in records
    ]
    result = {
        "run": str(run),
        "command": "python " + " ".join(sys.argv),
        "route_tokens": count,
        **split(records, scores, endings),
    }
    write_result(run, "locality_by_subject_ending.json", result)


if __name__ == "__main__":
    main()
