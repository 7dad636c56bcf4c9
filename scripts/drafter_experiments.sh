#!/usr/bin/env bash
# Train the shipped DSpark drafter in its two stages (v5, then v6 from it) and v5's no-Markov-head ablation
# (same budget), then evaluate them on the dev prompts and benchmark the shipped one end to end. Every stage
# resumes; logs and results land in logs/ and results/. The first training generates the greedy data; the
# others reuse it (stage 2 adds its sampled answers).
# Usage: bash scripts/drafter_experiments.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs results
DSPARK=.venv/bin/dspark
CONFIG=configs/drafter_smollm2.yaml
STAGE1=drafters/smollm2-135m-dspark            # v5; configs/drafter_smollm2_v6.yaml starts from it
MAIN=drafters/smollm2-135m-dspark-v6
ABLATION=drafters/smollm2-135m-parallel

$DSPARK train --config $CONFIG --output $STAGE1 > logs/train_stage1.log 2>&1
$DSPARK train --config configs/drafter_smollm2_v6.yaml --output $MAIN > logs/train_main.log 2>&1
$DSPARK train --config $CONFIG --output $ABLATION --no-markov-head > logs/train_ablation.log 2>&1
for dir in $STAGE1 $MAIN $ABLATION; do
  name=$(basename $dir)
  $DSPARK eval --proposer dspark --drafter $dir --num-threads 2 --output results/eval_$name.json \
    > logs/eval_$name.log 2>&1
done
$DSPARK bench --num-prompts 24 --max-tokens 128 --num-speculative-tokens 4 --drafters $MAIN \
  --policies fixed scheduler --no-compare-transformers --no-cost-curve --num-threads 2 --output results/bench_drafter.json > logs/bench_drafter.log 2>&1
