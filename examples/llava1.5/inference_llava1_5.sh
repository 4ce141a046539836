#!/bin/bash
# LLaVA-1.5 inference: answers the prompts of inference_llava.json about its images, streaming each answer.
#
#   bash examples/llava1.5/inference_llava1_5.sh            # edit inference_llava.json's paths first
#   bash examples/llava1.5/inference_llava1_5.sh --demo     # the model `pretrain_llava1_5.sh --demo` trained
#   bash examples/llava1.5/inference_llava1_5.sh --image view.jpg --prompt "What is unusual here?"
#
# Weights: each part's ckpt_path in the JSON names a converted part file (mm-convert) or a training
# checkpoint directory (--save of launch/pretrain.py); or use `mm-infer --hf-dir llava-1.5-7b-hf`.
# Extra arguments go to launch/inference.py (see `python launch/inference.py --help`).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}

if [ "${1:-}" = "--demo" ]; then
    shift
    OUT=${DEMO_DIR:-demo_out}
    exec "$PYTHON" launch/inference.py --demo "$OUT" "$@"
fi

NPUS_PER_NODE=${NPUS_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29501}
NNODES=1
NODE_RANK=0

TP=${TP:-1}
PP=1
CP=1
MBS=${MBS:-8}   # prompts generated together

MM_MODEL=${MM_MODEL:-examples/llava1.5/inference_llava.json}

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --micro-batch-size ${MBS} \
"
MM_ARGS="
    --mm-model ${MM_MODEL} \
"

torchrun $DISTRIBUTED_ARGS \
    launch/inference.py \
    $GPT_ARGS \
    $MM_ARGS \
    "$@"
