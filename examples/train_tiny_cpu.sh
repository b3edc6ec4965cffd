#!/usr/bin/env bash
# Tiny DeepSeek-V3 (preset `tiny`: 4 layers, 8 routed experts + 1 shared, MTP depth 1) on CPU with gloo.
#
# Layout: one process by default (TP1 PP1 EP1 DP1). With NPROC=2 EP=2 the two processes are two
# data-parallel ranks whose experts are split over an expert-parallel group of 2 (4 experts each).
# 300 steps of 8 x 64 tokens on the built-in corpus; checkpoints every 100 steps and the wandb run (offline
# unless WANDB_API_KEY is set) go to a fresh RUN_DIR (default runs/tiny-<time>), so no earlier run is
# overwritten; runs/latest links to the newest. Any extra arguments are appended, e.g.
#   examples/train_tiny_cpu.sh --train-iters 50
#   NPROC=2 EP=2 examples/train_tiny_cpu.sh
#   NPROC=4 PP=2 SCHEDULE=dualpipev examples/train_tiny_cpu.sh --micro-batch-size 2 --global-batch-size 16
# (DualPipe/DualPipeV need at least 2 x PP micro-batches per data-parallel rank.)
set -euo pipefail

NPROC="${NPROC:-1}"   # processes on this machine (data-parallel ranks)
EP="${EP:-1}"         # expert-parallel size; must divide NPROC
TP="${TP:-1}"         # tensor-parallel size
PP="${PP:-1}"         # pipeline-parallel size
SCHEDULE="${SCHEDULE:-1f1b}"   # pipeline schedule: 1f1b, dualpipe or dualpipev
RUN_DIR="${RUN_DIR:-runs/tiny-$(date +%Y%m%d-%H%M%S)}"
# runs/latest always points at the newest run: `dsv3-generate --load runs/latest/checkpoints ...`
mkdir -p "$RUN_DIR" runs && ln -sfn "$(cd "$RUN_DIR" && pwd)" runs/latest

ARGS=(
  --model-spec dsv3 --preset tiny
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
  --pipeline-schedule "$SCHEDULE"
  --seq-length 64 --micro-batch-size 8 --train-iters 300
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20
  --weight-decay 0.1 --adam-beta2 0.95
  --eval-interval 100 --eval-iters 4
  --save "$RUN_DIR/checkpoints" --save-interval 100
  --wandb-project megatron-dsv3 --wandb-exp-name tiny-cpu --wandb-save-dir "$RUN_DIR"
)

if [[ "$NPROC" -gt 1 ]]; then
  exec torchrun --standalone --nproc-per-node "$NPROC" -m megatron_dsv3.training.pretrain "${ARGS[@]}" "$@"
else
  exec dsv3-pretrain "${ARGS[@]}" "$@"
fi
