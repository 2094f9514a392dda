"""Collects every bench/results/*/summary.json into bench/results/README.md, and the ablation
runs (bench/results/ablation/ and the main runs it names) into bench/results/ablation.md.

    .venv/bin/python bench/summarize.py
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COLUMNS = ("rel", "gen", "loc", "por", "rel_em", "gen_em", "rep")

# (run folder under results/, what it changes). Each row differs from the one before in one lever
# where it can; the config of every run is in its summary.json.
ABLATION = {
    "ZsRE, 100 continual edits": [
        ("zsre-continual-100-baft-oneblock", "one block for all edits (the paper's layout), rank 12, replay 32 earlier edits"),
        ("ablation/zsre-100-block1-rank4-cut0.01", "a block per edit, rank 4, no replay; sealed gates cut below 0.01, beta 0.05"),
        ("ablation/zsre-100-block1-rank4-cut0.1", "... cut below 0.1, beta 0.2 (the defaults before routing)"),
        ("ablation/zsre-100-block1-rank4-cut0.2", "... cut below 0.2, beta 0.5"),
        ("ablation/zsre-100-block1-rank4-keyinit", "cut 0.01; each block's gates start as a cosine match to its edit's last prompt position (code not kept)"),
        ("ablation/zsre-100-block1-rank4-keyinit-fixedgates", "... and the gates not trained at all (code not kept)"),
        ("ablation/zsre-100-routed-gated", "cut 0.1; + prompt-level routing by the subject key, the learned gates still act inside routed blocks"),
        ("ablation/zsre-100-routed-open", "... routed blocks act at full weight, trained without gates"),
        ("ablation/zsre-100-routed-open-neighbours", "... + replay of the sealed edits that share the new edit's route"),
        ("ablation/zsre-100-route17", "... + per-key thresholds 0.05 above the unrelated prompts (the defaults until keys moved to layer 4)"),
        ("ablation/zsre-100-route4-onekey", "... keys read at layer 4 instead of 17 (the first edited layer)"),
        ("ablation/zsre-100-route4-contexts", "... + a key after each of 5 generic contexts"),
        ("ablation/zsre-100-rank4", "... + the continuation after the answer kept (weight 1), rank 4 (the defaults until rank 24)"),
        ("ablation/zsre-100-continuation5", "... continuation weight 5"),
        ("ablation/zsre-100-stop1e-4", "rank 4, early stop at loss 1e-4 instead of 0.01 (ran beside the test suite: its s/edit is high)"),
        ("ablation/zsre-100-stop0.01-epyc", "the defaults (rank 24, early stop at loss 0.01) on an AMD EPYC with AVX512-BF16, fp16 weights on both threads (run right after the row below)"),
        ("ablation/zsre-100-stop0.05", "... early stop at loss 0.05 (fewer steps, less generality)"),
        ("ablation/zsre-100-rank16", "rank 16"),
        ("ablation/zsre-100-rank24-ct4", "rank 24, KL over the answer's last position and 4 unedited tokens after it (the defaults until eb851a4)"),
        ("ablation/zsre-continual-100-baft-bf16", "... 1 unedited token after it, bf16 (the defaults until fp16 weights; moved from the main folder)"),
        ("ablation/zsre-continual-100-baft-fp32host", "the defaults in fp32, on a host without AVX512-BF16 (`--dtype float32`; beside the CounterFact run)"),
        ("ablation/zsre-continual-100-baft-fp16weights", "the defaults on fp16 weights with fp32 arithmetic (`auto` on x86 now; an AMD EPYC, beside the CounterFact run)"),
        ("ablation/zsre-continual-100-baft-continuation", "... every layer's bases drawn before the gates, so BaFT starts from ReFT's R, A, b (the defaults until the answer window; a slower AMD EPYC, beside the CounterFact run; moved from the main folder)"),
        ("zsre-continual-100-baft", "each sealed block acts within its answer's window, no continuation term (the defaults; an AMD EPYC with AVX512-BF16, beside the CounterFact run)"),
        ("ablation/zsre-continual-100-nowindow", "... blocks act on every generated token, with the continuation term (`answer_window=false`: the defaults before; right after the row above, beside the CounterFact run)"),
        ("ablation/zsre-continual-100-rank32-fp16weights", "fp16 weights: rank 32 (beside a CounterFact run)"),
        ("ablation/zsre-continual-100-baft-amx-packed", "the defaults on an Intel Xeon with AMX-BF16: bf16 packed for oneDNN, math attention in training steps (`auto` there; beside the CounterFact run)"),
        ("ablation/zsre-continual-100-baft-epyc-packed", "the defaults on an AMD EPYC with AVX512-BF16: bf16 packed for oneDNN (`auto` there, chosen by the four-layer probe at one thread; beside the CounterFact run)"),
        ("ablation/zsre-continual-100-layers2", "fp32 host: layers 22, 26 only (beside the CounterFact run)"),
        ("ablation/zsre-continual-100-reft-rank12", "ReFT, one block of rank 12 (its default then), no replay"),
        ("zsre-continual-100-reft", "ReFT, one block of rank 24 (BaFT's rank, its default now), no replay; fp32, AVX2-only host"),
    ],
    "CounterFact val, 100 continual edits": [
        ("ablation/counterfact-100-block1-gated-unrouted", "a block per edit, gated, cut 0.1 (the defaults before routing)"),
        ("ablation/counterfact-100-routed-gated", "+ prompt-level routing, learned gates inside routed blocks"),
        ("ablation/counterfact-100-routed-open", "... routed blocks at full weight"),
        ("ablation/counterfact-100-routed-open-neighbours", "... + replay of the edits that share the route"),
        ("ablation/counterfact-100-route17", "... + per-key thresholds (the defaults until keys moved to layer 4)"),
        ("ablation/counterfact-100-route4-onekey", "... keys read at layer 4 instead of 17"),
        ("ablation/counterfact-100-route4-contexts", "... + a key after each of 5 generic contexts"),
        ("ablation/counterfact-100-rank4", "... + the continuation after the answer kept (weight 1), rank 4 (the defaults until rank 24)"),
        ("ablation/counterfact-100-continuation5", "... continuation weight 5"),
        ("ablation/counterfact-100-stop1e-4", "rank 4, early stop at loss 1e-4 instead of 0.01 (ran beside the test suite: its s/edit is high)"),
        ("ablation/counterfact-100-stop0.01-epyc", "the defaults (rank 24, early stop at loss 0.01) on an AMD EPYC with AVX512-BF16, fp16 weights on both threads (run right after the row below)"),
        ("ablation/counterfact-100-stop0.05", "... early stop at loss 0.05 (fewer steps, less generality)"),
        ("ablation/counterfact-100-rank16", "rank 16"),
        ("ablation/counterfact-100-rank24-ct4", "rank 24, KL over the answer's last position and 4 unedited tokens after it (the defaults until eb851a4)"),
        ("ablation/counterfact-continual-100-baft-bf16", "... 1 unedited token after it, bf16 (the defaults until fp16 weights; moved from the main folder)"),
        ("ablation/counterfact-continual-100-baft-fp32host", "the defaults in fp32, on a host without AVX512-BF16 (`--dtype float32`; beside the ZsRE run)"),
        ("ablation/counterfact-continual-100-baft-fp16weights", "the defaults on fp16 weights with fp32 arithmetic (`auto` on x86 now; an AMD EPYC, beside the ZsRE run)"),
        ("ablation/counterfact-continual-100-baft-continuation", "... every layer's bases drawn before the gates, so BaFT starts from ReFT's R, A, b (the defaults until the answer window; a slower AMD EPYC, beside the ZsRE run; moved from the main folder)"),
        ("counterfact-continual-100-baft", "each sealed block acts within its answer's window, no continuation term (the defaults; an AMD EPYC with AVX512-BF16, beside the ZsRE run)"),
        ("ablation/counterfact-continual-100-nowindow", "... blocks act on every generated token, with the continuation term (`answer_window=false`: the defaults before; right after the row above, beside the ZsRE run)"),
        ("ablation/counterfact-continual-100-baft-amx-packed", "the defaults on an Intel Xeon with AMX-BF16: bf16 packed for oneDNN, math attention in training steps (`auto` there; beside the ZsRE run)"),
        ("ablation/counterfact-continual-100-baft-epyc-packed", "the defaults on an AMD EPYC with AVX512-BF16: bf16 packed for oneDNN (`auto` there, chosen by the four-layer probe at one thread; beside the ZsRE run)"),
        ("ablation/counterfact-continual-100-seed1-fp16weights", "fp16 weights: the defaults, seed 1 (the interventions' random initialisation and the unrelated pool's draw)"),
        ("ablation/counterfact-continual-100-rank32-fp16weights", "fp16 weights: rank 32"),
        ("ablation/counterfact-continual-100-rank32-seed1-fp16weights", "fp16 weights: rank 32, seed 1"),
        ("ablation/counterfact-continual-100-layers2", "fp32 host: layers 22, 26 only (beside the ZsRE run)"),
        ("ablation/counterfact-continual-100-reft-rank12", "ReFT, one block of rank 12 (its default then), no replay"),
        ("counterfact-continual-100-reft", "ReFT, one block of rank 24 (BaFT's rank, its default now), no replay; fp32, AVX2-only host"),
    ],
    "ZsRE, 40 single edits, rank 4: the time of an edit before and after one unedited pass per edit and 2-D output-head calls (run side by side, one thread each; `before` from a checkout of d6992c4)": [
        ("ablation/zsre-single-40-before", "d6992c4: continuation decoding through `logits_to_keep=1`, three unedited passes per training batch"),
        ("ablation/zsre-single-40-after", "this commit's speed changes, the same edits and settings (rank 4, the default then: `--set rank=4` now)"),
    ],
    "CounterFact val, 100 single edits: the rank of a block": [
        ("ablation/counterfact-single-100-rank4", "rank 4 (the default then; `--set rank=4` now)"),
        ("ablation/counterfact-single-100-rank8", "rank 8"),
        ("ablation/counterfact-single-100-rank12", "rank 12 (the paper's)"),
        ("ablation/counterfact-single-100-rank16", "rank 16"),
        ("ablation/counterfact-single-100-rank24", "rank 24 (the default now)"),
        ("ablation/counterfact-single-100-lr0.003", "rank 24, learning rate 0.003 instead of 0.01 (fewer steps, far less generality)"),
        ("ablation/counterfact-single-100-reft", "ReFT, rank 12: acts on every input"),
    ],
    "50 single edits, one thread, ZsRE (dev) and CounterFact val side by side: tokens kept after the answer, learning rates (copied from /tmp/exp/sweep; `eb851a4` ran that commit, the rest this one's code)": [
        ("ablation/zsre-single-50-ct4-eb851a4", "ZsRE: 4 continuation tokens (eb851a4's defaults; its time ran beside the test suite)"),
        ("ablation/zsre-single-50-ct2", "ZsRE: 2 tokens"),
        ("ablation/zsre-single-50-ct1", "ZsRE: 1 token (the default now)"),
        ("ablation/zsre-single-50-ct0", "ZsRE: none (the KL at the answer's last position only)"),
        ("ablation/zsre-single-50-lr0.02", "ZsRE: 4 tokens, learning rate 0.02"),
        ("ablation/zsre-single-50-lr0.006", "ZsRE: 4 tokens, learning rate 0.006"),
        ("ablation/zsre-single-50-lr-a0.003", "ZsRE: 1 token, A alone at learning rate 0.003 (option not kept)"),
        ("ablation/counterfact-single-50-ct4-eb851a4", "CounterFact: 4 continuation tokens (eb851a4's defaults; its time ran beside the test suite)"),
        ("ablation/counterfact-single-50-ct2", "CounterFact: 2 tokens"),
        ("ablation/counterfact-single-50-ct1", "CounterFact: 1 token (the default now)"),
        ("ablation/counterfact-single-50-ct0", "CounterFact: none"),
        ("ablation/counterfact-single-50-lr0.02", "CounterFact: 4 tokens, learning rate 0.02"),
        ("ablation/counterfact-single-50-lr0.006", "CounterFact: 4 tokens, learning rate 0.006"),
        ("ablation/counterfact-single-50-lr-a0.003", "CounterFact: 1 token, A alone at learning rate 0.003 (option not kept)"),
    ],
    "ZsRE, 40 single edits, 4 continuation tokens: decoding them inside the unedited pass (side by side, one thread each)": [
        ("ablation/zsre-single-40-unfused", "eb851a4: `generate` for the continuation, then the unedited pass"),
        ("ablation/zsre-single-40-fused", "this commit: the continuation decoded inside the unedited pass (`--set continuation_tokens=4`)"),
    ],
    "30 single edits, fp32 host, one thread, each pair side by side: without the lowest edited layer (17 of 30), a step backpropagates through 8 layers instead of 13": [
        ("ablation/zsre-single-30-layers3", "ZsRE: layers 17, 22, 26 (the defaults)"),
        ("ablation/zsre-single-30-layers2", "ZsRE: layers 22, 26"),
        ("ablation/counterfact-single-30-layers3", "CounterFact: layers 17, 22, 26 (the defaults)"),
        ("ablation/counterfact-single-30-layers2", "CounterFact: layers 22, 26"),
    ],
    "Optimizer settings, one thread: fewer steps an edit cost generality (the `ablation/` runs were copied from /tmp/exp, where their commands wrote them; `bench/run.sh` writes them here)": [
        ("ablation/counterfact-continual-100-baft-continuation", "CounterFact, 100 continual: the defaults then (lr 0.01, Adam beta1 0.9, rank 24; before the answer window)"),
        ("ablation/counterfact-100-defaults-2threads", "... on two threads (other rounding: 0.85 against 0.87)"),
        ("ablation/counterfact-100-beta0.5", "beta1 0.5"),
        ("ablation/counterfact-100-lr0.009-beta0.5", "lr 0.009, beta1 0.5"),
        ("ablation/counterfact-100-lr0.0085-beta0.5", "lr 0.0085, beta1 0.5"),
        ("ablation/counterfact-100-lr0.00707-beta0.5", "lr 0.00707, beta1 0.5"),
        ("ablation/counterfact-100-lr0.00707", "lr 0.00707 (0.01 x sqrt(12/24): a step as large as at rank 12)"),
        ("ablation/counterfact-100-rank32-lr0.0061-beta0.5", "rank 32, lr 0.0061 (the same rule), beta1 0.5"),
        ("ablation/counterfact-100-rank16-beta0.5", "rank 16, beta1 0.5"),
        ("ablation/counterfact-100-rank12-beta0.5", "rank 12, beta1 0.5"),
        ("ablation/counterfact-100-reft-lr0.0085-beta0.5", "ReFT, lr 0.0085, beta1 0.5"),
        ("ablation/zsre-continual-100-baft-continuation", "ZsRE, 100 continual: the defaults then"),
        ("ablation/zsre-100-beta0.5", "beta1 0.5"),
        ("ablation/zsre-100-lr0.009-beta0.5", "lr 0.009, beta1 0.5"),
        ("ablation/zsre-100-lr0.0085-beta0.5", "lr 0.0085, beta1 0.5"),
        ("ablation/zsre-100-reft-lr0.0085-beta0.5", "ReFT, lr 0.0085, beta1 0.5"),
        ("ablation/zsre-single-40-defaults", "ZsRE, 40 single edits: the defaults"),
        ("ablation/zsre-single-40-lr0.0085-beta0.5", "lr 0.0085, beta1 0.5"),
        ("ablation/zsre-single-40-rank32-lr0.0061-beta0.5", "rank 32, lr 0.0061, beta1 0.5"),
        ("ablation/zsre-single-40-rank16-beta0.5", "rank 16, beta1 0.5"),
        ("ablation/zsre-single-40-rank12-beta0.5", "rank 12, beta1 0.5"),
    ],
    "Learning-rate warm-up, one thread, on an Intel Xeon with AMX-BF16 (other rounding than the runs above): fewer BaFT steps, less generality (the CounterFact runs were copied from /tmp/exp/runs, where their commands wrote them; `bench/run.sh` writes them here)": [
        ("ablation/counterfact-100-defaults-amx", "CounterFact, 100 continual: the defaults on this host"),
        ("ablation/counterfact-100-warmup0.3-0.6", "`lr_warmup` [0.3, 0.6]: the first step at 0.3x the rate, the second at 0.6x"),
        ("ablation/counterfact-100-warmup1-0.5", "`lr_warmup` [1, 0.5]: the second step at half the rate"),
        ("ablation/zsre-single-40-defaults-amx", "ZsRE, 40 single edits: the defaults on this host"),
        ("ablation/zsre-single-40-warmup0.3-0.6", "`lr_warmup` [0.3, 0.6]"),
        ("ablation/zsre-single-40-warmup1-0.5", "`lr_warmup` [1, 0.5]"),
        ("ablation/zsre-single-40-reft-amx", "ReFT (rank 12), its defaults"),
        ("ablation/zsre-single-40-reft-warmup0.3-0.6", "ReFT, `lr_warmup` [0.3, 0.6]"),
        ("ablation/zsre-single-40-reft-warmup1-0.5", "ReFT, `lr_warmup` [1, 0.5]"),
    ],
    "ZsRE, 100 single edits": [
        ("ablation/zsre-single-100-baft-bf16", "rank 24, 1 continuation token, bf16 (the defaults until fp16 weights; two threads, alone; moved from the main folder)"),
        ("ablation/zsre-single-100-baft-amx-packed", "the defaults on an Intel Xeon with AMX-BF16: bf16 packed for oneDNN, math attention in training steps (`auto` there; two threads, alone)"),
        ("ablation/zsre-single-100-baft-epyc-packed", "the defaults on an AMD EPYC with AVX512-BF16: bf16 packed for oneDNN (`auto` there; two threads, alone)"),
        ("ablation/zsre-single-100-baft-epyc-avx512bf16-threaded", "the defaults on an AMD EPYC with AVX512-BF16 once FBGEMM ran on both threads: fp16 weights (`auto` there; two threads, alone)"),
        ("ablation/zsre-single-100-baft-epyc-zen3-avx2", "the defaults on an AVX2-only AMD EPYC (Zen 3): fp16 weights, FBGEMM on both threads (`auto` there; two threads, alone)"),
        ("ablation/zsre-single-100-reft-rank12", "ReFT, rank 12, its default then (two threads, alone, right after the defaults' run)"),
        ("ablation/zsre-single-100-reft-second", "ReFT (rank 12) again, run first this time (two threads, alone)"),
        ("ablation/zsre-single-100-baft-second", "the defaults again, right after the run above"),
        ("ablation/zsre-single-100-baft-eb851a4", "rank 24, 4 continuation tokens, eb851a4 (two threads, alone, hours earlier)"),
        ("ablation/zsre-single-100-reft-eb851a4", "ReFT, eb851a4 (right after the run above)"),
        ("ablation/zsre-single-100-baft-fp32host", "the defaults on a host without AVX512-BF16, so in fp32 (`dtype_speed.json`; two threads, alone, another day; made under `host-fp32/`, moved)"),
        ("ablation/zsre-single-100-reft-fp32host", "ReFT on that host, right after the run above"),
        ("ablation/zsre-single-100-baft-bf16host", "the defaults on a host with AVX512-BF16, bf16, the unrelated prompts' statistics computed once (two threads, alone, another day)"),
        ("ablation/zsre-single-100-reft-bf16host", "ReFT on that host, right after the run above"),
        ("ablation/zsre-single-100-reft-bf16host-second", "ReFT again on that host, run first this time"),
        ("ablation/zsre-single-100-baft-bf16host-second", "the defaults again, right after the run above"),
        ("ablation/zsre-single-100-rank4", "rank 4, d6992c4 (the defaults then; two threads, alone, earlier in the day)"),
        ("ablation/zsre-single-100-reft-d6992c4", "ReFT, d6992c4 (right after the run above)"),
        ("zsre-single-100-reft", "ReFT at BaFT's rank 24, its default now (fp32, an AMD EPYC with AVX2 only; two threads, alone)"),
        ("ablation/zsre-single-100-baft-fp16weights", "the defaults on fp16 weights with fp32 arithmetic (`auto` on x86 now; an AMD EPYC with AVX512-BF16, two threads, alone)"),
        ("ablation/zsre-single-100-baft-continuation", "every layer's bases drawn before the gates, so BaFT starts from ReFT's R, A, b (the defaults until the answer window; a slower AMD EPYC with AVX512-BF16, two threads, alone; moved from the main folder)"),
        ("ablation/zsre-single-100-baft-window-first", "each sealed block acts within its answer's window, no continuation term (the defaults; an AMD EPYC with AVX512-BF16, two threads, alone, in a slow hour of that host)"),
        ("zsre-single-100-baft", "... the same again, an hour later (the defaults)"),
    ],
    "1000 continual edits (ZsRE both files; CounterFact train)": [
        ("zsre-continual-1000-baft-oneblock", "ZsRE: one block for all edits (the paper's layout), rank 12, no replay"),
        ("ablation/zsre-1000-block1-gated-unrouted", "ZsRE: a gated block per edit (the defaults before routing)"),
        ("ablation/zsre-1000-routed-nomargin", "ZsRE: routed blocks at full weight, neighbour replay, one global threshold"),
        ("ablation/zsre-1000-route17", "ZsRE: + per-key thresholds, keys at layer 17 (the defaults until keys moved to layer 4)"),
        ("ablation/zsre-1000-rank4", "ZsRE: keys at layer 4, 6 per edit, continuation kept, rank 4 (the defaults until rank 24)"),
        ("ablation/zsre-continual-1000-baft-ct4", "ZsRE: rank 24, 4 tokens kept after the answer (the defaults until eb851a4), bf16 (the main run until fp16 weights)"),
        ("ablation/zsre-continual-1000-baft-fp16weights", "ZsRE: rank 24, 1 token after the answer, fp16 weights (the defaults until the bases were drawn before the gates; moved from the main folder)"),
        ("ablation/zsre-continual-1000-baft-continuation", "ZsRE: every layer's bases drawn before the gates (the defaults until the answer window; a slower AMD EPYC, beside the CounterFact run; moved from the main folder)"),
        ("zsre-continual-1000-baft", "ZsRE: each sealed block within its answer's window (the defaults; an AMD EPYC with AVX512-BF16, beside the CounterFact run)"),
        ("zsre-continual-1000-reft", "ZsRE: ReFT, one block of rank 12"),
        ("ablation/counterfact-1000-block1-gated-unrouted", "CounterFact: a gated block per edit (before routing)"),
        ("ablation/counterfact-1000-routed-nomargin", "CounterFact: routed, one global threshold"),
        ("ablation/counterfact-1000-route17", "CounterFact: + per-key thresholds, keys at layer 17 (the defaults until keys moved to layer 4)"),
        ("ablation/counterfact-1000-rank4", "CounterFact: keys at layer 4, 6 per edit, continuation kept, rank 4 (the defaults until rank 24)"),
        ("ablation/counterfact-continual-1000-baft-ct4", "CounterFact: rank 24, 4 tokens after the answer (the defaults until eb851a4), bf16 (the main run until fp16 weights)"),
        ("ablation/counterfact-continual-1000-baft-fp16weights", "CounterFact: rank 24, 1 token after the answer, fp16 weights (the defaults until the bases were drawn before the gates; moved from the main folder)"),
        ("ablation/counterfact-continual-1000-baft-continuation", "CounterFact: every layer's bases drawn before the gates (the defaults until the answer window; beside the ZsRE run; moved from the main folder)"),
        ("counterfact-continual-1000-baft", "CounterFact: each sealed block within its answer's window (the defaults; beside the ZsRE run)"),
        ("counterfact-continual-1000-reft", "CounterFact: ReFT, one block of rank 12"),
    ],
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


def _unedited_pass_sentence(s: dict) -> str:
    return (
        f"The unedited pass of an edit's training batch against the tokens decoded after the answer "
        f"(`{s['command']}`), interleaved: "
        + ", ".join(f"{count} tokens: {ms:.0f} ms" for count, ms in s["unedited_pass_median_ms"].items())
        + f"; one training step: {s['training_step_median_ms']:.0f} ms."
    )


def _dtype_sentence(s: dict) -> str:
    bf16, fp32 = s["bfloat16"], s["float32"]
    hardware = "with" if any(s["cpu_bf16_features"].values()) else "without"
    return (
        f"bf16 against fp32 on a CPU {hardware} bf16 arithmetic ({s['cpu']}, `{s['command']}`), the two "
        f"models edit by edit: a training step {bf16['training_step_median_ms']:.0f} ms vs "
        f"{fp32['training_step_median_ms']:.0f} ms (**{s['bf16_over_fp32_training_step']:.2f}x**), "
        f"a whole edit {bf16['edit_median_s']:.2f} s vs {fp32['edit_median_s']:.2f} s "
        f"(median; {bf16['steps_mean']:.1f} vs {fp32['steps_mean']:.1f} steps)."
    )


def _paired_sentence(s: dict, title: str) -> str:
    """One `bench/paired_speed.py` result: its two variants (the first over the second)."""
    first, second = (v for v in s.values() if isinstance(v, dict) and "edit_median_s" in v)
    ratio = next(k for k in s if k.endswith("_edit_median_95")).removesuffix("_edit_median_95")
    caps = "".join(f", {k}={v}" for k, v in s.get("isa_limits", {}).items())
    return (
        f"{title}, {s['edits']} single ZsRE edits alternating edit by edit in one run "
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


# Each `bench/paired_speed.py` result (when present) and what its two variants are.
PAIRED_TITLES = {
    "method_speed_window.json": "BaFT against ReFT, the defaults with each sealed block within its answer's window, an EPYC with AVX512-BF16 (`auto`: fp16 weights)",
    "ablation/window_speed-epyc-avx512bf16.json": "BaFT's sealed blocks within their answers' windows (the defaults) against blocks that act on every generated token, trained with the continuation term, that EPYC",
    "ablation/method_speed-epyc-avx512bf16-threaded.json": "BaFT against ReFT, the defaults on an EPYC with AVX512-BF16 once FBGEMM ran on both threads (`auto`: fp16 weights)",
    "ablation/weights_bf16_speed-epyc-avx512bf16-threaded.json": "fp16 weights with FBGEMM on both threads against bf16 packed for oneDNN, an EPYC with AVX512-BF16 (`auto` there: fp16 weights)",
    "ablation/method_speed-epyc-zen3-avx2-threaded.json": "BaFT against ReFT, the defaults on an AVX2-only EPYC (`auto`: fp16 weights, FBGEMM on both threads)",
    "ablation/fp16_threads_speed-epyc-zen3-avx2.json": "fp16 weights through FBGEMM on both threads against torch's one-thread FBGEMM op (same numbers), that AVX2-only EPYC",
    "ablation/method_speed-epyc-zen3-avx2.json": "BaFT against ReFT, the defaults on that AVX2-only EPYC before FBGEMM ran on both threads",
    "ablation/packed_fp32_speed-epyc-zen3-avx2.json": "fp32 packed for oneDNN against fp16 weights (FBGEMM on both threads), that AVX2-only EPYC",
    "ablation/weights_speed-epyc-zen3-avx2.json": "fp16 weights (FBGEMM on both threads) against fp32, that AVX2-only EPYC",
    "method_speed_measured_auto.json": "BaFT against ReFT at rank 24, the defaults with `auto` measured (bf16 packed for oneDNN on an EPYC with AVX512-BF16; the four-layer probe then)",
    "ablation/method_speed_measured_auto-second.json": "BaFT against ReFT, the defaults with `auto` measured by the final probe (bf16 on that EPYC)",
    "ablation/weights_bf16_speed-epyc-avx512bf16.json": "fp16 weights with fp32 arithmetic (FBGEMM) against bf16 packed for oneDNN, an EPYC with AVX512-BF16 (where `auto` then took fp16 weights)",
    "ablation/weights_bf16_speed-epyc-onednn-no-bf16.json": "fp16 weights (FBGEMM) against bf16 packed for oneDNN, that EPYC with oneDNN capped below AVX512-BF16 (bf16 emulated there)",
    "ablation/packed_fp32_speed-epyc-onednn-no-bf16.json": "fp32 packed for oneDNN against fp16 weights (FBGEMM), that EPYC with oneDNN capped below AVX512-BF16",
    "ablation/packed_fp32_speed-avx2-isa.json": "fp32 packed for oneDNN against fp16 weights (FBGEMM), that EPYC with every library capped at AVX2",
    "method_speed_amx_packed.json": "BaFT against ReFT at rank 24, the defaults on a Xeon with AMX-BF16 (bf16 packed for oneDNN, math attention in training steps)",
    "ablation/method_speed_amx_packed-second.json": "BaFT against ReFT, the defaults on that Xeon, a second run",
    "ablation/weights_speed-amx-xeon.json": "fp16 weights with fp32 arithmetic (FBGEMM) against fp32, a Xeon with AMX-BF16",
    "ablation/method_speed_amx_packed-flash.json": "BaFT against ReFT, bf16 packed, before training steps took the math attention kernel",
    "amx_bf16_speed.json": "fp16 weights with fp32 arithmetic (FBGEMM) against bf16 packed for oneDNN, a Xeon with AMX-BF16 (flash attention then)",
    "weights_speed.json": "fp16 weights with fp32 arithmetic (FBGEMM) against fp32",
    "weights_speed_vs_bf16.json": "fp16 weights with fp32 arithmetic (FBGEMM) against bf16",
    "ablation/weights_speed-avx2-isa.json": "fp16 weights with fp32 arithmetic (FBGEMM) against fp32, kernels capped at AVX2",
    "method_speed_shared_contexts.json": "BaFT against ReFT at rank 24, on fp16 weights, the same R, A, b, the route contexts' KV computed once (the defaults)",
    "ablation/method_speed_shared_contexts-second.json": "BaFT against ReFT, the defaults, a second run",
    "method_speed_same_bases.json": "BaFT against ReFT at rank 24, on fp16 weights, both starting from the same R, A, b",
    "ablation/weights_speed-slower-epyc.json": "fp16 weights with fp32 arithmetic (FBGEMM) against fp32, a slower instance of the AVX512-BF16 EPYC",
    "method_speed_fp16weights.json": "BaFT against ReFT at BaFT's rank 24 (its default), on fp16 weights, BaFT's bases drawn after some gates",
    "ablation/method_speed_fp16weights-second.json": "BaFT against ReFT at BaFT's rank 24, on fp16 weights, a second run",
    "method_speed.json": "BaFT against ReFT at BaFT's rank 24 (its default), fp32 (`auto` then on that host)",
    "ablation/method_speed_amx-reft-rank24.json": "BaFT against ReFT at BaFT's rank 24",
    "ablation/method_speed-reft-rank12.json": "BaFT against ReFT at the paper's rank 12 (its default then)",
    "ablation/method_speed_amx-reft-rank12.json": "BaFT against ReFT at the paper's rank 12 (its default then)",
}
SPEED_SENTENCES = {
    "prefix_cache_speedup.json": _prefix_cache_sentence,
    "output_head_speed.json": _output_head_sentence,
    "unedited_pass_speed.json": _unedited_pass_sentence,
    "dtype_speed.json": _dtype_sentence,
    "dtype_speed_bf16host.json": _dtype_sentence,
    "ablation/step_breakdown-epyc-zen3-avx2.json": _step_breakdown_sentence,
    "ablation/step_breakdown-epyc-avx512bf16.json": _step_breakdown_sentence,
    **{name: partial(_paired_sentence, title=title) for name, title in PAIRED_TITLES.items()},
}


# Which precision and which draw of the bases the runs were made with (both result pages).
PRECISION_NOTE = (
    "`auto` now measures, once per host, which of fp32, bf16 (packed for oneDNN), fp16 weights with",
    "fp32 arithmetic (`fp16-weights`, FBGEMM) and fp32 packed for oneDNN (`fp32-packed`) runs a",
    "training step fastest (`baft_core/precision.py`,",
    "`precision_probe*.json`); before, it ran x86 CPUs on `fp16-weights` except CPUs with AMX-BF16,",
    "which ran bf16 packed (`ablation/*-amx-packed`). Measured, it ran bf16 packed on the AVX512-BF16",
    "EPYC too (`ablation/*-epyc-packed`) until FBGEMM's products ran on both threads, and fp16",
    "weights there since (`ablation/*-epyc-avx512bf16-threaded`). The BaFT main runs (100 and 1000",
    "continual, 100 single) are on fp16 weights with every layer's bases drawn before the gates",
    "(BaFT starts from ReFT's R, A, b); the runs they replaced were moved to `ablation/*-bf16` (bf16, fp32 where noted) and",
    "`ablation/*-1000-baft-fp16weights`, and `ablation/*-fp16weights` holds the fp16 runs of the old draw.",
    "Since each sealed block acts within its answer's window (`answer_window`), the main BaFT runs are",
    "of that code; the ones they replaced are `ablation/*-baft-continuation`.",
    "Other main runs were made in bf16 (fp32 where noted).",
)


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    rows = []
    for path in sorted(RESULTS.glob("*/summary.json")):
        s = json.loads(path.read_text())
        data = Path(s["data"][0]).stem
        rows.append(
            f"| [{path.parent.name}]({path.parent.name}/report.md) | {data} | {s['method']} | {s['mode']} "
            f"| {s['edits']} | " + " | ".join(fmt(s.get(c)) for c in COLUMNS)
            + f" | {s['sec_per_edit_median']:.3f} | {s['steps_mean']:.1f} | {s['config']['replay_size']} "
            f"| {s['config'].get('block_edits', 0)} | {s['config']['rank']} | {s['threads']} |"
        )
    lines = [
        "# Benchmark results",
        "",
        "Bundled SmolLM2-135M-Instruct (bf16 unless a summary notes fp32 or fp16-weights, interventions fp32), two CPU cores unless a",
        "summary says `threads: 1` (runs made side by side). Every run's exact command is in its",
        "`summary.json` and `report.md`; `bench/run.sh` re-runs them all. Regenerate this table with",
        "`.venv/bin/python bench/summarize.py`.",
        "",
        "Folders named `*-oneblock` were made with the earlier defaults: one block of rank 12 for all",
        "edits (and, in the 100-edit runs, replay of 32 earlier edits).",
        "",
        *PRECISION_NOTE,
        "",
        "ReFT ran at the paper's rank 12 until it took BaFT's rank 24 (ReFT is BaFT with W = I). Its",
        "main runs from before were moved to `ablation/*-reft-rank12*` (the 1000-edit ones stay, at",
        "rank 12), and their commands name the paths they were written to.",
        "",
        "`blocks`: edits per block (0: one block for all edits, the paper's layout); `threads`: 1",
        "where two runs shared the two cores, so their times are not comparable with 2-thread runs.",
        "",
        "| run | data | method | mode | edits | " + " | ".join(COLUMNS)
        + " | s/edit | steps | replay | blocks | rank | threads |",
        "|" + "---|" * (len(COLUMNS) + 11),
        *rows,
    ]
    for name, sentence in SPEED_SENTENCES.items():  # one sentence a speed result, when present
        path = RESULTS / name
        if path.is_file():
            lines += ["", sentence(json.loads(path.read_text()))]
    (RESULTS / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    write_ablation()
    plot_side_by_side()


def plot_side_by_side() -> None:
    """BaFT against ReFT along the continual curve (1, 10, 100, 1000 edits), one figure a dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for data in ("zsre", "counterfact"):
        runs = {m: RESULTS / f"{data}-continual-1000-{m}" / "summary.json" for m in ("baft", "reft")}
        if not all(path.is_file() for path in runs.values()):
            continue
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True)
        for ax, metric in zip(axes, ("rel", "gen", "loc")):
            for method, path in runs.items():
                curve = json.loads(path.read_text())["curve"]
                ax.plot([p["edits"] for p in curve], [p[metric] for p in curve], marker="o", label=method)
            ax.set_xscale("log")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{data}: {metric}")
            ax.set_xlabel("continual edits")
        axes[0].set_ylabel("score on all edits so far")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"{data}-continual-1000-baft-vs-reft.png", dpi=120)
        plt.close(fig)


def write_ablation() -> None:
    lines = [
        "# Ablation: what keeps continual edits",
        "",
        "The bundled model, all edits evaluated on the final adapter; 100-edit runs take the first 100",
        "records of `zsre_eval_portability_dev.json` or `counterfact_val.json`, 1000-edit runs the first",
        "1000 of both ZsRE files or of `counterfact_train.json`. Each run's command and config are in",
        "its `summary.json`. The gated-block runs under `ablation/zsre-100-block1-*` were made while the",
        "blocks were built, before the final fit under the sealed cutoff existed (the first one's cutoff",
        "was alpha, 0.01); the key-initialised gates of two of them were dropped with their code. The",
        "routing rows are on the committed code of their time, with `--set` overrides; the `route17` runs",
        "are the defaults of commit 27b5801 (their commands wrote to the main folders then); the `rank4`",
        "runs are the defaults of commit d6992c4, moved here when the default rank became 24 (their",
        "commands name the main folders they were written to; `--set rank=4` repeats them now).",
        *PRECISION_NOTE,
        "",
        "ReFT ran at the paper's rank 12 until it took BaFT's rank 24 (ReFT is BaFT with W = I); its",
        "runs from before say so in the `rank` column, and `bench/run.sh` repeats them with `--set rank=12`.",
        "`rep`: the answer comes again in the 16 greedy tokens after it (runs before the metric: -).",
        "`routing`: rephrases that open their own edit's block / locality prompts that open any block.",
    ]
    baseline = RESULTS / "repeat_baseline.json"
    if baseline.is_file():
        b = json.loads(baseline.read_text())
        lines += [
            f"`rep` of the unedited model fed prompt + new target (`{b['command']}`, first 100 records):",
            f"ZsRE {b['zsre_new_target']:.2f}, CounterFact {b['counterfact_new_target']:.2f} (after its own "
            f"true object: {b['counterfact_true_object']:.2f}).",
        ]
    for title, runs in ABLATION.items():
        lines += [
            "",
            f"## {title}",
            "",
            "| run | lever | " + " | ".join(COLUMNS) + " | routing | steps | s/edit | rank | threads |",
            "|" + "---|" * (len(COLUMNS) + 7),
        ]
        for folder, lever in runs:
            path = RESULTS / folder / "summary.json"
            if not path.is_file():
                continue
            s = json.loads(path.read_text())
            routing = s.get("routing") or {}
            routed = (
                f"{routing['rephrase_opens_own']:.2f} / {routing['locality_opens_any']:.2f}"
                if "rephrase_opens_own" in routing and "locality_opens_any" in routing
                else "-"
            )
            lines.append(
                f"| [{folder}]({folder}/report.md) | {lever} | " + " | ".join(fmt(s.get(c)) for c in COLUMNS)
                + f" | {routed} | {s['steps_mean']:.2f} | {s['sec_per_edit_median']:.3f} | {s['config']['rank']} "
                f"| {s['threads']} |"
            )
    (RESULTS / "ablation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
