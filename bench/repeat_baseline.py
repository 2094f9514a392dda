"""How often the *unedited* model says an answer again right after it: the baseline for the
benchmark's `rep` (the edited model's greedy continuation after the new answer repeats it).

For the first N records of each data file, the unedited model is fed prompt + answer and decodes
`metrics.REPEAT_WINDOW` tokens greedily; a hit is the answer occurring in them, exactly as
`metrics.answer_repeated` counts it. Answers: the edit's new target (what `rep` is measured
after), and for CounterFact also the true object (what the model would say unedited).

    .venv/bin/python bench/repeat_baseline.py --out bench/results/repeat_baseline.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from baft_core import load_edits, load_model
from baft_core.encoding import Example, encode
from baft_core.generation import generate
from baft_core.metrics import REPEAT_WINDOW, answer_repeated

DATA = {
    "zsre": "../shared/data/zsre/zsre_eval_portability_dev.json",
    "counterfact": "../shared/data/counterfact/counterfact_val.json",
}


def repeat_rate(loaded, examples: list[Example]) -> float:
    tokenizer, hits = loaded.tokenizer, 0.0
    for start in range(0, len(examples), 32):
        chunk = examples[start : start + 32]
        decoded = generate(loaded.model, tokenizer, [e.prompt + e.answer for e in chunk], REPEAT_WINDOW, stop_at_eos=False)
        hits += sum(answer_repeated(loaded, e, after) for e, after in zip(chunk, decoded))
    return hits / len(examples)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model()
    loaded.model.requires_grad_(False)
    result = {"command": "python bench/repeat_baseline.py " + " ".join(sys.argv[1:]), "model": loaded.identity}
    for name, path in DATA.items():
        requests = load_edits(path, name, limit=args.records, skip_invalid=True)
        new = [encode(loaded.tokenizer, r.prompt, r.target) for r in requests]
        result[f"{name}_new_target"] = repeat_rate(loaded, new)
        if name == "counterfact":
            records = json.loads(Path(path).read_text())[: args.records]
            true = [encode(loaded.tokenizer, r["prompt"], r["ground_truth"]) for r in records]
            result[f"{name}_true_object"] = repeat_rate(loaded, true)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
