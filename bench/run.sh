#!/usr/bin/env bash
# Regenerates the benchmark results under bench/results/ (about 3 hours on two CPU cores).
# Each summary.json records the exact command that produced it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
ZSRE="$DATA/zsre/zsre_eval_portability_dev.json $DATA/zsre/zsre_train_1k.json"
CF_VAL="$DATA/counterfact/counterfact_val.json"
CF_TRAIN="$DATA/counterfact/counterfact_train.json"
OUT=bench/results
val_files() { if [ "$1" = zsre ]; then echo $ZSRE; else echo $CF_VAL; fi; }  # ZsRE or CounterFact val
# ReFT ran at the paper's rank 12 until it took BaFT's rank 24 (ReFT is BaFT with W = I): the
# ReFT runs made before get it back here.
rank12() { if [ "$1" = reft ]; then echo "--set rank=12"; fi; }

# Single edits: speed (timed alone, two threads) and quality; ReFT at rank 12.
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode single --edits 100 \
  --out $OUT/zsre-single-100-baft
$PY -m baft_core.bench --data $ZSRE --format zsre --method reft --mode single --edits 100 \
  --set rank=12 --out $OUT/ablation/zsre-single-100-reft-rank12
# ... and again in the other order: the machine's speed drifts between runs.
for method in reft baft; do
  $PY -m baft_core.bench --data $ZSRE --format zsre --method $method --mode single --edits 100 \
    $(rank12 $method) --out $OUT/ablation/zsre-single-100-$method-second
done
# The same pair in fp32 (what `auto` picks on a CPU without bf16 arithmetic, where they were made),
# and bf16 against fp32 per step on that CPU (made by this script's earlier name, dtype_speed.py,
# whose gates learned from the built-in unrelated pool).
for method in baft reft; do
  $PY -m baft_core.bench --data $ZSRE --format zsre --method $method --mode single --edits 100 \
    --dtype float32 $(rank12 $method) --out $OUT/ablation/zsre-single-100-$method-fp32host
done
$PY bench/paired_speed.py --vary dtype --out $OUT/dtype_speed.json
# On a CPU with bf16 arithmetic (AVX512-BF16): the pair in both orders, then BaFT against ReFT
# and bf16 against fp32, each edit by edit in one run (what the ratio is read from).
for method in baft reft; do
  $PY -m baft_core.bench --data $ZSRE --format zsre --method $method --mode single --edits 100 \
    --dtype bfloat16 $(rank12 $method) --out $OUT/ablation/zsre-single-100-$method-bf16host
done
for method in reft baft; do
  $PY -m baft_core.bench --data $ZSRE --format zsre --method $method --mode single --edits 100 \
    --dtype bfloat16 $(rank12 $method) --out $OUT/ablation/zsre-single-100-$method-bf16host-second
done
$PY bench/paired_speed.py --vary method --edits 200 --set reft:rank=12 --out $OUT/ablation/method_speed-reft-rank12.json
$PY bench/paired_speed.py --vary dtype --out $OUT/dtype_speed_bf16host.json
for data in zsre counterfact; do
  $PY -m baft_core.bench --data $(val_files $data) --format $data --mode continual --edits 100 --threads 1 \
    --dtype float32 --out $OUT/ablation/$data-continual-100-baft-fp32host &
done
wait
for data in zsre counterfact; do
  $PY -m baft_core.bench --data $(val_files $data) --format $data --mode continual --edits 100 --threads 1 \
    --set 'layers=[22,26]' --out $OUT/ablation/$data-continual-100-layers2 &
done
wait
# Without the lowest edited layer: 30 single edits, each pair side by side.
for data in zsre counterfact; do
  $PY -m baft_core.bench --data $(val_files $data) --format $data --mode single --edits 30 --threads 1 \
    --out $OUT/ablation/$data-single-30-layers3 &
  $PY -m baft_core.bench --data $(val_files $data) --format $data --mode single --edits 30 --threads 1 \
    --set 'layers=[22,26]' --out $OUT/ablation/$data-single-30-layers2 &
  wait
done
# Continual, 100 edits: ZsRE and CounterFact side by side, one thread each (ReFT at rank 12).
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode continual --edits 100 \
  --threads 1 --out $OUT/zsre-continual-100-baft &
$PY -m baft_core.bench --data $CF_VAL --format counterfact --method baft --mode continual --edits 100 \
  --threads 1 --out $OUT/counterfact-continual-100-baft &
wait
for data in zsre counterfact; do
  $PY -m baft_core.bench --data $(val_files $data) --format $data --method reft --mode continual --edits 100 \
    --threads 1 --set rank=12 --out $OUT/ablation/$data-continual-100-reft-rank12 &
done
wait
# Batched: 100 edits in batches of 10.
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode batched --edits 100 --batch-size 10 \
  --out $OUT/zsre-batched-100-baft
# Continual, 1000 edits (issue 4): BaFT (a block per edit) and ReFT (one block of rank 12), ZsRE
# and CounterFact, side by side on one thread each. The BaFT pair was made again on fp16 weights
# (`auto` on x86 since) with today's defaults; the earlier pair, in bf16 with 4 tokens kept after
# the answer, was moved to ablation/*-continual-1000-baft-ct4 (its commands name the old paths):
for data in zsre counterfact; do
  files=$ZSRE; [ $data = counterfact ] && files=$CF_TRAIN
  $PY -m baft_core.bench --data $files --format $data --method baft --mode continual --edits 1000 \
    --threads 1 --dtype bfloat16 --set continuation_tokens=4 --out $OUT/ablation/$data-continual-1000-baft-ct4 &
done
wait
for method in baft reft; do
  $PY -m baft_core.bench --data $ZSRE --format zsre --method $method --mode continual --edits 1000 \
    --threads 1 $(rank12 $method) --out $OUT/zsre-continual-1000-$method &
  $PY -m baft_core.bench --data $CF_TRAIN --format counterfact --method $method --mode continual \
    --edits 1000 --threads 1 $(rank12 $method) --out $OUT/counterfact-continual-1000-$method &
  wait
done
# The paper's layout for comparison: one block for all edits, no replay.
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode continual --edits 1000 \
  --threads 1 --set block_edits=0 rank=12 beta=0.05 --out $OUT/zsre-continual-1000-baft-oneblock
# Ablation of the routing levers (bench/results/ablation.md), 100 edits, ZsRE and CounterFact val.
ablate() {  # folder suffix, --set overrides...
  local name=$1; shift
  $PY -m baft_core.bench --data $ZSRE --format zsre --mode continual --edits 100 --threads 1 \
    --set "$@" --out $OUT/ablation/zsre-100-$name &
  $PY -m baft_core.bench --data $CF_VAL --format counterfact --mode continual --edits 100 --threads 1 \
    --set "$@" --out $OUT/ablation/counterfact-100-$name &
  wait
}
# (Run at rank 4, the default they were made with.)
ablate routed-gated rank=4 sealed_gates=true route_neighbours=0 route_margin=0
ablate routed-open rank=4 route_neighbours=0 route_margin=null
ablate routed-open-neighbours rank=4 route_margin=null
# Where route keys are read and how many, and the continuation after the answer.
ablate route4-onekey rank=4 'route_contexts=[]' continuation_weight=0
ablate route4-contexts rank=4 continuation_weight=0
ablate rank4 rank=4
ablate continuation5 rank=4 continuation_weight=5.0
ablate stop1e-4 rank=4 stop_loss=0.0001
ablate rank16 rank=16
# A looser early stop at the defaults (rank 24): loss 0.05 instead of 0.01, then the defaults
# on the same host (an AMD EPYC with AVX512-BF16, fp16 weights on both threads).
ablate stop0.05 stop_loss=0.05
ablate stop0.01-epyc stop_loss=0.01
# The rank of a block on single CounterFact edits, two runs at a time, and ReFT beside them.
single_cf() {  # folder suffix, bench arguments...
  local name=$1; shift
  $PY -m baft_core.bench --data $CF_VAL --format counterfact --mode single --edits 100 --threads 1 \
    "$@" --out $OUT/ablation/counterfact-single-100-$name &
}
single_cf rank4 --set rank=4; single_cf reft --method reft --set rank=12; wait
single_cf rank8 --set rank=8; single_cf rank12 --set rank=12; wait
single_cf rank16 --set rank=16; single_cf rank24 --set rank=24; wait
single_cf lr0.003 --set lr=0.003; wait
# Tokens kept after the answer and learning rates, 50 single edits, ZsRE and CounterFact side
# by side (ct4 and lr_a=0.003 ran on code of their time: eb851a4, and an option not kept).
single50() {  # folder suffix, --set overrides...
  local name=$1; shift
  $PY -m baft_core.bench --data $DATA/zsre/zsre_eval_portability_dev.json --format zsre --mode single \
    --edits 50 --threads 1 --set "$@" --out $OUT/ablation/zsre-single-50-$name &
  $PY -m baft_core.bench --data $CF_VAL --format counterfact --mode single --edits 50 --threads 1 \
    --set "$@" --out $OUT/ablation/counterfact-single-50-$name &
  wait
}
single50 ct0 continuation_tokens=0; single50 ct1 continuation_tokens=1; single50 ct2 continuation_tokens=2
single50 lr0.02 lr=0.02 continuation_tokens=4; single50 lr0.006 lr=0.006 continuation_tokens=4
# Optimizer settings against the steps an edit takes and generality (ablation.md), one thread,
# two runs at a time (which two ran together changes their times, not their scores).
ablate beta0.5 adam_beta1=0.5
ablate lr0.0085-beta0.5 lr=0.0085 adam_beta1=0.5
ablate lr0.009-beta0.5 lr=0.009 adam_beta1=0.5
cf100() {  # folder suffix, bench arguments...
  local name=$1; shift
  $PY -m baft_core.bench --data $CF_VAL --format counterfact --mode continual --edits 100 --threads 1 \
    "$@" --out $OUT/ablation/counterfact-100-$name &
}
cf100 lr0.00707 --set lr=0.00707; cf100 lr0.00707-beta0.5 --set lr=0.00707 adam_beta1=0.5; wait
cf100 rank12-beta0.5 --set rank=12 adam_beta1=0.5; cf100 rank16-beta0.5 --set rank=16 adam_beta1=0.5; wait
cf100 rank32-lr0.0061-beta0.5 --set rank=32 lr=0.0061 adam_beta1=0.5
$PY -m baft_core.bench --data $ZSRE --format zsre --method reft --mode continual --edits 100 --threads 1 \
  --set rank=12 lr=0.0085 adam_beta1=0.5 --out $OUT/ablation/zsre-100-reft-lr0.0085-beta0.5 &
wait
cf100 reft-lr0.0085-beta0.5 --method reft --set rank=12 lr=0.0085 adam_beta1=0.5; wait
$PY -m baft_core.bench --data $CF_VAL --format counterfact --mode continual --edits 100 \
  --out $OUT/ablation/counterfact-100-defaults-2threads  # the defaults, two threads: other numerics
single40() {  # folder suffix, bench arguments... (ZsRE)
  local name=$1; shift
  $PY -m baft_core.bench --data $ZSRE --format zsre --mode single --edits 40 --threads 1 \
    "$@" --out $OUT/ablation/zsre-single-40-$name &
}
single40 defaults; single40 rank12-beta0.5 --set rank=12 adam_beta1=0.5; wait
single40 rank16-beta0.5 --set rank=16 adam_beta1=0.5; single40 rank32-lr0.0061-beta0.5 --set rank=32 lr=0.0061 adam_beta1=0.5; wait
single40 lr0.0085-beta0.5 --set lr=0.0085 adam_beta1=0.5; wait
# The continuation decoded inside the unedited pass against eb851a4 (from a worktree of it):
#   (cd ../eb851a4 && python -m baft_core.bench --data $ZSRE --format zsre --mode single --edits 40 \
#     --threads 1 --out $OUT/ablation/zsre-single-40-unfused) &
$PY -m baft_core.bench --data $ZSRE --format zsre --mode single --edits 40 --threads 1 \
  --set continuation_tokens=4 --out $OUT/ablation/zsre-single-40-fused
# How often the unedited model repeats an answer after itself (the baseline for `rep`), and the
# output head on 3-D slices against 2-D rows.
$PY bench/repeat_baseline.py --out $OUT/repeat_baseline.json
$PY bench/output_head_speed.py --out $OUT/output_head_speed.json
# On an Intel Xeon with AMX-BF16 (another host, other rounding): BaFT against ReFT edit by edit,
# and a learning-rate warm-up (fewer BaFT steps, less CounterFact generality). The 100-edit
# timing and the CounterFact runs were first written under /tmp/exp and copied here.
$PY bench/paired_speed.py --vary method --edits 100 --set reft:rank=12 --out $OUT/ablation/method_speed_amx-100-first.json
$PY bench/paired_speed.py --vary method --edits 200 --set reft:rank=12 --out $OUT/ablation/method_speed_amx-reft-rank12.json
# ... and against ReFT at BaFT's rank (24; its default now): what BaFT's own machinery costs
$PY bench/paired_speed.py --vary method --edits 200 --set reft:rank=24 --out $OUT/ablation/method_speed_amx-reft-rank24.json
cf100 defaults-amx; cf100 warmup0.3-0.6 --set 'lr_warmup=[0.3,0.6]'; wait
cf100 warmup1-0.5 --set 'lr_warmup=[1,0.5]'; wait
single40 warmup1-0.5 --set 'lr_warmup=[1,0.5]'; single40 warmup0.3-0.6 --set 'lr_warmup=[0.3,0.6]'; wait
single40 reft-amx --method reft --set rank=12; single40 reft-warmup1-0.5 --method reft --set rank=12 'lr_warmup=[1,0.5]'; wait
single40 defaults-amx; single40 reft-warmup0.3-0.6 --method reft --set rank=12 'lr_warmup=[0.3,0.6]'; wait
# On an AMD EPYC with AVX2 only (fp32): BaFT against ReFT at the same rank (24, ReFT's default
# since it became BaFT with W = I in everything but the gates), edit by edit, then ReFT's runs.
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/method_speed.json
for data in zsre counterfact; do
  $PY -m baft_core.bench --data $(val_files $data) --format $data --method reft --mode continual --edits 100 \
    --threads 1 --out $OUT/$data-continual-100-reft &
done
wait
$PY -m baft_core.bench --data $ZSRE --format zsre --method reft --mode single --edits 100 \
  --out $OUT/zsre-single-100-reft
# On an AMD EPYC with AVX512-BF16: fp16 weights with fp32 arithmetic (FBGEMM), `auto` on
# x86 since, against fp32 and bf16, against fp32 with every kernel library capped at AVX2, and
# BaFT against ReFT on them, each edit by edit; then the default runs on fp16 weights.
$PY bench/paired_speed.py --vary weights --edits 200 --out $OUT/weights_speed.json
$PY bench/paired_speed.py --vary weights-bf16 --edits 200 --out $OUT/weights_speed_vs_bf16.json
FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
  $PY bench/paired_speed.py --vary weights --edits 200 --out $OUT/ablation/weights_speed-avx2-isa.json
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/method_speed_fp16weights.json
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/ablation/method_speed_fp16weights-second.json
for data in zsre counterfact; do
  $PY -m baft_core.bench --data $(val_files $data) --format $data --method baft --mode continual --edits 100 \
    --threads 1 --dtype fp16-weights --out $OUT/ablation/$data-continual-100-baft-fp16weights &
done
wait
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode single --edits 100 \
  --dtype fp16-weights --out $OUT/ablation/zsre-single-100-baft-fp16weights
# ... and on `auto` (fp16 weights there): rank 32 against the defaults' 24, and a second seed.
$PY -m baft_core.bench --data $CF_VAL --format counterfact --mode continual --edits 100 --threads 1 \
  --set rank=32 --out $OUT/ablation/counterfact-continual-100-rank32-fp16weights &
$PY -m baft_core.bench --data $CF_VAL --format counterfact --mode continual --edits 100 --threads 1 \
  --set rank=32 --seed 1 --out $OUT/ablation/counterfact-continual-100-rank32-seed1-fp16weights
wait
$PY -m baft_core.bench --data $ZSRE --format zsre --mode continual --edits 100 --threads 1 \
  --set rank=32 --out $OUT/ablation/zsre-continual-100-rank32-fp16weights &
$PY -m baft_core.bench --data $CF_VAL --format counterfact --mode continual --edits 100 --threads 1 \
  --seed 1 --out $OUT/ablation/counterfact-continual-100-seed1-fp16weights
wait
# Every layer's bases drawn before any gate, so that BaFT starts from ReFT's R, A, b (with the old
# order BaFT's and ReFT's steps differed by the draw: BaFT's mean was higher on seed 0 and lower on
# seeds 1 and 2). The BaFT main runs (100 continual, 100 single, 1000 continual) were made again
# by their commands above, into the main folders; the runs they replaced were moved to
# ablation/*-baft-bf16 and ablation/*-1000-baft-fp16weights, and their commands name the main
# folders. Then the paired timings on that (slower) host; the next two were made before the route
# contexts' KV was computed once (prefix_cache.SharedPrefixes), the last two after.
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/method_speed_same_bases.json
$PY bench/paired_speed.py --vary weights --edits 200 --out $OUT/ablation/weights_speed-slower-epyc.json
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/method_speed_shared_contexts.json
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/ablation/method_speed_shared_contexts-second.json
# On an Intel Xeon with AMX-BF16: the frozen products kernel by kernel, then packed bf16 against fp16
# weights (before training steps took the math attention kernel), the attention kernels, BaFT
# against ReFT on the defaults there (the first of the two was made before the math kernel, into
# the main file, and moved to ablation/), and the 100 continual edits on both datasets there.
$PY bench/packed_products.py --out $OUT/packed_products.json
# ... again with a candidate kind, fp32 in oneDNN's layout (the first run had none), and with every
# kernel library capped at AVX2 (oneDNN then refuses bf16, so only fp32 and FBGEMM are timed).
$PY bench/packed_products.py --out $OUT/ablation/packed_products-fp32-onednn.json
FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
  $PY bench/packed_products.py --out $OUT/ablation/packed_products-avx2-isa.json
$PY bench/paired_speed.py --vary weights-bf16 --edits 200 --out $OUT/amx_bf16_speed.json
$PY bench/paired_speed.py --vary weights --edits 100 --out $OUT/ablation/weights_speed-amx-xeon.json
$PY bench/attention_kernel_speed.py --out $OUT/attention_kernel_speed.json
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/method_speed_amx_packed.json
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/ablation/method_speed_amx_packed-second.json
for data in zsre counterfact; do
  $PY -m baft_core.bench --data $(val_files $data) --format $data --method baft --mode continual --edits 100 \
    --threads 1 --out $OUT/ablation/$data-continual-100-baft-amx-packed &
done
wait
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode single --edits 100 \
  --out $OUT/ablation/zsre-single-100-baft-amx-packed
# On an AMD EPYC with AVX512-BF16 (no AMX): the frozen products kernel by kernel; packed bf16
# against fp16 weights (made at b1d72be, when `auto` read a feature table and chose fp16 weights
# there), and again with oneDNN capped below AVX512-BF16 (bf16 emulated). Then `auto` measured
# (baft_core/precision.py), and the quality runs on those defaults.
$PY bench/packed_products.py --out $OUT/ablation/packed_products-epyc-avx512bf16.json
$PY bench/paired_speed.py --vary weights-bf16 --edits 200 --out $OUT/ablation/weights_bf16_speed-epyc-avx512bf16.json
ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI \
  $PY bench/paired_speed.py --vary weights-bf16 --edits 100 --out $OUT/ablation/weights_bf16_speed-epyc-onednn-no-bf16.json
# BaFT against ReFT with the probe of four layers and the head (it chose bf16 there, as the final
# probe of a step's 13 layers does).
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/method_speed_measured_auto.json
# fp32 packed for oneDNN (`fp32-packed`) against fp16 weights, where the four-layer probe put it
# ahead, and under the AVX2 caps; then the final probe uncapped and under the caps.
ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI \
  $PY bench/paired_speed.py --vary packed-fp32 --edits 100 --out $OUT/ablation/packed_fp32_speed-epyc-onednn-no-bf16.json
FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
  $PY bench/paired_speed.py --vary packed-fp32 --edits 100 --out $OUT/ablation/packed_fp32_speed-avx2-isa.json
$PY bench/precision_probe.py --out $OUT/precision_probe.json
ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI $PY bench/precision_probe.py --out $OUT/ablation/precision_probe-onednn-no-bf16.json
FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
  $PY bench/precision_probe.py --out $OUT/ablation/precision_probe-avx2-isa.json
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/ablation/method_speed_measured_auto-second.json
# The quality runs on bf16 packed, chosen by the four-layer probe also at one thread; the final
# probe takes fp16 weights at one thread there (29.9 against 30.8 ms), so add --dtype bfloat16
# to these two to get the same runs.
for data in zsre counterfact; do
  $PY -m baft_core.bench --data $(val_files $data) --format $data --method baft --mode continual --edits 100 \
    --threads 1 --out $OUT/ablation/$data-continual-100-baft-epyc-packed &
done
wait
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode single --edits 100 \
  --out $OUT/ablation/zsre-single-100-baft-epyc-packed
# On an AVX2-only AMD EPYC (Zen 3, no AVX512): the probe, BaFT against ReFT (made before FBGEMM ran
# on both threads), FBGEMM's products on both threads against torch's one-thread op, BaFT against
# ReFT again, and the probe again.
$PY bench/precision_probe.py --out $OUT/ablation/precision_probe-epyc-zen3-avx2.json
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/ablation/method_speed-epyc-zen3-avx2.json
$PY bench/paired_speed.py --vary fp16-threads --edits 100 --out $OUT/ablation/fp16_threads_speed-epyc-zen3-avx2.json
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/ablation/method_speed-epyc-zen3-avx2-threaded.json
$PY bench/precision_probe.py --out $OUT/ablation/precision_probe-epyc-zen3-avx2-threaded.json
# ... the probe's ranking against whole edits there, where a step's time goes, and the quality.
$PY bench/paired_speed.py --vary packed-fp32 --edits 100 --out $OUT/ablation/packed_fp32_speed-epyc-zen3-avx2.json
$PY bench/paired_speed.py --vary weights --edits 100 --out $OUT/ablation/weights_speed-epyc-zen3-avx2.json
$PY bench/step_breakdown.py --out $OUT/ablation/step_breakdown-epyc-zen3-avx2.json
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode single --edits 100 \
  --out $OUT/ablation/zsre-single-100-baft-epyc-zen3-avx2
# Back on an AMD EPYC with AVX512-BF16 (a slower instance than the one above), FBGEMM on both
# threads: the probe, fp16 weights against packed bf16 (1.11x behind on one thread), where a
# step's time goes, BaFT against ReFT, and the quality.
$PY bench/precision_probe.py --out $OUT/ablation/precision_probe-epyc-avx512bf16-threaded.json
$PY bench/paired_speed.py --vary weights-bf16 --edits 200 --out $OUT/ablation/weights_bf16_speed-epyc-avx512bf16-threaded.json
$PY bench/step_breakdown.py --out $OUT/ablation/step_breakdown-epyc-avx512bf16.json
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode single --edits 100 \
  --out $OUT/ablation/zsre-single-100-baft-epyc-avx512bf16-threaded
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/ablation/method_speed-epyc-avx512bf16-threaded.json
# Each sealed block within its answer's window (`answer_window`: on a prompt it opens, the last P
# prompt positions and the answer's first T - 1 tokens; no continuation term), on the AVX512-BF16
# EPYC: the BaFT main runs again (the ones they replaced were moved to ablation/*-baft-continuation;
# their commands name the main folders), the window against blocks that act on every generated
# token (the defaults before) on 100 continual edits side by side and edit by edit in one run,
# and BaFT against ReFT.
for data in zsre counterfact; do
  $PY -m baft_core.bench --data $(val_files $data) --format $data --method baft --mode continual --edits 100 \
    --threads 1 --out $OUT/$data-continual-100-baft &
done
wait
for data in zsre counterfact; do
  $PY -m baft_core.bench --data $(val_files $data) --format $data --method baft --mode continual --edits 100 \
    --threads 1 --set answer_window=false --out $OUT/ablation/$data-continual-100-nowindow &
done
wait
# (The single-edit run went first and again last: the first, in a slow hour of the host, was
# moved to ablation/zsre-single-100-baft-window-first.)
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode single --edits 100 \
  --out $OUT/ablation/zsre-single-100-baft-window-first
$PY bench/paired_speed.py --vary window --edits 200 --out $OUT/ablation/window_speed-epyc-avx512bf16.json
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/method_speed_window.json
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode single --edits 100 \
  --out $OUT/zsre-single-100-baft
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode continual --edits 1000 \
  --threads 1 --out $OUT/zsre-continual-1000-baft &
$PY -m baft_core.bench --data $CF_TRAIN --format counterfact --method baft --mode continual --edits 1000 \
  --threads 1 --out $OUT/counterfact-continual-1000-baft &
wait
$PY bench/summarize.py
