#!/usr/bin/env bash
# DeepSeek-V2-Lite shape (16B total, 2.4B active: 27 layers, 64 routed + 2 shared experts, top-6, MLA without
# q compression) on one node of 8 GPUs, through Megatron-LM's training loop (megatron.training.pretrain).
#
# Layout: TP1 x PP1 x EP8 over 8 GPUs, so DP8 for the dense parts and 8 experts per GPU; bf16, Transformer
# Engine modules, 4096-token sequences, global batch 512 sequences (8 DP ranks x micro-batch 1 x 64
# gradient-accumulation steps). Data and tokenizer come from the environment:
#   DATA_PATH=/data/corpus_text_document TOKENIZER_MODEL=deepseek-ai/DeepSeek-V2-Lite \
#   examples/train_v2_lite_8gpu.sh [extra Megatron-LM flags]
set -euo pipefail

: "${DATA_PATH:?set DATA_PATH to a Megatron .bin/.idx prefix}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to a Hugging Face tokenizer name or directory}"
NPROC="${NPROC:-8}"
SAVE_DIR="${SAVE_DIR:-runs/v2-lite/checkpoints}"
GLOBAL_BATCH="${GLOBAL_BATCH:-512}"
TRAIN_ITERS="${TRAIN_ITERS:-20000}"

ARGS=(
  --model-spec dsv3 --preset v2-lite
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size 8
  --transformer-impl transformer_engine --bf16
  --moe-token-dispatcher-type alltoall --moe-grouped-gemm
  --seq-length 4096
  --micro-batch-size 1 --global-batch-size "$GLOBAL_BATCH" --train-iters "$TRAIN_ITERS"
  --lr 4.2e-4 --min-lr 4.2e-5 --lr-decay-style cosine --lr-warmup-iters 2000
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --use-distributed-optimizer
  --data-path "$DATA_PATH" --split 99,1,0
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
  --log-interval 10 --eval-interval 1000 --eval-iters 10
  --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 1000
  --wandb-project "${WANDB_PROJECT:-megatron-dsv3}" --wandb-exp-name "${WANDB_EXP_NAME:-v2-lite-8gpu}"
)

exec torchrun --standalone --nproc-per-node "$NPROC" -m megatron_dsv3.megatron_lm "${ARGS[@]}" "$@"
