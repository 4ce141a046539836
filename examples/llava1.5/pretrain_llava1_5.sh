#!/bin/bash
# LLaVA-1.5-7B stage 1 (feature alignment: only the projector trains) on megatron-core.
#
#   bash examples/llava1.5/pretrain_llava1_5.sh           # the real run: edit model.json / data.json paths first
#   bash examples/llava1.5/pretrain_llava1_5.sh --demo    # a miniature of the whole flow on a CPU, no downloads
#
# The recipe is LLaVA-1.5's as MindSpeed-MM publishes it: lr 1e-3, cosine decay, 3% warmup, weight decay 0,
# global batch 256, bf16, one epoch of blip_laion_cc_sbu_558k.json (558,128 records = 2,181 iterations).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

if [ "${1:-}" = "--demo" ]; then
    # The embedded default: synthetic LLaVA-Pretrain-layout data and tokenizer, a tiny CLIP that first learns
    # the pictures and a tiny language model that first learns language (and in-context copying) from a
    # text-only run of the same loop, both written as the converted part files model.json points to; then
    # stage 1 exactly as a user runs it, on the CPU with 2 processes. See mm_plugin/training/demo.py.
    # MM_PLUGIN_DEVICE=cuda DEMO_NPROC=1 runs it on one GPU instead (one process per GPU).
    # DEMO_SEED=N varies the data sets, the vision tower and both training runs (bench/demo_seeds.py).
    export MM_PLUGIN_DEVICE=${MM_PLUGIN_DEVICE:-cpu}
    DEMO_NPROC=${DEMO_NPROC:-2}
    DEMO_SEED=${DEMO_SEED:-0}
    OUT=${DEMO_DIR:-demo_out}
    DEMO_ARGS="--micro-batch-size 16 --global-batch-size 32 --seq-length 64 --lr-warmup-fraction 0.03 \
        --lr-decay-style cosine --weight-decay 0.0 --clip-grad 1.0 --log-interval 25 --num-workers 1 \
        --seed $((1234 + DEMO_SEED))"
    rm -rf "$OUT"
    "$PYTHON" -m mm_plugin.training.demo prepare "$OUT" --seed "$DEMO_SEED"
    echo "== the language model learns language from text (a stand-in for Vicuna's pretraining)"
    "$PYTHON" -m torch.distributed.run --nproc-per-node "$DEMO_NPROC" --master-port "$MASTER_PORT" \
        launch/pretrain.py $DEMO_ARGS \
        --mm-model "$OUT/model_lm.json" --mm-data "$OUT/data/text/data.json" \
        --lr 3e-3 --train-iters 300 --save "$OUT/checkpoints/lm"
    "$PYTHON" -m mm_plugin.training.demo export-lm "$OUT/checkpoints/lm" "$OUT/weights/converted_vicuna.pt"
    echo "== stage 1: only the projector trains, vision tower and language model frozen"
    "$PYTHON" -m torch.distributed.run --nproc-per-node "$DEMO_NPROC" --master-port "$MASTER_PORT" \
        launch/pretrain.py $DEMO_ARGS \
        --mm-model "$OUT/model.json" --mm-data "$OUT/data/train/data.json" \
        --lr 2e-3 --train-iters 250 --save "$OUT/checkpoints/stage1"
    "$PYTHON" -m mm_plugin.training.demo evaluate "$OUT"
    echo "demo done: checkpoints in $OUT/checkpoints, TensorBoard logs in $OUT/checkpoints/*/tensorboard"
    echo "loss curve: mm-plot $OUT/checkpoints/stage1/tensorboard"
    exit 0
fi

TP=1
PP=1
MBS=32
GBS=256
MM_MODEL=examples/llava1.5/model.json   # converted_clip.pt + converted_vicuna.pt (mm-convert clip / llm)
MM_DATA=examples/llava1.5/data.json     # blip_laion_cc_sbu_558k.json + images/
SAVE_PATH=${SAVE_PATH:-checkpoints/llava1.5-7b-stage1}

DISTRIBUTED_ARGS="--nproc_per_node $GPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR --master_port $MASTER_PORT"

GPT_ARGS="
    --tensor-model-parallel-size $TP \
    --pipeline-model-parallel-size $PP \
    --micro-batch-size $MBS \
    --global-batch-size $GBS \
    --seq-length 2048 \
    --lr 1e-3 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.03 \
    --weight-decay 0.0 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --train-samples 558128 \
    --bf16 \
    --num-workers 8 \
"
MM_ARGS="--mm-model $MM_MODEL --mm-data $MM_DATA"
OUTPUT_ARGS="--log-interval 1 --save-interval 500 --save $SAVE_PATH --load $SAVE_PATH"

torchrun $DISTRIBUTED_ARGS launch/pretrain.py $GPT_ARGS $MM_ARGS $OUTPUT_ARGS "$@"
