"""What routing costs a prompt as the number of edits grows, on a synthetic adapter.

    .venv/bin/python bench/routing_cost.py [--edits 10 1000 10000] [--prompts 16] [--repeats 3]

For each N, builds the default adapter of the bundled model after N edits, with random sealed
blocks and random unit route keys (six an edit, the defaults' threshold) instead of trained ones:
training 10,000 edits takes hours, and what routing costs depends on the number of keys, not on
their values. Random keys in 576 dimensions lie far from every prompt, so no block opens: this
measures the price every prompt pays for the keys it is checked against, not the blocks' own
work on the prompts about their subjects. Then, on one thread, alternating the unedited model and
the N-edit adapter `--repeats` times, it times greedy generation of 16 tokens for `--prompts`
CounterFact prompts one by one, and the router's decision alone (`Router.open_blocks` on each
prompt's routing-layer states). Writes bench/results/routing_cost.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from baft_core import EditConfig, Editor, load_model  # noqa: E402
from baft_core.attach import InterventionSet  # noqa: E402

DATA = Path(os.environ.get("BAFT_DATA", REPO.parent / "shared" / "data")) / "counterfact" / "counterfact_val.json"
OUT = REPO / "bench" / "results" / "routing_cost.json"
# The prompt, after each route context, and the subject alone; two rows of earlier subject tokens.
KEYS_PER_EDIT = 2 + len(EditConfig().route_contexts)


def synthetic(template: InterventionSet, edits: int, seed: int = 0) -> InterventionSet:
    """The adapter after `edits` sealed edits, with random blocks and keys of the right shapes."""
    generator = torch.Generator().manual_seed(seed)
    state = template.fork()
    d, rank = state.hidden_size, state.sealed_rank
    for layer in state.layers:
        sealed = state.sealed[str(layer)]
        sealed.rotation = torch.randn(edits * rank, d, generator=generator) * d**-0.5
        sealed.change_weight = torch.randn(edits * rank, d, generator=generator) * d**-0.5
        sealed.change_bias = torch.zeros(edits * rank)
    router = state.router
    keys = edits * KEYS_PER_EDIT
    router.keys = torch.nn.functional.normalize(torch.randn(keys, d, generator=generator), dim=-1)
    router.key_threshold = torch.full((keys,), EditConfig().route_threshold)
    router.key_block = torch.arange(edits).repeat_interleave(KEYS_PER_EDIT)
    router.key_edit = router.key_block.clone()
    router.block_span = torch.full((edits,), 4)
    router.key_tokens, router.key_prefix, router.prefixes = earlier_subject_tokens(
        edits, d, router.subject_tokens, generator
    )
    router.key_spelling = torch.full((keys,), -1)  # none spelled (spelling.py)
    return state


def earlier_subject_tokens(
    edits: int, d: int, subject_tokens: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random keys' token counts, rows of earlier tokens and those rows, laid out as an edit's
    keys are (`Router`): each reads `subject_tokens`, the subject-alone key (an edit's last) from
    the edit's row for a text's start (2i + 1), the others from its mid-text row (2i)."""
    keys = edits * KEYS_PER_EDIT
    tokens = torch.full((keys,), subject_tokens)
    prefix = 2 * torch.arange(edits).repeat_interleave(KEYS_PER_EDIT) + (torch.arange(keys) % KEYS_PER_EDIT == KEYS_PER_EDIT - 1)
    earlier = torch.randn(2 * edits, subject_tokens - 1, d, generator=generator)
    return tokens, prefix, torch.nn.functional.normalize(earlier, dim=-1).half()


def time_generation(editor: Editor, prompts: list[str]) -> float:
    start = time.perf_counter()
    for prompt in prompts:
        editor.generate([prompt], max_new_tokens=16)
    return time.perf_counter() - start


def time_routing(editor: Editor, state: InterventionSet, prompts: list[str]) -> float:
    """Seconds of `open_blocks` over the prompts, given their routing-layer states."""
    layer = state.routing_layer
    total = 0.0
    for prompt in prompts:
        encoded = editor.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            hidden = editor.model(**encoded, output_hidden_states=True).hidden_states[layer + 1][0]
        prompt = torch.ones(1, hidden.shape[0], dtype=torch.bool)
        start = time.perf_counter()
        state.router.open_blocks(hidden[None], prompt, state.sealed_blocks, encoded.input_ids)
        total += time.perf_counter() - start
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model("smollm2", device="cpu")
    editor = Editor(loaded.model, loaded.tokenizer, EditConfig(), unrelated_prompts=[])
    template = editor.new_interventions()
    unedited = template.fork()
    prompts = [r["prompt"] for r in json.loads(DATA.read_text())[: args.prompts]]
    rows = []
    for edits in args.edits:
        state = synthetic(template, edits)
        seconds = {"unedited": [], "edited": []}
        for _ in range(args.repeats):
            for name, adapter in (("unedited", unedited), ("edited", state)):
                editor.load_state(adapter, [])
                seconds[name].append(time_generation(editor, prompts))
        editor.load_state(state, [])
        routing = time_routing(editor, state, prompts) / len(prompts)
        unedited_s, edited_s = sum(seconds["unedited"]), sum(seconds["edited"])
        rows.append({
            "edits": edits,
            "route_keys": len(state.router.keys),
            "adapter_values": state.num_parameters(),
            "generation_s_unedited": round(unedited_s, 3),
            "generation_s_edited": round(edited_s, 3),
            "generation_speed_ratio": round(unedited_s / edited_s, 3),
            "routing_ms_per_prompt": round(1000 * routing, 3),
        })
        print(json.dumps(rows[-1]), flush=True)
        del state
    report = {
        "command": "python bench/routing_cost.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "dtype": loaded.precision if isinstance(loaded.precision, str) else str(loaded.precision),
        "settings": {"prompts": args.prompts, "max_new_tokens": 16, "repeats": args.repeats, "threads": 1},
        "rows": rows,
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
