#!/usr/bin/env bash
# Regenerates every result under bench/results/ with today's code (about 10 hours on two CPU
# cores), then bench/results/README.md. Each summary.json records the command that made it.
#
# Where a committed result came from older code, the line that writes it says so: it repeats
# the same lever on today's code, so its numbers will differ from the committed ones (mostly
# `rep` and the steps; the older code is in git history at the run's date).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
ZSRE="$DATA/zsre/zsre_eval_portability_dev.json $DATA/zsre/zsre_train_1k.json"
CF_VAL="$DATA/counterfact/counterfact_val.json"
CF_TRAIN="$DATA/counterfact/counterfact_train.json"
OUT=bench/results
bench() { $PY -m baft_core.bench "$@"; }
pair() {  # two runs side by side, one thread each: ZsRE and CounterFact val, continual, 100 edits
  local name=$1; shift
  bench --data $ZSRE --format zsre --mode continual --edits 100 --threads 1 "$@" --out $OUT/${name/DATA/zsre} &
  bench --data $CF_VAL --format counterfact --mode continual --edits 100 --threads 1 "$@" \
    --out $OUT/${name/DATA/counterfact} &
  wait
}

# ----- Main runs: today's defaults (docs/benchmarks.md, "Current defaults") -----
pair DATA-continual-100-baft --method baft
bench --data $ZSRE --format zsre --method baft --mode continual --edits 1000 --threads 1 \
  --out $OUT/zsre-continual-1000-baft &
bench --data $CF_TRAIN --format counterfact --method baft --mode continual --edits 1000 --threads 1 \
  --piqa $DATA/locality/piqa_valid.jsonl --out $OUT/counterfact-continual-1000-baft &
wait
# All 10,000 CounterFact train records, continual, with the service's own negatives, a sample of
# 1,000 measured on the final model (about two hours on one thread each).
bench --data $CF_TRAIN --format counterfact --method baft --mode continual --edits 10000 --threads 1 \
  --unrelated builtin --evaluate 1000 --out $OUT/counterfact-continual-10000-baft &
# The same with all of a key's earlier subject tokens needed (fewer prompts of other subjects open
# a block, fewer of a subject's other names do).
bench --data $CF_TRAIN --format counterfact --method baft --mode continual --edits 10000 --threads 1 \
  --unrelated builtin --evaluate 1000 --set route_prefix_needed=null \
  --out $OUT/ablation/counterfact-continual-10000-prefix-needed-null &
wait
for run in counterfact-continual-10000-baft ablation/counterfact-continual-10000-prefix-needed-null; do
  $PY bench/locality_by_subject.py $OUT/$run
  $PY bench/edit_time_by_position.py $OUT/$run --window 1000
done
bench --data $ZSRE --format zsre --method baft --mode single --edits 100 --threads 1 --out $OUT/zsre-single-100-baft
$PY bench/paired_speed.py --vary method --edits 200 --out $OUT/method_speed_window.json
# KnowEdit (other facts of the edited subject) and a same-subject set, with the service's own
# negatives (--unrelated builtin).
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin --out $OUT/knowedit-counterfact-continual-714-baft &
bench --data $DATA/knowedit/wiki_recent_dev.json --format knowedit --mode continual --edits 285 \
  --threads 1 --unrelated builtin --out $OUT/knowedit-recent-continual-285-baft &
wait
$PY bench/locality_by_wording.py $OUT/knowedit-counterfact-continual-714-baft
$PY bench/locality_by_subject_ending.py $OUT/knowedit-counterfact-continual-714-baft
# How many edits of each set spell their subject (spelled_edits.json).
rm -f $OUT/spelled_edits.json
for set in "$ZSRE --format zsre --edits 100" "$ZSRE --format zsre --edits 1000" \
    "$CF_VAL --format counterfact --edits 100" "$CF_TRAIN --format counterfact --edits 1000" \
    "$CF_TRAIN --format counterfact --edits 10000" \
    "$DATA/knowedit/wiki_counterfact_dev.json --format knowedit --edits 714" \
    "$DATA/knowedit/wiki_recent_dev.json --format knowedit --edits 285" \
    "$DATA/knowedit/wikibio_dev.json --format wikibio --edits 464" \
    "$DATA/mquake/mquake_hard_dev.json --format mquake --edits 450" \
    "$OUT/same-subject/wiki_recent_same_subject.json --format knowedit --edits 200"; do
  $PY bench/spelled_edits.py --data $set
done
$PY bench/locality_by_wording.py $OUT/knowedit-recent-continual-285-baft
# Which blocks the prompts open with and without the keys for a subject's other names
# (alias_routing.json; routing alone: each edit leaves its keys and relation states untrained).
rm -f $OUT/alias_routing.json
$PY bench/alias_routing.py --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --edits 714
$PY bench/alias_routing.py --data $ZSRE --format zsre --edits 1000 --with-variants-only
$PY bench/alias_routing.py --data $DATA/counterfact/counterfact_train.json --format counterfact --edits 3000 \
  --with-variants-only
$PY bench/paired_speed.py --vary relations --edits 30 --threads 1 --out $OUT/relations_speed.json
# Today's edit against the one of the commit the specificity work started from.
$PY bench/revision_speed.py --revision 63b7880 --edits 30 --threads 1 --out $OUT/revision_speed.json
$PY bench/paired_speed.py --vary names --format knowedit --data $DATA/knowedit/wiki_counterfact_dev.json --edits 40 \
  --threads 1 --out $OUT/names_speed.json
bench --data $OUT/same-subject/wiki_recent_same_subject.json --format knowedit --mode continual \
  --edits 200 --threads 1 --unrelated builtin --out $OUT/same-subject-continual-200-baft
# Datasets of other shapes: WikiBio (a passage continued by a new sentence; its locality asks
# other facts of the same person) and MQuAKE (chains of edits, multi-hop questions).
bench --data $DATA/knowedit/wikibio_dev.json --format wikibio --mode continual --edits 464 \
  --threads 1 --unrelated builtin --out $OUT/knowedit-wikibio-continual-464-baft &
bench --data $DATA/mquake/mquake_hard_dev.json --format mquake --mode continual --edits 450 \
  --threads 1 --unrelated builtin --out $OUT/mquake-continual-450-baft &
wait

# ReFT (one block for all edits, W = I).
pair DATA-continual-100-reft --method reft
bench --data $ZSRE --format zsre --method reft --mode single --edits 100 --threads 1 --out $OUT/zsre-single-100-reft
# The paper's layout, one BaFT block for all edits, at rank 12 and replaying 32 earlier edits a
# step (the defaults of that layout, in git history).
pair DATA-continual-100-baft-oneblock --set block_edits=0 rank=12 beta=0.05 replay_size=32

# ----- Ablation (docs/benchmarks.md, "Ablation"): today's defaults but one lever -----
# Without the relation check (relations.py).
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin --set relation_threshold=0 \
  --out $OUT/ablation/knowedit-counterfact-continual-714-no-relation-check
# Prompts on another name of the subject held to the relation check's plain rule
# (relation_other_name_ratio=1): the main run before the ratio existed.
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin --set relation_other_name_ratio=1 \
  --out $OUT/ablation/knowedit-counterfact-continual-714-other-name-ratio1
$PY bench/locality_by_wording.py $OUT/ablation/knowedit-counterfact-continual-714-other-name-ratio1
$PY bench/locality_by_subject_ending.py $OUT/ablation/knowedit-counterfact-continual-714-other-name-ratio1
# A key's earlier subject tokens in the positions just before it, no middle name between (routing.py).
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin --set route_prefix_gap=0 \
  --out $OUT/ablation/knowedit-counterfact-continual-714-gap0
pair ablation/DATA-continual-100-nowindow --set answer_window=false
pair ablation/DATA-continual-100-sealed-all --set sealed_rank=null
# The request's own locality prompts, sent as a user would (projected out of the edit's block).
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin --send-locality \
  --out $OUT/ablation/knowedit-counterfact-continual-714-send-locality &
bench --data $CF_VAL --format counterfact --mode continual --edits 100 --threads 1 --send-locality \
  --out $OUT/ablation/counterfact-continual-100-send-locality &
wait
bench --data $DATA/knowedit/wiki_recent_dev.json --format knowedit --mode continual --edits 285 \
  --threads 1 --unrelated builtin --send-locality --out $OUT/ablation/knowedit-recent-continual-285-send-locality &
bench --data $OUT/same-subject/wiki_recent_same_subject.json --format knowedit --mode continual \
  --edits 200 --threads 1 --unrelated builtin --send-locality \
  --out $OUT/ablation/same-subject-continual-200-send-locality &
wait
# sealed_gates: committed results were made while it was the default (2026-12-05); the KnowEdit
# and same-subject runs use the service's own negatives (--unrelated builtin).
pair ablation/DATA-continual-100-baft-gated --set sealed_gates=true
$PY bench/paired_speed.py --vary gates --edits 60 --threads 1 --out $OUT/gates_speed.json
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin --set sealed_gates=true \
  --out $OUT/ablation/knowedit-counterfact-continual-714-baft-gated &
bench --data $DATA/knowedit/wiki_recent_dev.json --format knowedit --mode continual --edits 285 \
  --threads 1 --unrelated builtin --set sealed_gates=true \
  --out $OUT/ablation/knowedit-recent-continual-285-baft-gated &
wait
bench --data $OUT/same-subject/wiki_recent_same_subject.json --format knowedit --mode continual \
  --edits 200 --threads 1 --unrelated builtin --set sealed_gates=true \
  --out $OUT/ablation/same-subject-continual-200-baft-gated
# Early stop at a looser loss (the default stops at 0.01: its pair is the main 100-edit runs).
pair ablation/DATA-continual-100-stop0.05 --set stop_loss=0.05
# Routing: no replay of the sealed edits that share the new edit's route; one route key per edit
# (the prompt alone) instead of one after each route context too.
bench --data $ZSRE --format zsre --mode continual --edits 100 --threads 1 --set route_neighbours=0 \
  --out $OUT/ablation/zsre-continual-100-no-neighbours &
bench --data $CF_VAL --format counterfact --mode continual --edits 100 --threads 1 --set 'route_contexts=[]' \
  --out $OUT/ablation/counterfact-continual-100-onekey &
wait
# Rank of a block, 100 single CounterFact edits (24 is the default).
for rank in 4 12 24; do
  bench --data $CF_VAL --format counterfact --mode single --edits 100 --threads 1 --set rank=$rank \
    --out $OUT/ablation/counterfact-single-100-rank$rank
done
$PY bench/paired_speed.py --vary window --edits 200 --out $OUT/ablation/window_speed-epyc-avx512bf16.json
# The keys for a subject's other names off, then spelled route keys too; the relation check read
# at the routing layer, and at a stricter cosine, each with its pair: the defaults on the same host
# (on WikiData_counterfact, the layer measured without spelling, against spelling off). The
# committed runs were made where `auto` chose fp16 weights (a CPU without bf16 arithmetic);
# `--dtype fp16-weights` makes the same choice on any CPU. Each committed run was made before the
# options it turns off existed (the same code paths); the token-class run is bf16.
F16="--dtype fp16-weights"
NO_ALIAS_KEYS="route_prefix_needed=null route_name_variants=false route_spelling_normalised=false route_prefix_word=false"
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin $F16 --set $NO_ALIAS_KEYS \
  --out $OUT/ablation/knowedit-counterfact-continual-714-no-alias-keys &
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin --set route_spelling_normalised=false route_prefix_word=false \
  --out $OUT/ablation/knowedit-counterfact-continual-714-id-spelling &
wait
# One earlier key token suffices (route_prefix_needed=1), off alone: made on an Intel Xeon (bf16),
# the main run on an AMD EPYC (bf16).
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin --set route_prefix_needed=null route_prefix_word=false \
  --out $OUT/ablation/knowedit-counterfact-continual-714-prefix-needed-null
# The matched word's pieces in place (route_prefix_word), off: the main runs before it existed.
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin --set route_prefix_word=false \
  --out $OUT/ablation/knowedit-counterfact-continual-714-prefix-word-false &
bench --data $DATA/counterfact/counterfact_train.json --format counterfact --method baft --mode continual \
  --edits 1000 --threads 1 --piqa $DATA/locality/piqa_valid.jsonl --set route_prefix_word=false \
  --out $OUT/ablation/counterfact-continual-1000-prefix-word-false &
wait
$PY bench/locality_by_wording.py $OUT/ablation/knowedit-counterfact-continual-714-prefix-word-false
$PY bench/locality_by_subject_ending.py $OUT/ablation/knowedit-counterfact-continual-714-prefix-word-false
for run in no-alias-keys id-spelling; do
  $PY bench/locality_by_wording.py $OUT/ablation/knowedit-counterfact-continual-714-$run
  $PY bench/locality_by_subject_ending.py $OUT/ablation/knowedit-counterfact-continual-714-$run
done
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin $F16 --set route_spelling=false $NO_ALIAS_KEYS \
  --out $OUT/ablation/knowedit-counterfact-continual-714-no-spelling &
bench --data $DATA/knowedit/wiki_counterfact_dev.json --format knowedit --mode continual --edits 714 \
  --threads 1 --unrelated builtin $F16 --set route_spelling=false relation_layer=4 $NO_ALIAS_KEYS \
  --out $OUT/ablation/knowedit-counterfact-continual-714-relation-layer4 &
wait
$PY bench/locality_by_subject_ending.py $OUT/ablation/knowedit-counterfact-continual-714-no-spelling
bench --data $DATA/knowedit/wiki_recent_dev.json --format knowedit --mode continual --edits 285 \
  --threads 1 --unrelated builtin $F16 --out $OUT/ablation/knowedit-recent-continual-285-fp16 &
bench --data $DATA/knowedit/wiki_recent_dev.json --format knowedit --mode continual --edits 285 \
  --threads 1 --unrelated builtin $F16 --set relation_threshold=0.85 \
  --out $OUT/ablation/knowedit-recent-continual-285-threshold0.85 &
wait
bench --data $CF_VAL --format counterfact --mode continual --edits 100 --threads 1 $F16 \
  --out $OUT/ablation/counterfact-continual-100-fp16 &
bench --data $CF_VAL --format counterfact --mode continual --edits 100 --threads 1 $F16 \
  --set relation_threshold=0.85 --out $OUT/ablation/counterfact-continual-100-threshold0.85 &
wait
$PY bench/paired_speed.py --vary relations --edits 30 --threads 1 --set checked:relation_layer=4 \
  --out $OUT/ablation/relations_speed-layer4.json

# ----- Speed of single parts (older code, kept for the design notes in docs/method.md) -----
$PY bench/paired_speed.py --vary weights --edits 200 --out $OUT/weights_speed.json
$PY bench/prefix_cache_speed.py --edits 10 --repeats 3 --out $OUT/prefix_cache_speedup.json
$PY bench/output_head_speed.py --out $OUT/output_head_speed.json
$PY bench/precision_probe.py --out $OUT/precision_probe.json
$PY bench/repeat_baseline.py --out $OUT/repeat_baseline.json

$PY bench/summarize.py
# Routing's cost per prompt at 10, 1,000 and 10,000 synthetic edits, an edit's time at 10,000
# against 10, and route keys in bf16 against fp32 (docs/benchmarks.md, docs/method.md).
$PY bench/routing_cost.py
$PY bench/edit_time_growth.py
$PY bench/route_key_dtype.py
# What the unedited model answers to MQuAKE's multi-hop questions (docs/benchmarks.md).
$PY bench/mquake_unedited.py

# The service's measurements (docs/serving.md, docs/operations.md) have their own commands:
# bench/service_bench.py, bench/gc_pause.py, bench/startup_load.py, bench/service_storage.py and
# bench/fault_injection.py (see bench/results/service/ and bench/results/fault_injection/).
