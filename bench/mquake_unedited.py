"""What the unedited bundled model answers to MQuAKE's multi-hop questions: token accuracy of
the case's original answer and of its new answer (the one after all its edits), the baseline of
the bench's `por/multi_hop`. Some new answers are common words ("English"), so the new answer's
score is not zero before any edit.

    .venv/bin/python bench/mquake_unedited.py [--data ../shared/data/mquake/mquake_hard_dev.json]

Writes bench/results/mquake_unedited.json."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from baft_core import EditConfig, Editor, load_model, metrics  # noqa: E402
from baft_core.encoding import Example  # noqa: E402

OUT = REPO / "bench" / "results" / "mquake_unedited.json"


def token_accuracy(editor: Editor, examples: list[Example]) -> float:
    predicted = metrics.answer_argmax(editor, examples, edited=False)
    return statistics.mean(statistics.mean(float(p == t) for p, t in zip(row, e.answer)) for row, e in zip(predicted, examples))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mquake" / "mquake_hard_dev.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(dtype="auto")
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig(), unrelated_prompts=[])
    cases = json.loads(Path(args.data).read_text())
    questions = [(q, c) for c in cases for q in c["questions"]]
    report = {
        "command": "python bench/mquake_unedited.py " + " ".join(sys.argv[1:]),
        "model": loaded.identity,
        "dtype": loaded.precision,
        "cases": len(cases),
        "questions": len(questions),
        "original_answer": round(token_accuracy(editor, [editor.encode(q, c["answer"]) for q, c in questions]), 4),
        "new_answer": round(token_accuracy(editor, [editor.encode(q, c["new_answer"]) for q, c in questions]), 4),
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
