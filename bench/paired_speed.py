"""Two variants of the editor timed in one run, edit by edit, so that both see the same machine
load (on a shared two-core host the speed drifts by 15% between back-to-back runs):

- `--vary dtype`: the bundled model in bf16 against fp32, BaFT (the defaults);
- `--vary method`: BaFT against ReFT (the time ratio of a single edit), in the dtype `auto` picks;
- `--vary weights`: fp32 arithmetic on fp16 weights (FBGEMM) against plain fp32, BaFT;
- `--vary weights-bf16`: the same against bf16 (on a CPU with bf16 arithmetic: is `auto` right?);
- `--vary packed-fp32`: fp32 weights packed for oneDNN against fp16 weights (FBGEMM);
- `--vary fp16-threads`: fp16 weights through FBGEMM on all threads (`Fp16Linear`) against
  torch's older FBGEMM op, which runs on one (the same packing and the same results);
- `--vary window`: BaFT's sealed blocks within their answers' windows (the defaults) against
  blocks that act on every generated token, trained with the continuation term;
- `--vary gates`: routed blocks with gates that tell the subject's relations apart
  (`sealed_gates=true`: same-subject probes, the gate polish, the fit under the cutoff) against
  the defaults' routed blocks at full weight, trained without gates;
- `--vary relations`: the defaults (each edit's probes put to the model for the relation check,
  relations.py) against the same without the check (`relation_threshold=0`);
- `--vary names`: the defaults (keys for the subject's other spellings, names.py; one earlier
  token of a key suffices; spellings compared as token classes) against the same without them.

Single edits (ZsRE unless `--format` says otherwise), each on a fresh adapter, the unrelated pool as the bench's `--unrelated
heldout`. Also one training step (forward and backward) on the same batch. Records the CPU's
bf16 features and the precision `auto` measured as fastest here (baft_core/precision.py). The
ratios come with 95% intervals from a paired bootstrap over the edits (both variants made the
same edits), for the median and the mean time: steps are few and whole, so one or two edits
more or less move the median.

    .venv/bin/python bench/paired_speed.py --vary method --out bench/results/method_speed.json
    .venv/bin/python bench/paired_speed.py --vary method --set reft:rank=12 --out ...  # ReFT at the paper's rank
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from baft_core import EditConfig, Editor, load_model
from baft_core.bench import apply_overrides, unrelated_pool
from baft_core.data import FORMATS, load_edits
from baft_core.models import cpu_precision_record
from baft_core.objective import target_cross_entropy
from baft_core.packed_linears import Fp16Linear, pack_linears
from baft_core.precision import FP16_WEIGHTS, ISA_LIMITS  # ISA_LIMITS: recorded with the result
from baft_core.prefix_cache import CachedBatch

# --vary: the ratio's name, then each variant's name and (dtype, method[, its own --set items]);
# the first over the second
VARIES = {
    "dtype": ("bf16_over_fp32", {"bfloat16": ("bfloat16", "baft"), "float32": ("float32", "baft")}),
    "method": ("baft_over_reft", {"baft": ("auto", "baft"), "reft": ("auto", "reft")}),
    "weights": ("fp16_weights_over_fp32", {"fp16-weights": ("fp16-weights", "baft"), "float32": ("float32", "baft")}),
    "weights-bf16": ("fp16_weights_over_bf16", {"fp16-weights": ("fp16-weights", "baft"), "bfloat16": ("bfloat16", "baft")}),
    "packed-fp32": ("fp32_packed_over_fp16_weights", {"fp32-packed": ("fp32-packed", "baft"), "fp16-weights": ("fp16-weights", "baft")}),
    # the one-thread variant loads in fp32 and packs its own kind (OWN_PACKING)
    "fp16-threads": ("threaded_over_one_thread", {"threaded": ("fp16-weights", "baft"), "one-thread": ("float32", "baft")}),
    "window": ("window_over_continuation", {"window": ("auto", "baft"), "continuation": ("auto", "baft", ["answer_window=false"])}),
    "gates": ("gated_over_ungated", {"gated": ("auto", "baft", ["sealed_gates=true"]), "ungated": ("auto", "baft")}),
    "relations": ("checked_over_unchecked", {"checked": ("auto", "baft"), "unchecked": ("auto", "baft", ["relation_threshold=0"])}),
    "names": ("names_over_without", {"names": ("auto", "baft"), "without": (
        "auto", "baft", ["route_prefix_needed=null", "route_name_variants=false", "route_spelling_normalised=false"])}),
}


class OneThreadFp16Linear(Fp16Linear):
    """`Fp16Linear` on torch's older FBGEMM op, which runs on the calling thread alone."""

    kernel = "FBGEMM fp16, one thread"
    pack = staticmethod(torch.fbgemm_pack_gemm_matrix_fp16)

    @staticmethod
    def product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.fbgemm_linear_fp16_weight_fp32_activation(x, packed, bias)


# Variants loaded in fp32 whose linear layers are then packed as a kind of their own: (kind, the
# precision it amounts to)
OWN_PACKING = {"one-thread": (OneThreadFp16Linear, FP16_WEIGHTS)}


def training_batch(editor: Editor, example) -> CachedBatch:
    """One edit's training batch on a fresh adapter, as the editor builds it for a block sealed
    within its answer's window (nothing after the answer)."""
    with torch.no_grad():
        return CachedBatch(
            editor.model,
            editor.attachment,
            editor.interventions,
            [example],
            editor.config.prompt_positions,
            editor.pad_id,
            continuation_tokens=None,
        )


def training_step(batch: CachedBatch) -> None:
    """A training step's forward and backward (the edit's cross-entropy)."""
    step = batch.forward()
    target_cross_entropy(step.logits, batch.targets).backward()


def training_step_seconds(editor: Editor, example) -> float:
    batch = training_batch(editor, example)
    start = time.perf_counter()
    training_step(batch)
    return time.perf_counter() - start


def bootstrap_ratio(first: list[float], second: list[float], statistic, draws: int = 2000) -> list[float]:
    """95% interval of statistic(first) / statistic(second), resampling the edits in pairs."""
    rng, n = random.Random(0), len(first)
    ratios = []
    for _ in range(draws):
        picks = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistic([first[i] for i in picks]) / statistic([second[i] for i in picks]))
    ratios.sort()
    return [round(ratios[int(0.025 * draws)], 3), round(ratios[int(0.975 * draws) - 1], 3)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vary", required=True, choices=sorted(VARIES))
    parser.add_argument(
        "--data",
        nargs="+",
        default=["../shared/data/zsre/zsre_eval_portability_dev.json", "../shared/data/zsre/zsre_train_1k.json"],
    )
    parser.add_argument("--format", default="zsre", choices=sorted(FORMATS))
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="VARIANT:KEY=VALUE", help="EditConfig overrides of one variant")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratio_name, settings = VARIES[args.vary]
    names = tuple(settings)
    assignments = {name: list(settings[name][2]) if len(settings[name]) > 2 else [] for name in names}
    for item in args.set:
        name, _, assignment = item.partition(":")
        if name not in assignments:
            parser.error(f"--set {item!r}: expected VARIANT:KEY=VALUE with VARIANT one of {names}")
        assignments[name].append(assignment)
    configs = {}
    for name in names:  # checked before any model is loaded
        try:
            configs[name] = apply_overrides(EditConfig(method=settings[name][1]), assignments[name])
        except ValueError as error:
            parser.error(str(error))
    keys = {name: [a.partition("=")[0] for a in assignments[name]] for name in names}
    overrides = {name: {key: getattr(configs[name], key) for key in keys[name]} for name in names}
    warm = 2  # the first edits warm up the kernels
    records = [r for path in args.data for r in load_edits(path, args.format, skip_invalid=True)]
    edited, rest = records[: args.edits + warm], records[args.edits + warm :]
    unrelated = unrelated_pool("heldout", 200, 0, edited, rest)
    editors, precisions = {}, {}
    for name in names:
        loaded = load_model(dtype=settings[name][0])
        precisions[name] = loaded.precision
        if name in OWN_PACKING:
            kind, precisions[name] = OWN_PACKING[name]
            pack_linears(loaded.model, kind)
        editors[name] = Editor(loaded.model, loaded.tokenizer, configs[name], unrelated)
        editors[name].prepare()  # what the first edit would compute once, outside the timings
    edits = {name: [] for name in names}
    steps = {name: [] for name in names}
    for index, request in enumerate(edited):
        order = names if index % 2 == 0 else names[::-1]  # neither variant always runs first
        for name in order:
            editor = editors[name]
            result = editor.edit(request)
            editor.reset()
            step = training_step_seconds(editor, editor.encode(request.prompt, request.target))
            if index >= warm:
                edits[name].append((result.seconds, result.steps))
                steps[name].append(step)
    capabilities = torch.cpu.get_capabilities()
    seconds = {name: [s for s, _ in edits[name]] for name in names}
    summary = {
        name: {
            "dtype": precisions[name],
            "rank": editors[name].config.rank,
            "edit_median_s": round(statistics.median(seconds[name]), 3),
            "edit_mean_s": round(statistics.mean(seconds[name]), 3),
            "steps_mean": round(statistics.mean(n for _, n in edits[name]), 2),
            "seconds_per_step": round(sum(seconds[name]) / sum(n for _, n in edits[name]), 4),
            "training_step_median_ms": round(statistics.median(steps[name]) * 1000, 1),
        }
        for name in names
    }
    first, second = (summary[name] for name in names)
    paired = [seconds[name] for name in names]
    result = {
        "command": "python " + " ".join(sys.argv),
        "vary": args.vary,
        "format": args.format,
        "edits": args.edits,
        "threads": args.threads,
        "cpu": capabilities.get("cpu_name"),
        "cpu_bf16_features": {name: bool(capabilities.get(name)) for name in ("avx512_bf16", "amx_bf16", "bf16")},
        "isa_limits": {name: os.environ[name] for name in ISA_LIMITS if name in os.environ},
        "auto_dtype": cpu_precision_record()["choice"],
        "overrides": overrides,
        **summary,
        f"{ratio_name}_training_step": round(first["training_step_median_ms"] / second["training_step_median_ms"], 2),
        f"{ratio_name}_edit_median": round(first["edit_median_s"] / second["edit_median_s"], 2),
        f"{ratio_name}_edit_median_95": bootstrap_ratio(*paired, statistics.median),
        f"{ratio_name}_edit_mean": round(first["edit_mean_s"] / second["edit_mean_s"], 2),
        f"{ratio_name}_edit_mean_95": bootstrap_ratio(*paired, statistics.mean),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    # Each edit's time and steps under both variants, for other statistics than these.
    with open(Path(args.out).with_suffix(".edits.jsonl"), "w") as out:
        for pair in zip(*(edits[name] for name in names)):
            row = {}
            for name, (s, n) in zip(names, pair):
                row[f"{name}_seconds"], row[f"{name}_steps"] = round(s, 4), n
            out.write(json.dumps(row) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
