#!/usr/bin/env bash
# Regenerates every benchmark result under bench/results/ (about 1.5 hours on two CPU cores).
# Each summary.json records the exact command that produced it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
ZSRE="$DATA/zsre/zsre_eval_portability_dev.json $DATA/zsre/zsre_train_1k.json"
CF_VAL="$DATA/counterfact/counterfact_val.json"
CF_TRAIN="$DATA/counterfact/counterfact_train.json"
OUT=bench/results

# Single edits: speed (timed alone, two threads) and quality.
for method in baft reft; do
  $PY -m baft_core.bench --data $ZSRE --format zsre --method $method --mode single --edits 100 \
    --out $OUT/zsre-single-100-$method
done
# Continual, 100 edits: ZsRE and CounterFact.
for method in baft reft; do
  $PY -m baft_core.bench --data $ZSRE --format zsre --method $method --mode continual --edits 100 \
    --out $OUT/zsre-continual-100-$method
  $PY -m baft_core.bench --data $CF_VAL --format counterfact --method $method --mode continual --edits 100 \
    --out $OUT/counterfact-continual-100-$method
done
# Batched: 100 edits in batches of 10.
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode batched --edits 100 --batch-size 10 \
  --out $OUT/zsre-batched-100-baft
# Continual, 1000 edits.
$PY -m baft_core.bench --data $ZSRE --format zsre --method baft --mode continual --edits 1000 \
  --out $OUT/zsre-continual-1000-baft
