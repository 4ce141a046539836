#!/bin/bash
# LLaVA-1.5-7B stage 2 (visual instruction tuning: projector and language model train, vision tower frozen).
#
#   bash examples/llava1.5/finetune_llava1_5.sh            # the real run: edit model_finetune.json / data_finetune.json
#   bash examples/llava1.5/finetune_llava1_5.sh --demo     # the demo's stage 2 on a CPU (runs stage 1's demo first
#                                                          # when it is missing), then answers held-out questions
#   LORA=1 bash examples/llava1.5/finetune_llava1_5.sh     # LoRA instead (finetune_lora_llava1_5.sh); with --demo,
#                                                          # the demo's stage 2 with LoRA (checkpoints/stage2-lora)
#
# The recipe is LLaVA-1.5's (scripts/v1_5/finetune.sh): lr 2e-5, cosine decay, 3% warmup, weight decay 0, global
# batch 128, 2048 positions, bf16, one epoch of llava_v1_5_mix665k.json (665,298 records = 5,198 iterations),
# images padded to square, batches grouped by modality and length; it starts from stage 1's projector
# (--load STAGE1 --finetune) and the converted Vicuna-7B. What fits 8 GPUs of 80 GB and why: docs/finetune.md.
#
# LORA=1 is LLaVA-1.5's LoRA recipe (scripts/v1_5/finetune_lora.sh): adapters of rank 128, alpha 256, dropout
# 0.05 on every linear of the language model, whose weights stay frozen; lr 2e-4, the projector at 2e-5.
#
# Sequence packing is on (PACKING=0 turns it off): each step's 128 samples are packed into rows of 2048
# positions, samples never attending to each other; the loss is then normalised per trained token over the
# global batch (--calculate-per-token-loss), where original LLaVA averages each micro-batch's mean
# (docs/finetune.md says what changes).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

if [ "${1:-}" = "--demo" ]; then
    # Stage 2 of the embedded default: synthetic instruction data about the demo's pictures (questions on
    # colour, shape and position, several rounds, a fifth text-only), packed, on the CPU with 2 processes,
    # from the stage-1 demo's projector and language model. See mm_plugin/training/demo.py.
    export MM_PLUGIN_DEVICE=${MM_PLUGIN_DEVICE:-cpu}
    DEMO_NPROC=${DEMO_NPROC:-2}
    DEMO_SEED=${DEMO_SEED:-0}
    OUT=${DEMO_DIR:-demo_out}
    STAGE2=stage2
    STAGE2_ARGS="--lr 1e-3"
    if [ "${LORA:-0}" = 1 ]; then
        # The demo's language model learned language from captions only: the answers' words ("The shape is ...")
        # are rows of its output layer it never trained, which LoRA on the decoder's linears alone keeps frozen
        # (Vicuna knows its words). So the output layer gets an adapter too (PEFT's lm_head target); measured in
        # docs/finetune.md (LoRA). Its own folder: the full demo's stage 2 stays as it is.
        STAGE2=stage2-lora
        STAGE2_ARGS="--lr 2e-3 --lora-rank 16 --lora-alpha 32
            --lora-targets linear_qkv linear_proj linear_fc1 linear_fc2 output_layer"
    fi
    if [ ! -d "$OUT/checkpoints/stage1" ]; then
        echo "== no stage-1 demo in $OUT: running it first"
        bash examples/llava1.5/pretrain_llava1_5.sh --demo
    fi
    rm -rf "$OUT/checkpoints/$STAGE2"
    "$PYTHON" -m mm_plugin.training.demo prepare-stage2 "$OUT" --seed "$DEMO_SEED"
    echo "== stage 2: projector and language model ($STAGE2) train on packed instruction data"
    # shellcheck disable=SC2086  # STAGE2_ARGS: several flags
    "$PYTHON" -m torch.distributed.run --nproc-per-node "$DEMO_NPROC" --master-port "$MASTER_PORT" \
        launch/pretrain.py --micro-batch-size 2 --global-batch-size 32 --seq-length 256 --sequence-packing \
        $STAGE2_ARGS --lr-warmup-fraction 0.03 --lr-decay-style cosine --weight-decay 0.0 --clip-grad 1.0 \
        --log-interval 25 --num-workers 1 --seed $((1234 + DEMO_SEED)) --train-iters 300 \
        --mm-model "$OUT/model_stage2.json" --mm-data "$OUT/data/instruct/data.json" \
        --load "$OUT/checkpoints/stage1" --finetune --save "$OUT/checkpoints/$STAGE2"
    "$PYTHON" -m mm_plugin.training.demo evaluate-stage2 "$OUT" --checkpoint "$STAGE2"
    if [ "$STAGE2" = stage2 ]; then
        echo "demo done: chat with it: bash examples/llava1.5/inference_llava1_5.sh --demo"
    else  # the chat's --demo picks checkpoints/stage2 (the full run) or stage1, not this folder
        echo "demo done: the answers above are the LoRA model's ($OUT/checkpoints/$STAGE2)"
    fi
    exit 0
fi

TP=${TP:-1}
PP=1
MBS=${MBS:-1}       # packed rows of 2048 positions per micro-batch (samples per micro-batch without packing)
GBS=128
MM_MODEL=examples/llava1.5/model_finetune.json   # converted_clip.pt + converted_vicuna.pt, language model trains
MM_DATA=examples/llava1.5/data_finetune.json     # llava_v1_5_mix665k.json + coco/ gqa/ ocr_vqa/ textvqa/ vg/
STAGE1=${STAGE1:-checkpoints/llava1.5-7b-stage1}
PACKING_ARGS=$([ "${PACKING:-1}" = 1 ] && echo "--sequence-packing" || true)
SAVE_PATH=${SAVE_PATH:-checkpoints/llava1.5-7b-stage2}
LR_ARGS="--lr 2e-5"
if [ "${LORA:-0}" = 1 ]; then
    SAVE_PATH=${SAVE_PATH/%-stage2/-stage2-lora}  # the default's own folder; a SAVE_PATH you set is kept
    LR_ARGS="--lr 2e-4 --mm-projector-lr 2e-5 --lora-rank 128 --lora-alpha 256 --lora-dropout 0.05"
fi

DISTRIBUTED_ARGS="--nproc_per_node $GPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR --master_port $MASTER_PORT"

GPT_ARGS="
    --tensor-model-parallel-size $TP \
    --pipeline-model-parallel-size $PP \
    --use-distributed-optimizer \
    --micro-batch-size $MBS \
    --global-batch-size $GBS \
    --seq-length 2048 \
    $LR_ARGS \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.03 \
    --weight-decay 0.0 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --train-samples 665298 \
    --bf16 \
    --num-workers 8 \
    $PACKING_ARGS \
"
MM_ARGS="--mm-model $MM_MODEL --mm-data $MM_DATA"
# The first run starts from stage 1 (--finetune: its weights only); a restart resumes from SAVE_PATH.
if [ -f "$SAVE_PATH/latest_checkpointed_iteration.txt" ]; then
    LOAD_ARGS="--load $SAVE_PATH"
else
    LOAD_ARGS="--load $STAGE1 --finetune"
fi
OUTPUT_ARGS="--log-interval 1 --save-interval 500 --save $SAVE_PATH $LOAD_ARGS"

torchrun $DISTRIBUTED_ARGS launch/pretrain.py $GPT_ARGS $MM_ARGS $OUTPUT_ARGS "$@"
