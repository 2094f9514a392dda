"""Start-up load of the current version after N edits, on a synthetic history.

    .venv/bin/python bench/startup_load.py [--edits 10000] [--root DIR] [--keep]

Builds the checkpoints a service writes for N continual edits with the default config on the
bundled model (a sealed block of `sealed_rank` directions at 3 layers per edit, six route keys,
the relation check's states of 57 probes; one version per edit, each extending the one before),
through app.store.CheckpointStore with its fsyncs, but with random sealed blocks instead of
trained ones (training 10,000 edits takes hours;
the sizes and the files are the same), and CounterFact requests as the history. Then, in a fresh
process, times CheckpointStore.load of the last version and Editor.load_state, as a starting
service does (the files are in the page cache: they were just written). Writes
bench/results/service/startup-load-N.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from app.store import CheckpointStore  # noqa: E402
from baft_core import EditConfig, Editor, EditRequest, load_model  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from routing_cost import KEYS_PER_EDIT, earlier_subject_tokens  # noqa: E402

from baft_core.relations import quantized  # noqa: E402

PROBES_PER_EDIT = 57  # the relation check's probes of an average CounterFact edit

DATA = Path(os.environ.get("BAFT_DATA", "/work/shared/data")) / "counterfact" / "counterfact_train.json"
OUT = REPO / "bench" / "results" / "service"
MODELS = os.environ.get("MODELS_DIR", str(REPO / "var" / "models"))


def requests(count: int) -> list[EditRequest]:
    records = json.loads(DATA.read_text())
    return [
        EditRequest(
            r["prompt"], r["target_new"], subject=r["subject"], rephrases=[r["rephrase_prompt"]],
            locality=[{"prompt": r["locality_prompt"], "answer": r["locality_ground_truth"]}],
        )
        for r in (records[i % len(records)] for i in range(count))
    ]


def build(root: Path, edits: int) -> dict:
    """Saves versions 0..edits; returns the head's sha256 and the time the saves took. One
    thread: with two on a loaded two-core machine each QR of a fresh block's draw waited 0.12 s."""
    torch.set_num_threads(1)
    loaded = load_model("smollm2", device="cpu", cache_dir=MODELS)
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig(), unrelated_prompts=[])
    store = CheckpointStore(root, loaded.identity, "cpu")
    template = editor.new_interventions()
    d, rank, layers = template.hidden_size, template.sealed_rank, template.layers
    generator = torch.Generator().manual_seed(0)
    # Calibrated standardisations, as after the first edit.
    for layer in layers:
        template[layer].calibrate(torch.randn(d, generator=generator), torch.rand(d, generator=generator) + 0.5)
    template.router.calibrate(torch.randn(d, generator=generator), torch.rand(d, generator=generator) + 0.5)
    rows = edits * rank
    sealed = {  # fp16, as ungated sealed rows are held
        (layer, name): (torch.randn(rows, d, generator=generator) if name.endswith(("rotation", "weight")) else torch.randn(rows, generator=generator)).half()
        for layer in layers
        for name in ("rotation", "change_weight", "change_bias")  # no gate rows: the defaults keep none
    }
    # The relation check: each edit's prompt state and its probes', int8 with a scale a row.
    relation_keys, key_scale = quantized(torch.randn(edits, d, generator=generator))
    probes, probe_scale = quantized(torch.randn(edits * PROBES_PER_EDIT, d, generator=generator))
    probe_block = torch.arange(edits).repeat_interleave(PROBES_PER_EDIT)
    keys = torch.nn.functional.normalize(torch.randn(edits * KEYS_PER_EDIT, d, generator=generator), dim=-1)
    thresholds = torch.full((len(keys),), 0.85)
    key_block = torch.arange(edits).repeat_interleave(KEYS_PER_EDIT)
    spans = torch.randint(1, 6, (edits,), generator=generator)
    tokens, prefix, earlier = earlier_subject_tokens(edits, d, template.router.subject_tokens, generator)
    unspelled = torch.full((len(keys),), -1)  # no key spells its subject (spelling.py)
    history = requests(edits)

    editor.load_state(template, [])
    parent, _ = store.save(editor)
    began, save_seconds = time.perf_counter(), []
    for i in range(1, edits + 1):
        state = template.fork()
        for (layer, name), values in sealed.items():
            setattr(state.sealed[str(layer)], name, values[: i * rank])  # views: no copy
        router = state.router
        router.keys, router.key_threshold = keys[: i * KEYS_PER_EDIT], thresholds[: i * KEYS_PER_EDIT]
        router.key_block, router.key_edit = key_block[: i * KEYS_PER_EDIT], key_block[: i * KEYS_PER_EDIT]
        router.block_span = spans[:i]
        router.key_tokens, router.key_prefix = tokens[: i * KEYS_PER_EDIT], prefix[: i * KEYS_PER_EDIT]
        router.prefixes = earlier[: 2 * i]
        router.key_spelling = unspelled[: i * KEYS_PER_EDIT]
        relations = state.relations
        relations.keys, relations.key_scale, relations.key_block = relation_keys[:i], key_scale[:i], torch.arange(i)
        p = i * PROBES_PER_EDIT
        relations.probes, relations.probe_scale, relations.probe_block = probes[:p], probe_scale[:p], probe_block[:p]
        # The fresh trainable block a seal leaves, with the standardisation carried over.
        draw = state.block_generator(i)
        state.draw_state = draw.get_state()
        fresh = state._fresh_blocks(draw)
        for layer in layers:
            fresh[str(layer)].calibrate(template[layer].gate_center, template[layer].gate_scale)
            state.by_layer[str(layer)] = fresh[str(layer)]
        state.segment_ids = store.load(parent).interventions.segment_ids[:]
        editor.load_state(state, history[:i])
        start = time.perf_counter()
        parent, _ = store.save(editor, parent)
        save_seconds.append(time.perf_counter() - start)
        if i % 1000 == 0:
            print(f"{i} versions, {time.perf_counter() - began:.0f} s", flush=True)
    first, last = save_seconds[:100], save_seconds[-100:]
    return {
        "head": parent,
        "identity": loaded.identity,
        "build_seconds": round(time.perf_counter() - began, 1),
        "save_seconds_median_first_100": round(sorted(first)[len(first) // 2], 4),
        "save_seconds_median_last_100": round(sorted(last)[len(last) // 2], 4),
    }


def load(root: Path, head: str, identity: str) -> dict:
    """What a starting service does for its current version (run in a fresh process)."""
    loaded = load_model("smollm2", device="cpu", cache_dir=MODELS)
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig(), unrelated_prompts=[])
    store = CheckpointStore(root, identity, "cpu")
    start = time.perf_counter()
    checkpoint = store.load(head)
    loaded_s = time.perf_counter() - start
    editor.load_state(checkpoint.interventions, checkpoint.history)
    return {
        "load_seconds": round(loaded_s, 2),
        "load_and_attach_seconds": round(time.perf_counter() - start, 2),
        "edits": len(checkpoint.history),
        "sealed_blocks": checkpoint.interventions.sealed_blocks,
        "adapter_values": checkpoint.interventions.num_parameters(),
    }


def sizes(root: Path) -> dict:
    segments = [p.stat().st_size for p in (root / "segments").iterdir()]
    versions = [p / "adapter.safetensors" for p in root.iterdir() if len(p.name) == 64]
    adapters = sorted(p.stat().st_size for p in versions)
    return {
        "segment_files": len(segments),
        "segment_bytes_mean": round(sum(segments) / len(segments)),
        "segments_bytes": sum(segments),
        "version_checkpoints": len(adapters),
        "adapter_bytes_median": adapters[len(adapters) // 2],
        "adapter_bytes_max": adapters[-1],
        "versions_bytes": sum(p.stat().st_size for v in versions for p in v.parent.iterdir()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=10000)
    parser.add_argument("--root", type=Path, default=None, help="where to build (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--load", nargs=2, metavar=("HEAD", "IDENTITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.load:
        print(json.dumps(load(args.root, *args.load)))
        return
    root = args.root or Path(tempfile.mkdtemp(prefix="startup-load-"))
    try:
        built = build(root, args.edits)
        runs = []
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, __file__, "--root", str(root), "--load", built["head"], built["identity"]],
                capture_output=True, text=True, check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        report = {
            "command": f"python bench/startup_load.py {' '.join(sys.argv[1:])}",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "synthetic": "random sealed blocks and route keys of the default config's sizes; CounterFact requests as the history",
            "edits": args.edits,
            "build": {k: v for k, v in built.items() if k not in ("head", "identity")},
            "sizes": sizes(root),
            "load_runs": runs,
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"startup-load-{args.edits}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
