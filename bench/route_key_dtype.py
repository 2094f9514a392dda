"""Whether route keys held in bf16 (`Router.hold_keys_in`, what a bf16 model gets) open the same
blocks as in fp32: `--edits` continual CounterFact edits made with fp32 keys, then every edit's
prompt, rephrase and locality prompt routed against all blocks with the keys in fp32 and again in
bf16 (the relation check applied as in serving, `metrics.open_blocks`). One thread.

    .venv/bin/python bench/route_key_dtype.py [--edits 300]

Writes bench/results/route_key_dtype.json."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from baft_core import EditConfig, Editor, EditRequest, load_model, metrics  # noqa: E402
from baft_core.data import load_edits  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "counterfact" / "counterfact_train.json"
OUT = REPO / "bench" / "results" / "route_key_dtype.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(dtype="bfloat16")
    records = load_edits(DATA, "counterfact")[: args.edits]
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig())
    editor.attachment.key_dtype = torch.float32  # as before keys followed the model's dtype
    editor.interventions.router.hold_keys_in(torch.float32)
    for record in records:
        editor.edit(EditRequest(record.prompt, record.target, record.subject))
    prompts = [r.prompt for r in records] + [q for r in records for q in r.rephrases]
    prompts += [p.prompt for r in records for p in r.locality]
    fp32 = metrics.open_blocks(editor, prompts)
    editor.interventions.router.hold_keys_in(torch.bfloat16)
    bf16 = metrics.open_blocks(editor, prompts)
    report = {
        "command": "python bench/route_key_dtype.py " + " ".join(sys.argv[1:]),
        "model": loaded.identity,
        "edits": len(records),
        "prompts": len(prompts),
        "decisions": fp32.numel(),
        "differ": int((fp32 != bf16).sum()),
        "opened_fp32": int(fp32.sum()),
        "opened_bf16": int(bf16.sum()),
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
