#!/usr/bin/env bash
# Long-context stage of the demo model with InfLLM v2 sparse attention (issue 4 acceptance 6;
# spec §2.3: short-dense -> long-sparse; §1.3: LongRoPE/YaRN extension). Every stage is a
# `minicpm4` command or a script of this repository. Run from the repository root:
#     recipes/long_context/train.sh [WORK_DIR]        (default WORK_DIR: out/long)
# Stages: tokenize ../shared/data/gutenberg (holding out austen-persuasion); cut the training
# books into 2048-token documents, half of them with a planted pass key; continue training the
# bundled demo model (minicpm4/assets/demo, trained dense at 512 tokens) at 2048 tokens with
# --context 32k and sparse attention; held-out loss before / after; export; pass-key retrieval
# at 4K-16K before / after, sparse and dense. Settings and results: README.md here and
# benchmarks/results/2026-11_cpu-2core_long_context.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-out/long}
BIN=.venv/bin/minicpm4
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
NICE="nice -n 10"
# InfLLM v2 at our lengths: blocks of 64, 1 sink block + 4 local blocks (256 tokens) + 12 chosen
# = at most 16 blocks (1024 tokens) per query; dense below 1024 keys.
SPARSE=(--sparse-topk 12 --sparse-window 256 --sparse-dense-len 1024)
$NICE $BIN data tokenize ../shared/data/gutenberg --holdout austen-persuasion --out "$WORK/data"
$NICE $BIN data long-context "$WORK/data/train" --out "$WORK/data/train2k" --seq-len 2048 \
    --passkey-fraction 0.5 --seed 0
RESUME=()
[ -d "$WORK/run/checkpoints" ] && RESUME=(--resume)
$NICE $BIN train --init-from minicpm4/assets/demo --context 32k "${SPARSE[@]}" \
    --data "$WORK/data/train2k" --eval-data "$WORK/data/eval" --run-dir "$WORK/run" \
    --seq-len 2048 --batch-size 2 --grad-accum 1 --steps 120 --lr 1e-3 --weight-decay 0.1 \
    --warmup-steps 6 --decay-fraction 0.2 --decay-type exponential --min-lr-ratio 0.1 \
    --eval-interval 0 --eval-batches 4 --checkpoint-interval 20 --keep 2 --log-interval 1 \
    --dtype bfloat16 --seed 0 "${RESUME[@]}"
$NICE $BIN export "$WORK/run" "$WORK/model" --dtype bfloat16
for M in minicpm4/assets/demo "$WORK/model"; do    # held-out loss at 2048 tokens
    for MODE in "${SPARSE[*]}" --dense; do
        # shellcheck disable=SC2086
        $NICE $BIN eval --model "$M" --data "$WORK/data/eval" --seq-len 2048 --batch-size 2 \
            --batches 4 --context 32k $MODE
    done
done | tee "$WORK/eval.txt"
$BIN report "$WORK/run" --plot recipes/long_context/loss_curve.png \
    --title "demo model, long-sparse stage: 120 steps x 2 x 2048 tokens, InfLLM v2 on" \
    > "$WORK/summary.txt"
$NICE .venv/bin/python benchmarks/long_context_retrieval.py \
    --model before=minicpm4/assets/demo --model "after=$WORK/model" --context 32k \
    --lengths 4096,8192,16384 --depths 0.1,0.5,0.9 --modes sparse,dense \
    --sparse-topk 12 --sparse-window 256 --sparse-dense-len 1024 \
    --json "$WORK/retrieval.json" | tee "$WORK/retrieval.txt"
$NICE .venv/bin/python benchmarks/long_context_retrieval.py \
    --model before=minicpm4/assets/demo --model "after=$WORK/model" --context 32k \
    --lengths 1024,2048 --depths 0.1,0.5,0.9 --trials 2 --modes sparse,dense \
    --json "$WORK/retrieval_short.json" | tee "$WORK/retrieval_short.txt"
$NICE .venv/bin/python benchmarks/long_context_retrieval.py \
    --model before=minicpm4/assets/demo --model "after=$WORK/model" --context 32k \
    --lengths 256,512 --depths 0.1,0.5,0.9 --trials 2 --modes dense | tee "$WORK/retrieval_tiny.txt"
