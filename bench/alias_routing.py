"""Which blocks a run's prompts open, with and without the levers that let a subject's other names
in: keys for its other spellings (`route_name_variants`, baft_core/names.py), keys that need one
of their earlier subject tokens rather than all (`route_prefix_needed`), and spellings compared
as token classes (`route_spelling_normalised`, baft_core/spelling.py).

python bench/alias_routing.py --data ../shared/data/knowedit/wiki_counterfact_dev.json --format knowedit --edits 714

Routing is decided below the first edited layer, on the unedited model's states, so it does not
depend on what the blocks learn: each edit here takes one training step, and the decisions are
those of a full run of the same edits. For each setting, over the edits in order (continual, the
service's own negatives): the share of the records' portability prompts (by group: KnowEdit's
Subject_Aliasing are the subject's other names) and rephrases that open their own edit's block,
and of their locality prompts (by group) that open any block, after the relation check. Each
call replaces its set's entry (the same data and edits) in `--out`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from run_scores import replace_entry, set_parser, set_records  # noqa: E402

from baft_core.config import EditConfig  # noqa: E402
from baft_core.data import EditRequest  # noqa: E402
from baft_core.editor import Editor  # noqa: E402
from baft_core.metrics import open_blocks  # noqa: E402
from baft_core.models import BUNDLED, load_model  # noqa: E402


def shares(editor: Editor, records: list[EditRequest]) -> dict[str, float | int]:
    """Per prompt group: the share that opens its own edit's block (portability, rephrases) or
    any block (locality), and how many prompts."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for i, record in enumerate(records):
        for probe in record.portability:
            groups.setdefault(f"por/{probe.group or 'all'} opens own", []).append((i, probe.prompt))
        for probe in record.locality:
            groups.setdefault(f"loc/{probe.group or 'all'} opens any", []).append((i, probe.prompt))
        for rephrase in record.rephrases:
            groups.setdefault("rephrase opens own", []).append((i, rephrase))
    out: dict[str, float | int] = {}
    for name, pairs in sorted(groups.items()):
        opened = open_blocks(editor, [p for _, p in pairs])
        if name.endswith("opens own"):
            hit = opened[torch.arange(len(pairs)), torch.tensor([i for i, _ in pairs])]
        else:
            hit = opened.any(1)
        out[name] = round(hit.float().mean().item(), 4)
        out[name.rsplit(" opens", 1)[0] + " prompts"] = len(pairs)
    return out


def main() -> None:
    parser = set_parser(__doc__.split("\n")[0], "alias_routing.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = set_records(args)
    loaded = load_model(BUNDLED, device="cpu", dtype="auto")
    settings = {}
    for variants in (True, False):
        config = EditConfig(max_steps=1, route_name_variants=variants)
        editor = Editor(loaded.model, loaded.tokenizer, config, None)
        try:
            for record in records:
                editor.edit(EditRequest(record.prompt, record.target, record.subject))
            router = editor.interventions.router
            # Each lever alone and all together: with the variants, the token classes off too;
            # without them, all three off (the routing before any of them).
            measured = [(1, True), (None, True), (1, False) if variants else (None, False)]
            for needed, normalised in measured:
                router.prefix_needed, router.spelling_normalised = needed, normalised
                setting = f"route_name_variants={str(variants).lower()} route_prefix_needed={needed or 'null'}"
                settings[setting + ("" if normalised else " route_spelling_normalised=false")] = {
                    "route_keys_per_edit": round(len(router.keys) / len(records), 3),
                    "route_bytes_per_edit": round(router.num_bytes / len(records), 1),
                    **shares(editor, records),
                }
        finally:
            editor.attachment.detach()
    entry = {
        "command": "python " + " ".join(sys.argv),
        "data": args.data,
        "edits": len(records),
        "dtype": loaded.precision,
        "settings": settings,
    }
    replace_entry(args.out, entry)


if __name__ == "__main__":
    main()
