"""Which blocks a run's prompts open, with and without the levers that let a subject's other names
in: keys for its other spellings (`route_name_variants`, baft_core/names.py), keys that need one
of their earlier subject tokens rather than all (`route_prefix_needed`), spellings compared as
token classes (`route_spelling_normalised`, baft_core/spelling.py), and a key's earlier tokens in
the matched word needed in place (`route_prefix_word`, baft_core/routing.py).

python bench/alias_routing.py --data ../shared/data/knowedit/wiki_counterfact_dev.json --format knowedit --edits 714

Routing is decided below the first edited layer, on the unedited model's states, so it does not
depend on what the blocks learn: each edit here leaves what a continual edit leaves for routing
(its route keys, its relation check's states, sealed into a block of its own) without training
its block, and the decisions are those of a full run of the same edits. For each setting, over
the edits in order (the service's own negatives): the share of the records' portability prompts
(by group: KnowEdit's Subject_Aliasing are the subject's other names) and rephrases that open
their own edit's block, and of their locality prompts (by group) that open any block, after the
relation check; for locality prompts of one group, also the share among those that name no
edited subject ("other subjects": any block they open is a leak). Each call replaces its set's
entry (the same data and edits) in `--out`.
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
from baft_core.metrics import RoutingInputs, opened_blocks, routing_inputs  # noqa: E402
from baft_core.models import BUNDLED, load_model  # noqa: E402


def leave_routes(editor: Editor, records: list[EditRequest]) -> None:
    """Each record as a continual edit leaves it for routing, in order, each sealed into a block
    of its own: its route keys and its relation check's states, standardised as the trainer
    standardises a fresh adapter's."""
    interventions = editor.interventions
    router, relations = interventions.router, interventions.relations
    editor.trainer.calibrate(interventions)
    for block, record in enumerate(records):
        request = EditRequest(record.prompt, record.target, record.subject)
        keys = editor.route_keys.states([request])
        editor.route_keys.add(interventions, keys._replace(owners=keys.owners + block))
        router.seal(block)
        editor.add_relation_states(interventions, [request])
        relations.seal(block)
        editor.history.append(request)


def prompt_groups(records: list[EditRequest]) -> dict[str, list[tuple[int, str]]]:
    """Per group ("por/<group> opens own", "loc/<group> opens any", "rephrase opens own"): each
    prompt with the index of its record."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for i, record in enumerate(records):
        for probe in record.portability:
            groups.setdefault(f"por/{probe.group or 'all'} opens own", []).append((i, probe.prompt))
        for probe in record.locality:
            groups.setdefault(f"loc/{probe.group or 'all'} opens any", []).append((i, probe.prompt))
        for rephrase in record.rephrases:
            groups.setdefault("rephrase opens own", []).append((i, rephrase))
    return groups


def names_no_subject(prompts: list[str], subjects: set[str]) -> torch.Tensor:
    """[prompts]: whether a prompt names none of `subjects`."""
    return torch.tensor([not any(s in p for s in subjects) for p in prompts])


def shares(
    editor: Editor,
    groups: dict[str, list[tuple[int, str]]],
    held: dict[str, list[RoutingInputs]],
    others: dict[str, torch.Tensor],
) -> dict[str, float | int]:
    """Per prompt group: the share that opens its own edit's block (portability, rephrases) or
    any block (locality; also among those that name no edited subject), and how many prompts."""
    blocks = len(editor.history)  # a block per edit, each with keys
    out: dict[str, float | int] = {}
    for name, pairs in sorted(groups.items()):
        opened = opened_blocks(editor, held[name], blocks)
        if name.endswith("opens own"):
            hit = opened[torch.arange(len(pairs)), torch.tensor([i for i, _ in pairs])]
        else:
            hit = opened.any(1)
            if name in others:
                out[name.replace(" opens any", " on other subjects opens any")] = round(hit[others[name]].float().mean().item(), 4)
                out[name.replace(" opens any", " on other subjects prompts")] = int(others[name].sum())
        out[name] = round(hit.float().mean().item(), 4)
        out[name.rsplit(" opens", 1)[0] + " prompts"] = len(pairs)
    return out


def main() -> None:
    parser = set_parser(__doc__.split("\n")[0], "alias_routing.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--with-variants-only", action="store_true",
        help="only the settings with keys for other spellings: one pass over the edits, not two",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = set_records(args)
    loaded = load_model(BUNDLED, device="cpu", dtype="auto")
    groups = prompt_groups(records)
    subjects = {r.subject for r in records if r.subject}
    settings = {}
    for variants in (True,) if args.with_variants_only else (True, False):
        editor = Editor(loaded.model, loaded.tokenizer, EditConfig(route_name_variants=variants), None)
        try:
            editor.prepare()
            leave_routes(editor, records)
            held = {name: routing_inputs(editor, [p for _, p in pairs]) for name, pairs in groups.items()}
            # Locality prompts of a group that mostly names other subjects (CounterFact's).
            others = {
                name: names_no_subject([p for _, p in pairs], subjects)
                for name, pairs in groups.items()
                if name.startswith("loc/") and not name.startswith(("loc/Relation", "loc/Forgetfulness"))
            }
            router = editor.interventions.router
            # Each lever alone and all together: with the variants, the others off one at a time;
            # without them, all off (the routing before any of them).
            measured = [(1, True, True), (1, True, False), (None, True, False)]
            measured += [(1, False, False)] if variants else [(None, False, False)]
            for needed, normalised, in_word in measured:
                router.prefix_needed, router.spelling_normalised, router.prefix_word = needed, normalised, in_word
                setting = f"route_name_variants={str(variants).lower()} route_prefix_needed={needed or 'null'}"
                setting += "" if normalised else " route_spelling_normalised=false"
                setting += "" if in_word else " route_prefix_word=false"
                settings[setting] = {
                    "route_keys_per_edit": round(len(router.keys) / len(records), 3),
                    "route_bytes_per_edit": round(router.num_bytes / len(records), 1),
                    **shares(editor, groups, held, others),
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
