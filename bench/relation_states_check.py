"""Whether the relation check decides as before with its states read over shared starts and held in
int8 (`prompt_starts.py`, `relations.py`), against whole-prompt forwards held in fp16 (the format-10
check), and what the starts save. No training: per KnowEdit WikiData_counterfact record, one block
holding the record's edit prompt and its probes, asked about the record's prompts as serving asks
(each prompt's state from its own forward): its Relation_Specificity prompts (the check should
shut the block) and its Subject_Aliasing prompts and rephrases (those ask the edit's relation: it
should stay open). One thread; the probe forwards of both ways are timed record by record,
alternating.

    .venv/bin/python bench/relation_states_check.py [--records 200]

Writes bench/results/relation_states_check.json."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from baft_core import EditConfig, Editor, load_model  # noqa: E402
from baft_core.data import load_edits  # noqa: E402
from baft_core.encoding import encode_prompt  # noqa: E402
from baft_core.relations import RelationCheck  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "knowedit" / "wiki_counterfact_dev.json"
OUT = REPO / "bench" / "results" / "relation_states_check.json"
SHOULD_SHUT = ("Relation_Specificity",)


def whole(editor: Editor, prompts: list[str], layer: int) -> torch.Tensor:
    """Each prompt's state at its last position from left-padded whole-prompt forwards."""
    ids = [encode_prompt(editor.tokenizer, p, editor.context) for p in prompts]
    return torch.cat([editor.routing_layer_output(ids[i : i + 32], layer)[0][:, -1].float() for i in range(0, len(ids), 32)])


def fp16_shut(check: RelationCheck, keys: torch.Tensor, probes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The format-10 rule: unit rows in fp16."""
    key, probe = (check.unit(t).half().float() for t in (keys, probes))
    last = check.unit(queries)
    nearest_probe, nearest_key = (last @ probe.T).amax(1), (last @ key.T).amax(1)
    return (nearest_probe > check.threshold) & (nearest_probe > nearest_key + check.margin)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(dtype="bfloat16")
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig())
    layer = editor.interventions.relations.layer
    center = editor.unrelated.relation_center(layer)
    records = [r for r in load_edits(DATA, "knowedit") if r.subject][: args.records]
    counts = {"decisions": 0, "differ": 0, "shut_should": [0, 0, 0], "open_should": [0, 0, 0]}
    tokens_whole = tokens_after_starts = 0
    seconds_whole, seconds_shared, worst = [], [], 0.0
    editor.last_prompt_states([records[0].prompt], layer, [records[0].subject])  # the templates' starts
    for record in records:
        prompts = [record.prompt, *editor.relation_probes(record)]
        subjects = [record.subject] * len(prompts)
        start = time.perf_counter()
        old = whole(editor, prompts, layer)
        seconds_whole.append(time.perf_counter() - start)
        start = time.perf_counter()
        new = editor.last_prompt_states(prompts, layer, subjects)
        seconds_shared.append(time.perf_counter() - start)
        worst = max(worst, (1 - torch.nn.functional.cosine_similarity(old, new, dim=-1)).max().item())
        for prompt in prompts:
            ids = encode_prompt(editor.tokenizer, prompt)
            tokens_whole += len(ids)
            tokens_after_starts += len(ids) - len(editor.shared_start(prompt, ids, record.subject))
        check = RelationCheck(old.shape[1], layer, editor.config.relation_threshold, editor.config.relation_margin)
        check.calibrate(center)
        check.add_pending(new[:1], new[1:])
        check.seal(0)
        asked = [(p.prompt, True) for p in record.locality if p.group in SHOULD_SHUT]
        asked += [(p.prompt, False) for p in record.portability if p.group == "Subject_Aliasing"]
        asked += [(q, False) for q in record.rephrases]
        if not asked:
            continue
        queries = whole(editor, [p for p, _ in asked], layer)
        before = fp16_shut(check, old[:1], old[1:], queries)
        one = torch.ones(len(asked), 1, dtype=torch.bool)  # a one-token prompt mask; one open block
        after = ~check.shut(queries[:, None], one, one)[:, 0]
        counts["decisions"] += len(asked)
        counts["differ"] += int((before != after).sum())
        for (_, should_shut), b, a in zip(asked, before.tolist(), after.tolist()):
            tally = counts["shut_should" if should_shut else "open_should"]
            tally[0] += 1
            tally[1] += int(b)
            tally[2] += int(a)
    report = {
        "command": "python bench/relation_states_check.py " + " ".join(sys.argv[1:]),
        "model": loaded.identity,
        "records": len(records),
        "probe_tokens_per_edit_whole": round(tokens_whole / len(records), 1),
        "probe_tokens_per_edit_after_starts": round(tokens_after_starts / len(records), 1),
        "probe_seconds_per_edit_whole_median": round(statistics.median(seconds_whole), 4),
        "probe_seconds_per_edit_shared_median": round(statistics.median(seconds_shared), 4),
        "shared_over_whole_median": round(statistics.median(s / w for s, w in zip(seconds_shared, seconds_whole)), 3),
        "states_max_one_minus_cos": worst,
        "decisions": counts["decisions"],
        "decisions_differ": counts["differ"],
        "relation_specificity_prompts": counts["shut_should"][0],
        "relation_specificity_shut_fp16_whole": counts["shut_should"][1],
        "relation_specificity_shut_int8_shared": counts["shut_should"][2],
        "edit_relation_prompts": counts["open_should"][0],
        "edit_relation_shut_fp16_whole": counts["open_should"][1],
        "edit_relation_shut_int8_shared": counts["open_should"][2],
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
