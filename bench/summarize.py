"""Writes bench/results/README.md from the results themselves: one table of the main runs
(bench/results/*/), one of the ablation runs (bench/results/ablation/*/), and one sentence per
speed measurement. A run's lever is read from its config (what differs from today's
`EditConfig` defaults) and its command from its summary.json; NOTES says where a run came from
older code.

    .venv/bin/python bench/summarize.py
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from baft_core.config import EditConfig

RESULTS = Path(__file__).parent / "results"
COLUMNS = ("rel", "gen", "loc", "por", "rep")
IGNORED = {"seed", "method"}  # named by their own columns

# Runs not made by today's code with the recorded command, and what differed. A run not named
# here was made by the code of its date with the defaults of then plus its --set overrides.
NOTES = {
    **{
        f"ablation/{name}": "`sealed_gates=true` was the default for a while: the recorded command lacks "
        "`--set sealed_gates=true` and names the main folder it was moved from"
        for name in (
            "knowedit-counterfact-continual-714-baft-gated",
            "knowedit-recent-continual-285-baft-gated",
            "same-subject-continual-200-baft-gated",
        )
    },
    **{
        f"ablation/{name}": "today's defaults on a host without bf16 arithmetic (fp16 weights): the pair of "
        "the `relation_threshold` rows, made there before `route_spelling` (no edit of this set spells "
        "its subject, so the same run)"
        for name in ("counterfact-continual-100-fp16", "knowedit-recent-continual-285-fp16")
    },
    "ablation/knowedit-counterfact-continual-714-no-spelling": "made before `route_spelling` existed, as "
    "`ablation/knowedit-counterfact-continual-714-fp16` (the same code path as `--set route_spelling=false` "
    "with the keys for other names off), fp16 weights: the pair of `-no-alias-keys` and of the "
    "`relation_layer` row",
    "ablation/knowedit-counterfact-continual-714-no-alias-keys": "the main run before `route_prefix_needed`, "
    "`route_name_variants` and `route_spelling_normalised` existed (the same code path as `--set` with the "
    "three off), fp16 weights: the pair of `-no-spelling` and of `-id-spelling`",
    "ablation/knowedit-counterfact-continual-714-id-spelling": "made before `route_spelling_normalised` "
    "existed (the same code path as `--set route_spelling_normalised=false`): the pair of the main run",
    "ablation/knowedit-counterfact-continual-714-relation-layer4": "made before `route_spelling` existed "
    "(the same code path as `--set route_spelling=false` with the keys for other names off)",
    **{
        f"ablation/{name}": "the main run before `route_prefix_word` existed (the same code path as "
        "`--set route_prefix_word=false`), on another host: the pair of the main run"
        for name in ("knowedit-counterfact-continual-714-prefix-word-false", "counterfact-continual-1000-prefix-word-false")
    },
    "ablation/knowedit-counterfact-continual-714-other-name-ratio1": "the main run before "
    "`relation_other_name_ratio` existed (the same code path as `--set relation_other_name_ratio=1`): the "
    "pair of the main run",
}


def _prefix_cache_sentence(s: dict) -> str:
    return (
        f"Cached-prefix training step vs a plain full forward + backward, interleaved in one run "
        f"(`{s['command']}`): {s['full_step_median_s'] * 1000:.1f} ms vs "
        f"{s['cached_step_median_s'] * 1000:.1f} ms per step, **{s['speedup']:.2f}x** "
        f"(layers {s['layers']}, {s['dtype']})."
    )


def _output_head_sentence(s: dict) -> str:
    return (
        f"Next-token logits in decoding (`{s['command']}`), the head on a 3-D slice as "
        "`logits_to_keep=1` does it against 2-D rows, frozen model, interleaved: "
        + "; ".join(
            f"batch {r['batch']}: {r['sliced_3d_median_ms']:.1f} ms vs {r['rows_2d_median_ms']:.1f} ms "
            f"(**{r['speedup']:.1f}x**)"
            for r in s["results"]
        )
        + "."
    )


def _paired_sentence(s: dict, title: str) -> str:
    """One `bench/paired_speed.py` result: its two variants (the first over the second)."""
    first, second = (v for v in s.values() if isinstance(v, dict) and "edit_median_s" in v)
    ratio = next(k for k in s if k.endswith("_edit_median_95")).removesuffix("_edit_median_95")
    caps = "".join(f", {k}={v}" for k, v in s.get("isa_limits", {}).items())
    return (
        f"{title}, {s['edits']} single {FORMAT_NAMES[s.get('format', 'zsre')]} edits alternating edit by edit in one run "
        f"({s['cpu']}, {first['dtype']}{caps}, `{s['command']}`): a whole edit {first['edit_median_s']:.3f} s vs "
        f"{second['edit_median_s']:.3f} s (median, **{s[ratio + '_edit_median']:.2f}x**, 95% interval "
        f"{s[ratio + '_edit_median_95'][0]:.2f}-{s[ratio + '_edit_median_95'][1]:.2f}; "
        f"{first['steps_mean']:.2f} vs {second['steps_mean']:.2f} steps), the mean "
        f"{first['edit_mean_s']:.3f} s vs {second['edit_mean_s']:.3f} s (**{s[ratio + '_edit_mean']:.2f}x**, "
        f"{s[ratio + '_edit_mean_95'][0]:.2f}-{s[ratio + '_edit_mean_95'][1]:.2f}), a training step "
        f"{first['training_step_median_ms']:.0f} ms vs {second['training_step_median_ms']:.0f} ms "
        f"({s[ratio + '_training_step']:.2f}x)."
    )


def _step_breakdown_sentence(s: dict) -> str:
    return (
        f"Where a training step's time goes ({s['cpu']}, {s['precision']}, {s['threads']} threads, "
        f"`{s['command']}`): the frozen products take {s['products_median_ms']:.1f} ms of a "
        f"{s['step_median_ms']:.1f} ms step (median; **{s['products_share']:.0%}** of all steps' time, "
        f"{s['product_calls_per_step']:.0f} products a step); the rest is small operations, and an "
        f"8 x 576 add takes {s['small_op_us']:.2f} us there."
    )


def _revision_sentence(s: dict) -> str:
    today, then = s["today"], s[s["revision"]]
    return (
        f"Today's editor ({s['today_commit']}) against that of {s['revision']}, each with its own defaults, "
        f"{s['edits']} single {FORMAT_NAMES[s['format']]} edits alternating edit by edit in one run ({s['cpu']}, "
        f"{today['dtype']} / {then['dtype']}, `{s['command']}`): a whole edit {today['edit_median_s']:.3f} s vs "
        f"{then['edit_median_s']:.3f} s (median, **{s['today_over_revision_edit_median']:.2f}x**, 95% interval "
        f"{s['today_over_revision_edit_median_95'][0]:.2f}-{s['today_over_revision_edit_median_95'][1]:.2f}; "
        f"{today['steps_mean']:.2f} vs {then['steps_mean']:.2f} steps), the mean {today['edit_mean_s']:.3f} s vs "
        f"{then['edit_mean_s']:.3f} s (**{s['today_over_revision_edit_mean']:.2f}x**)."
    )


# The datasets' names as the tables write them.
FORMAT_NAMES = {"zsre": "ZsRE", "counterfact": "CounterFact", "knowedit": "KnowEdit WikiData", "wikibio": "WikiBio", "mquake": "MQuAKE"}

# Each `bench/paired_speed.py` result (when present) and what its two variants are.
PAIRED_TITLES = {
    "method_speed_window.json": "BaFT against ReFT, today's defaults",
    "ablation/window_speed-epyc-avx512bf16.json": "Sealed blocks within their answers' windows (the default) against blocks that act on every generated token (`answer_window=false`)",
    "weights_speed.json": "fp16 weights with fp32 arithmetic (FBGEMM) against fp32, older code",
    "relations_speed.json": "The relation check (the default) against none (`relation_threshold=0`)",
    "ablation/relations_speed-layer4.json": "The relation check read at the routing layer (`relation_layer=4`) against none",
    "names_speed.json": "The keys for a subject's other names (the defaults) against none "
    "(`route_prefix_needed=null route_name_variants=false route_spelling_normalised=false`)",
}
SPEED_SENTENCES = {
    "prefix_cache_speedup.json": _prefix_cache_sentence,
    "output_head_speed.json": _output_head_sentence,
    "revision_speed.json": _revision_sentence,
    **{name: partial(_paired_sentence, title=title) for name, title in PAIRED_TITLES.items()},
}


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def lever(config: dict, method: str, send_locality: bool = False) -> str:
    """What the run's config sets otherwise than today's defaults (fields since removed aside),
    and whether each edit came with its record's locality prompts."""
    defaults = EditConfig(method=method).to_dict()
    if "sealed_rank" not in config and config.get("block_edits") and not config.get("sealed_gates"):
        config = {**config, "sealed_rank": None}  # runs from before `sealed_rank` sealed every basis
    if "route_tokens" not in config and config.get("route_threshold"):
        config = {**config, "route_tokens": 1}  # before `route_tokens` a key read one token
    if "relation_threshold" not in config and config.get("route_threshold"):
        config = {**config, "relation_threshold": 0.0}  # before the relation check
    if "route_prefix_gap" not in config and config.get("route_threshold"):
        config = {**config, "route_prefix_gap": 0}  # before the gap a key's tokens stood in a row
    if "route_spelling" not in config and config.get("route_threshold"):
        config = {**config, "route_spelling": False}  # before spelled keys
    if "route_prefix_needed" not in config and config.get("route_threshold"):
        # before the keys let a subject's other names in
        config = {**config, "route_prefix_needed": None, "route_name_variants": False}
    if "route_spelling_normalised" not in config and config.get("route_threshold"):
        config = {**config, "route_spelling_normalised": False}  # before spellings compared token classes
    if "route_prefix_word" not in config and config.get("route_threshold"):
        config = {**config, "route_prefix_word": False}  # before a key's own word was needed in place
    if "relation_other_name_ratio" not in config and config.get("relation_threshold"):
        config = {**config, "relation_other_name_ratio": 1.0}  # before other names had a rule of their own
    changed = [
        f"{key}={json.dumps(value)}" if key != "route_contexts" else f"{key}: {len(value)}"
        for key, value in config.items()
        if key in defaults and key not in IGNORED and value != defaults[key]
    ]
    changed += ["--send-locality"] if send_locality else []
    return ", ".join(f"`{c}`" for c in changed) or "today's defaults"


def row(folder: str, s: dict) -> str:
    data = Path(s["data"][0]).stem
    unrelated = s.get("unrelated", "heldout") + (f" ({s['unrelated_count']})" if "unrelated_count" in s else "")
    metrics = " | ".join(fmt(s.get(c)) for c in COLUMNS)
    note = NOTES.get(folder, "")
    routing = s.get("routing") or {}
    routed = (
        f"{routing['rephrase_opens_own']:.2f} / {routing['locality_opens_any']:.2f}"
        if "rephrase_opens_own" in routing and "locality_opens_any" in routing
        else "-"
    )
    return (
        f"| [{folder}]({folder}/report.md) | {data} | {s['method']} {s['mode']} {s['edits']} "
        f"| {lever(s['config'], s['method'], s.get('send_locality', False))} | {metrics} | {routed} | {s['sec_per_edit_median']:.3f} | {s['steps_mean']:.2f} "
        f"| {s.get('dtype') or '?'}, {s['threads']} thr, {s.get('date', '?')} | {unrelated} | {note} | `{s['command']}` |"
    )


def table(folders: list[Path]) -> list[str]:
    lines = [
        "| run | data | method, mode, edits | lever (config against today's defaults) | "
        + " | ".join(COLUMNS) + " | routing | s/edit | steps | dtype, threads, date | negatives | note | command |",
        "|" + "---|" * (len(COLUMNS) + 11),
    ]
    for path in folders:
        folder = str(path.relative_to(RESULTS))
        lines.append(row(folder, json.loads((path / "summary.json").read_text())))
    return lines


def main() -> None:
    main_runs = sorted(p.parent for p in RESULTS.glob("*/summary.json"))
    ablation_runs = sorted(p.parent for p in RESULTS.glob("ablation/*/summary.json"))
    lines = [
        "# Benchmark results",
        "",
        "Written by `bench/summarize.py` from the files below; the tables and what they show:",
        "[docs/benchmarks.md](../../docs/benchmarks.md). The bundled SmolLM2-135M-Instruct on CPU cores; every",
        "edit of a continual run is evaluated on the final model. `bench/run.sh` regenerates every run",
        "with today's code. `rep`: the new answer said again in the 16 greedy tokens after it.",
        "`routing`: rephrases that open their own edit's block / locality prompts that open any block.",
        "`negatives`: the prompts the editor learnt to leave alone (`--unrelated`; their number where",
        "the run recorded it). Times are the host's of that day (`threads` 1: two runs side by side),",
        "comparable only within one paired run. `route_spelling=false`: made before spelled route keys;",
        "where no subject of the run ends like an earlier one's (ZsRE and CounterFact 100, WikiData_recent",
        "285: `spelled_edits.json` counts them) that is the same run as today's defaults.",
        "`route_prefix_needed=null`, `route_name_variants=false`, `route_spelling_normalised=false`: made before",
        "the keys that let a subject's other names in; what they change in each set's routing is in",
        "`alias_routing.json`. `route_prefix_word=false`: made before a key's earlier tokens in the",
        "matched word were needed in place (`alias_routing.json` too). `relation_other_name_ratio=1.0`: made",
        "before the relation check let a prompt on another name of the subject through unless a probe was",
        "clearly nearer; only prompts that do not spell an edited subject can differ.",
        "",
        "## Main runs",
        "",
        *table(main_runs),
        "",
        "## Ablation",
        "",
        *table(ablation_runs),
        "",
        "## Speed",
    ]
    for name, sentence in SPEED_SENTENCES.items():  # one sentence a speed result, when present
        path = RESULTS / name
        if path.is_file():
            lines += ["", sentence(json.loads(path.read_text()))]
    baseline = RESULTS / "repeat_baseline.json"
    if baseline.is_file():
        b = json.loads(baseline.read_text())
        lines += [
            "",
            f"`rep` of the unedited model fed prompt + new target (`{b['command']}`, first 100 records): "
            f"ZsRE {b['zsre_new_target']:.2f}, CounterFact {b['counterfact_new_target']:.2f}.",
        ]
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
