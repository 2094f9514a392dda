"""Speed-up of the cached-prefix training step over a plain full forward + backward, measured
in one run, interleaved, on the same edits (the ratio is robust to a noisy shared machine).

    .venv/bin/python bench/prefix_cache_speed.py --out bench/results/prefix_cache_speedup.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from baft_core import EditConfig, Editor, load_edits, load_model
from baft_core.attach import final_logits
from baft_core.encoding import teacher_forced
from baft_core.prefix_cache import CachedBatch


def full_step(editor: Editor, examples) -> None:
    """The straightforward step: the whole prompt + answer through every layer."""
    tf = teacher_forced(examples, editor.config.prompt_positions, editor.pad_id)
    with editor.attachment.intervene(tf.intervene):
        hidden = editor.model.base_model(input_ids=tf.input_ids, attention_mask=tf.attention_mask).last_hidden_state
    keep = tf.targets != -100
    loss = torch.nn.functional.cross_entropy(final_logits(editor.model, hidden[keep]).float(), tf.targets[keep])
    loss.backward()


def cached_step(batch: CachedBatch) -> None:
    logits = batch.forward().logits
    torch.nn.functional.cross_entropy(logits.float(), batch.targets).backward()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/zsre/zsre_eval_portability_dev.json")
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model()
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig(), [])
    requests = load_edits(args.data, "zsre", limit=args.edits)
    full_times, cached_times, build_times = [], [], []
    for request in requests:
        examples = [editor.encode(request.prompt, request.target)]
        start = time.perf_counter()
        batch = CachedBatch(editor.model, editor.attachment, editor.interventions, examples,
                            editor.config.prompt_positions, editor.pad_id)
        build_times.append(time.perf_counter() - start)
        for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
            start = time.perf_counter()
            full_step(editor, examples)
            full_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            cached_step(batch)
            cached_times.append(time.perf_counter() - start)
    full, cached = statistics.median(full_times), statistics.median(cached_times)
    result = {
        "command": "python bench/prefix_cache_speed.py " + " ".join(sys.argv[1:]),
        "model": loaded.identity,
        "dtype": loaded.precision,
        "layers": editor.layers,
        "edits": len(requests),
        "full_step_median_s": full,
        "cached_step_median_s": cached,
        "speedup": full / cached,
        "cache_build_median_s": statistics.median(build_times),
        "threads": args.threads,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
