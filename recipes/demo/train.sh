#!/usr/bin/env bash
# Recipe of the bundled demo model (minicpm4/assets/demo), issue 3: every stage is a
# `minicpm4` command. Run from the repository root after ./test.sh (or scripts/bootstrap.sh):
#     recipes/demo/train.sh [WORK_DIR]        (default WORK_DIR: out/demo)
# Stages: tokenize ../shared/data/gutenberg with the bundled MiniCPM4 tokenizer, holding out
# austen-persuasion; μP + WSD pre-training with the MTP head (bf16 autocast, 2 CPU threads);
# held-out evaluation; loss curve; bf16 export of the final weights into minicpm4/assets/demo.
# Hyper-parameters: see recipes/demo/README.md (learning rate from `minicpm4 tune lr-sweep`).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-out/demo}
BIN=.venv/bin/minicpm4
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
$BIN data tokenize ../shared/data/gutenberg --holdout austen-persuasion --out "$WORK/data"
RESUME=()
[ -d "$WORK/run/checkpoints" ] && RESUME=(--resume)   # an interrupted run continues exactly
$BIN train --model-config recipes/demo/config.json --mtp-lambda 0.3 \
    --data "$WORK/data/train" --eval-data "$WORK/data/eval" --run-dir "$WORK/run" \
    --seq-len 512 --batch-size 8 --steps 800 --lr 0.001953125 --weight-decay 0.1 \
    --warmup-steps 40 --decay-fraction 0.2 --decay-type exponential --min-lr-ratio 0.05 \
    --eval-interval 100 --eval-batches 8 --checkpoint-interval 100 --keep 2 \
    --log-interval 10 --dtype bfloat16 --seed 0 "${RESUME[@]}"
$BIN eval --model "$WORK/run/checkpoints/step-00000800" --data "$WORK/data/eval" --seq-len 512 \
    --batch-size 8 | tee "$WORK/eval.txt"
$BIN report "$WORK/run" --plot recipes/demo/loss_curve.png \
    --title "demo model: 25.1M params, MTP head, 800 steps x 4096 tokens" > "$WORK/summary.txt"
rm -f minicpm4/assets/demo/*.safetensors minicpm4/assets/demo/training_log.json
$BIN export "$WORK/run" minicpm4/assets/demo --dtype bfloat16
