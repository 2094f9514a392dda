"""Benchmark: apply N edits from a public dataset and measure them the EasyEdit way.

python -m baft_core.bench --data ../shared/data/zsre/zsre_eval_portability_dev.json --format zsre \
    --method baft --mode continual --edits 100 --out bench/results/zsre-baft-continual-100
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import downstream, metrics
from .config import EditConfig
from .data import FORMATS, EditRequest, load_edits
from .editor import Editor
from .models import BUNDLED, load_model
from .precision import PRECISIONS
from .unrelated import default_unrelated_prompts

try:  # an optional extra: the library and the service need neither tqdm nor matplotlib
    from tqdm import tqdm

    from .report import plot_basis_weights, plot_curve, write_report
except ImportError as err:
    raise SystemExit(f"the benchmark needs its extra ({err.name} is missing): pip install 'baft-edit[bench]'") from None

METRICS = ("rel", "gen", "loc", "por", "rel_em", "gen_em", "rep")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m baft_core.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, nargs="+", help="one or more files of the same format")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--method", default="baft", choices=["baft", "reft"])
    parser.add_argument("--mode", default="continual", choices=["single", "continual", "batched"])
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--model", default=BUNDLED, help="'smollm2' or a local HF model directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 on CUDA; on a CPU the fastest of fp32, bf16, fp16-weights (fp32 arithmetic on fp16 "
        "weights) and fp32-packed, as measured once on this host (baft_core/precision.py)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--unrelated",
        default="heldout",
        choices=["heldout", "builtin", "none"],
        help="prompts the gates learn to stay closed on: locality prompts of records that are not "
        "edited (never the evaluated ones; an error when there are none), the built-in generic pool, "
        "or none. summary.json records how many (unrelated_count)",
    )
    parser.add_argument("--unrelated-size", type=int, default=200)
    parser.add_argument(
        "--send-locality",
        action="store_true",
        help="each edit comes with its record's locality prompts, as a user may send them "
        "(`locality` in POST /edits): `loc` then measures prompts the editor was told to keep",
    )
    parser.add_argument(
        "--evaluate",
        type=int,
        default=None,
        metavar="N",
        help="continual or batched: measure a seeded uniform sample of N edits on the final model "
        "(at each point of the curve, every edit so far up to N, then the sample's share) instead of "
        "every edit; at 10,000 edits each prompt is checked against 60,000 route keys",
    )
    parser.add_argument(
        "--piqa",
        default=None,
        metavar="JSONL",
        help="also measure a downstream task on the final model, edited and unedited: PIQA's "
        "validation lines (labels beside them, `_labels.lst`; baft_core/downstream.py)",
    )
    parser.add_argument("--piqa-items", type=int, default=500, help="the first N items of --piqa")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="EditConfig overrides")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def apply_overrides(config: EditConfig, assignments: list[str]) -> EditConfig:
    """Sets `KEY=VALUE` items (VALUE in JSON) on `config` and validates it; ValueError naming
    the item otherwise."""
    for item in assignments:
        key, _, raw = item.partition("=")
        if key not in EditConfig.__dataclass_fields__:
            raise ValueError(f"--set: EditConfig has no field {key!r}")
        try:
            setattr(config, key, json.loads(raw))
        except json.JSONDecodeError:
            raise ValueError(f"--set {item!r}: the value is not JSON") from None
    config.validate()
    return config


def build_config(args: argparse.Namespace) -> EditConfig:
    try:
        return apply_overrides(EditConfig(method=args.method, seed=args.seed), args.set)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def checkpoints(n: int) -> list[int]:
    """1, 10, 100, ... up to n, and n itself: where the continual curve is measured."""
    points, k = [], 1
    while k < n:
        points.append(k)
        k *= 10
    return points + [n]


def unrelated_pool(
    kind: str, size: int, seed: int, edited: list[EditRequest], rest: list[EditRequest]
) -> list[str] | None:
    """The prompts the gates learn to stay closed on (`--unrelated`); None: the built-in pool.

    `heldout` takes the locality prompts of the records after the edited ones; when there are
    none (e.g. `--edits` equal to the data's size) the run would measure an editor without
    negatives, so it stops with SystemExit instead of falling back silently."""
    if kind == "none":
        return []
    if kind == "builtin":
        return None
    evaluated = {p.prompt for r in edited for p in r.locality}
    pool = [p.prompt for r in rest for p in r.locality if p.prompt not in evaluated]
    if not pool:
        raise SystemExit(
            f"--unrelated heldout: no negatives left: the {len(rest)} records after the {len(edited)} edited "
            "ones have no locality prompt that is not evaluated. Edit fewer records than the data holds, "
            "add a file of records to hold out, or pass --unrelated builtin (the service's own generic pool)."
        )
    random.Random(seed).shuffle(pool)
    return pool[:size]


def generation_speed(editor: Editor, prompts: list[str], tokens: int = 16, rounds: int = 3) -> dict:
    """Greedy decoding time of the edited against the unedited model, one prompt at a time,
    interleaved so that both see the same machine load. Speed ratio = unedited / edited time."""
    timings = {True: 0.0, False: 0.0}
    for _ in range(rounds):
        for prompt in prompts:
            for edited in (False, True):
                start = time.perf_counter()
                editor.generate([prompt], max_new_tokens=tokens, edited=edited, stop_at_eos=False)
                timings[edited] += time.perf_counter() - start
    return {
        "generation_sec_unedited": timings[False],
        "generation_sec_edited": timings[True],
        "generation_speed_ratio": timings[False] / timings[True],
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    records = [r for path in args.data for r in load_edits(path, args.format, skip_invalid=True)]
    if args.edits > len(records):
        raise SystemExit(f"--edits {args.edits}: the data has only {len(records)} records")
    edits, rest = records[: args.edits], records[args.edits :]
    if args.evaluate is not None and (args.mode == "single" or args.evaluate < 1):
        raise SystemExit("--evaluate N: N >= 1, with --mode continual or batched")
    every = args.evaluate is None or args.evaluate >= len(edits)
    measured = list(range(len(edits))) if every else sorted(random.Random(args.seed).sample(range(len(edits)), args.evaluate))
    config = build_config(args)
    unrelated = unrelated_pool(args.unrelated, args.unrelated_size, args.seed, edits, rest)
    negatives = len(default_unrelated_prompts()) if unrelated is None else len(unrelated)
    print(f"unrelated prompts ({args.unrelated}): {negatives}", file=sys.stderr)
    piqa_items = downstream.load_piqa(args.piqa, limit=args.piqa_items) if args.piqa else None  # read before hours of edits
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    editor = Editor(loaded.model, loaded.tokenizer, config, unrelated)
    # Unedited answers of the locality prompts of every edit the curve or the final model measures.
    needed = sorted(set(measured) | set(range(min(len(edits), args.evaluate or len(edits)))))
    baseline = dict(zip(needed, metrics.locality_baseline(editor, [edits[i] for i in needed])))
    editor.prepare()  # what the first edit would compute once, outside the per-edit timings

    # The editor sees what a user of the service sends (prompt, target, subject, and with
    # --send-locality the prompts to keep); the dataset's rephrases and other probes are only for
    # measuring.
    requests = [EditRequest(r.prompt, r.target, r.subject, locality=r.locality if args.send_locality else []) for r in edits]
    rows: list[dict] = [{} for _ in edits]
    curve: list[dict] = []
    progress = tqdm(total=len(edits), desc=f"{args.method} {args.mode}", unit="edit", file=sys.stderr)
    if args.mode == "single":
        for i, request in enumerate(edits):
            editor.reset()
            result = editor.edit(requests[i])
            rows[i] = {"result": result, "metrics": metrics.evaluate(editor, [request], [baseline[i]])[0]}
            progress.update(1)
    else:
        size = 1 if args.mode == "continual" else args.batch_size
        marks = set(checkpoints(len(edits)))
        done = 0
        while done < len(edits):
            group = requests[done : done + size]
            result = editor.edit(group[0]) if size == 1 else editor.edit_batch(group)
            for j in range(len(group)):
                rows[done + j] = {"result": result, "batch": done // size}
            done += len(group)
            progress.update(len(group))
            reached = [m for m in marks if done - len(group) < m <= done]
            if reached and done < len(edits):
                so_far = list(range(done)) if every or done <= args.evaluate else [i for i in measured if i < done]
                partial = metrics.summarize(metrics.evaluate(editor, [edits[i] for i in so_far], [baseline[i] for i in so_far]))
                curve.append({"edits": done, "evaluated": len(so_far), **partial})
        final = metrics.evaluate(editor, [edits[i] for i in measured], [baseline[i] for i in measured])
        for i, values in zip(measured, final):
            rows[i]["metrics"] = values
        curve.append({"edits": len(edits), "evaluated": len(measured), **metrics.summarize(final)})
    progress.close()
    piqa = downstream.choice_locality(editor, piqa_items) if piqa_items else None
    unrelated_prompts = [p.prompt for r in edits[:20] for p in r.locality[:1]]
    speed = generation_speed(editor, unrelated_prompts or [r.prompt for r in edits[:20]])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = [r["result"].seconds for r in rows]
    if args.mode == "batched":  # one training run per batch: time per edit is its share
        seconds = [r["result"].seconds / args.batch_size for r in rows]
    lines = []
    for i, (request, row) in enumerate(zip(edits, rows)):
        result = row["result"]
        lines.append(
            json.dumps(
                {
                    "index": i,
                    "prompt": request.prompt,
                    "target": request.target,
                    "seconds": round(seconds[i], 4),
                    "steps": result.steps,
                    "loss": significant(result.loss),
                    "losses": {name: significant(value) for name, value in result.losses.items()},
                    **row.get("metrics", {}),
                }
            )
        )
    # Losses to four significant digits (their full float spelling was a fifth of the
    # compressed bytes); compressed (a tenth of the size), without a timestamp: a rerun with the same figures
    # writes the same bytes.
    (out / "edits.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    summary: dict[str, Any] = {  # summary.json
        "command": "python -m baft_core.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "method": args.method,
        "mode": args.mode,
        "edits": len(edits),
        "model": loaded.identity,
        "dtype": loaded.precision,
        "cpu": torch.cpu.get_capabilities().get("cpu_name"),
        "data": [str(p) for p in args.data],
        "unrelated": args.unrelated,
        "unrelated_count": negatives,  # the negatives the editor had (prompts)
        "send_locality": args.send_locality,
        "evaluated": len(measured),  # edits measured on the final model (--evaluate)
        **metrics.summarize([r["metrics"] for r in rows if "metrics" in r]),
        "sec_per_edit_median": statistics.median(seconds),
        "sec_per_edit_first100_median": statistics.median(seconds[:100]),
        "sec_per_edit_last100_median": statistics.median(seconds[-100:]),
        "steps_mean": statistics.mean(r["result"].steps for r in rows),
        "params": editor.interventions.num_parameters(),
        "sealed_blocks": editor.interventions.sealed_blocks,
        "adapter_bytes_per_edit": editor.interventions.num_bytes() / max(1, len(editor.history)),
        **speed,
        "piqa": piqa,
        "config": config.to_dict(),
        "curve": curve,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
    }
    if config.method == "baft":
        summary["routing"] = metrics.routing_separation(editor, edits, measured) if args.mode == "continual" else None
        summary["gates_open"] = plot_basis_weights(editor, edits, out / "basis_weights.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if curve:
        plot_curve(curve, out / "curve.png", f"{args.method} {args.mode}")
    write_report(summary, out / "report.md")
    return summary


def main(argv: list[str] | None = None) -> None:
    summary = run(parse_args(argv))
    keys = METRICS + ("sec_per_edit_median", "steps_mean", "generation_speed_ratio")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
