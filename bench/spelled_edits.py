"""How many edits of a run's data spell their subject (baft_core/spelling.py): those whose
subject ends in the tokens an earlier edited subject's route key reads. Where none does, a run
with `route_spelling=false` is the same run as one with today's defaults.

python bench/spelled_edits.py --data ../shared/data/knowedit/wiki_counterfact_dev.json --format knowedit --edits 714

Each call replaces its set's entry (the same data and edits) in `--out`, a list of the sets counted.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_scores import replace_entry, set_parser, set_records  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from baft_core.config import EditConfig  # noqa: E402
from baft_core.models import model_directory  # noqa: E402
from baft_core.spelling import SubjectEndings, subject_ids  # noqa: E402


def spelled(subjects: list[str | None], tokenizer, route_tokens: int) -> list[int]:
    """The indices of the subjects (in edit order) that spell."""
    endings, indices = SubjectEndings(route_tokens), []
    for index, subject in enumerate(subjects):
        if subject and subject.strip():
            ids = subject_ids(tokenizer, subject)
            if endings.spelling_length(ids):
                indices.append(index)
            endings.add(ids)
    return indices


def main() -> None:
    args = set_parser(__doc__.split("\n")[0], "spelled_edits.json").parse_args()
    edits = set_records(args)
    tokenizer = AutoTokenizer.from_pretrained(model_directory()[0])
    indices = spelled([e.subject for e in edits], tokenizer, EditConfig().route_tokens)
    entry = {
        "command": "python " + " ".join(sys.argv),
        "data": args.data,
        "edits": len(edits),
        "spelled": len(indices),
        "indices": indices,
    }
    replace_entry(args.out, entry)


if __name__ == "__main__":
    main()
