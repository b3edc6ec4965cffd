#!/usr/bin/env bash
# DeepSeek-V3 671B (37B active; 61 layers, first 3 dense, 256 routed + 1 shared experts, top-8 over
# node-limited groups, MTP depth 1) through Megatron-LM's training loop (megatron.training.pretrain).
#
# Layout (run this script once per node; 8 GPUs per node):
#   TP1 x PP16 x EP64. The technical report trains on 2048 H800s (256 nodes): PP16 gives 16 stages of ~4
#   layers, the 1024-way data-parallel group per stage is cut into EP64 expert groups (4 experts per GPU).
#   Smaller clusters: PP=8 EP=32 NNODES=... (e.g. 64 nodes = 512 GPUs, DP64). DP = 8*NNODES / PP.
#   61 layers do not split evenly over 16 stages: the first stage (with the embedding) takes FIRST=4 layers,
#   the last (with the head and MTP) LAST=1, and the 14 middle stages 4 each. For PP=8 use FIRST=7 LAST=6.
# Recipe: seq 4096, global batch ramped 3072 -> 15360 over the first 469B tokens, AdamW(0.9, 0.95, wd 0.1),
#   peak lr 2.2e-4 after 2000 warm-up steps, cosine decay to 2.2e-5, clip 1.0, bias update speed 1e-3,
#   sequence-wise balance loss 1e-4, MTP loss weight 0.3, FP8 block-wise (E4M3, 1x128 / 128x128 scales).
# Environment (all nodes): MASTER_ADDR, MASTER_PORT (default 29500), NNODES, NODE_RANK, DATA_PATH,
# TOKENIZER_MODEL; optional PP, EP, SAVE_DIR. Example, on node 3 of 256:
#   MASTER_ADDR=node000 NNODES=256 NODE_RANK=3 DATA_PATH=/data/v3_text_document \
#   TOKENIZER_MODEL=deepseek-ai/DeepSeek-V3 examples/train_v3_671b.sh
set -euo pipefail

: "${MASTER_ADDR:?set MASTER_ADDR to the rank-0 node}"
: "${NNODES:?set NNODES}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
: "${DATA_PATH:?set DATA_PATH to a Megatron .bin/.idx prefix}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to a Hugging Face tokenizer name or directory}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
PP="${PP:-16}"
EP="${EP:-64}"
FIRST="${FIRST:-4}"
LAST="${LAST:-1}"
SAVE_DIR="${SAVE_DIR:-runs/v3-671b/checkpoints}"

ARGS=(
  --model-spec dsv3 --preset v3-671b
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
  --decoder-first-pipeline-num-layers "$FIRST" --decoder-last-pipeline-num-layers "$LAST"
  --transformer-impl transformer_engine --bf16
  --fp8-format e4m3 --fp8-recipe blockwise
  --moe-token-dispatcher-type alltoall --moe-grouped-gemm
  --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3
  --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4
  --mtp-num-layers 1 --mtp-loss-scaling-factor 0.3
  --seq-length 4096
  --micro-batch-size 1 --global-batch-size 15360 --rampup-batch-size 3072 3072 114500000
  --train-iters 1000000
  --lr 2.2e-4 --min-lr 2.2e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --use-distributed-optimizer
  --recompute-granularity selective --recompute-modules layernorm mla_up_proj moe_act
  --data-path "$DATA_PATH" --split 99,1,0
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
  --log-interval 1 --eval-interval 2000 --eval-iters 10
  --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 500 --ckpt-format torch_dist
  --wandb-project "${WANDB_PROJECT:-megatron-dsv3}" --wandb-exp-name "${WANDB_EXP_NAME:-v3-671b}"
)

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_dsv3.megatron_lm "${ARGS[@]}" "$@"
