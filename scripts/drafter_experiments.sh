#!/usr/bin/env bash
# Train the shipped DSpark drafter and its no-Markov-head ablation (same budget, one after the other), then
# evaluate both on the dev prompts and benchmark the drafter end to end. Every stage resumes; logs and
# results land in logs/ and results/. Usage: bash scripts/drafter_experiments.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs results
DSPARK=.venv/bin/dspark
CONFIG=configs/drafter_smollm2.yaml
MAIN=drafters/smollm2-135m-dspark
ABLATION=drafters/smollm2-135m-parallel

# Data generation is shared: run it once before the two trainings start.
.venv/bin/python - <<'PY'
import yaml
from dspark.drafters.dspark.data import generate_dataset
from dspark.drafters.dspark.train import TrainConfig
cfg = TrainConfig.model_validate(yaml.safe_load(open("configs/drafter_smollm2.yaml")))
generate_dataset(cfg.resolved_data_dir(), tuple(cfg.target_layers), cfg.num_prompts, cfg.max_response_tokens)
PY
$DSPARK train --config $CONFIG --output $MAIN > logs/train_main.log 2>&1
$DSPARK train --config $CONFIG --output $ABLATION --no-markov > logs/train_ablation.log 2>&1
for name in main ablation; do
  dir=$([ $name = main ] && echo $MAIN || echo $ABLATION)
  $DSPARK eval --proposer dspark --drafter $dir --gamma 7 --threads 2 --output results/eval_$name.json \
    > logs/eval_$name.log 2>&1
done
$DSPARK bench --num-prompts 24 --max-tokens 128 --gammas 4 --drafters $MAIN --policies fixed scheduler \
  --no-transformers --no-cost-curve --threads 2 --output results/bench_drafter.json > logs/bench_drafter.log 2>&1
