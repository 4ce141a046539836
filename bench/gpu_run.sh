#!/bin/bash
# Everything a lent GPU machine (one H100/H200, no network) should check, as one script; results in $OUT.
#
#   OUT=<dir> bash bench/gpu_run.sh [model] [train] [packing] [demo] [megatron-lm]   # default: model train packing
#
# Prepare here the megatron-core wheel the machine lacks (.whl is in .gitignore: carry it):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
# and, for the megatron-lm step only, Megatron-LM's sources and what megatron.training imports (carry .mlm too):
#   mkdir -p .mlm && git -C <Megatron-LM clone> archive core_v0.16.1 megatron | tar -x -C .mlm
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection \
#       'typing_extensions>=4.16'
# The 15 minutes of device time fit two calls of under 10 minutes each (the run tool's `carry` takes .whl):
#   OUT=$OUT bash bench/gpu_run.sh model               # about 5 minutes on an H100
#   OUT=$OUT bash bench/gpu_run.sh train packing       # at most 9.5 minutes (the timeouts below)
#
# model:       bench/gpu_checks.py, LLaVA-1.5-7B shape: bf16 + flash parity against Hugging Face's fp32,
#              inference speed against Hugging Face generate (static decode steps as CUDA graphs, and
#              dynamic ones), batch-1 decode against the memory-bandwidth bound, the stage-1 model step.
# train:       bench/train_step.py, the package's own pretrain() loop (megatron-core DDP, distributed optimizer,
#              JPEG data loader) against Hugging Face + AdamW on the same samples: stage 1 on the 7B shape,
#              stage 2 with packing on the 7B widths with as many language-model layers as fit one GPU.
# packing:     bench/packing.py on the 7B widths (unpacked, grouped, packed trained tokens/s) and
#              bench/packed_attention.py (which attention kernel packed rows should use).
# demo:        the --demo pretraining and inference on the GPU (our loop: NCCL, DDP, optimizer, dist_checkpointing).
# megatron-lm: Megatron-LM's stock megatron.training.pretrain with mm_plugin's providers, bf16: the demo's
#              language model, then stage 1 on it.
set -uo pipefail
: "${OUT:?set OUT to the results folder}"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
STEPS=${*:-model train packing}
step() { echo; echo "== $* ($(date +%T))"; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)" \
    | tee -a "$OUT/machine.txt"
ls .whl/megatron_core-*.whl > /dev/null || { echo "no megatron-core wheel in .whl: see the top of this script"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
CORE=/tmp/site:.

if wants model; then
    step "model checks, 7B shape"
    PYTHONPATH=$CORE timeout 330 python3 bench/gpu_checks.py --device cuda --repeats 7 --out "$OUT" 2>&1 | tee "$OUT/gpu_checks.log"
    echo "gpu_checks exit ${PIPESTATUS[0]}"
fi

if wants train; then
    step "the training loop against Hugging Face, stage 1, 7B shape"
    PYTHONPATH=$CORE timeout 200 python3 bench/train_step.py --shape 7b --device cuda --stage 1 --out "$OUT/stage1" \
        2>&1 | tee "$OUT/train_step_stage1.log"
    echo "train_step stage 1 exit ${PIPESTATUS[0]}"
    step "the training loop against Hugging Face, stage 2 with packing, 7B widths, 8 layers"
    PYTHONPATH=$CORE timeout 180 python3 bench/train_step.py --shape 7b --device cuda --stage 2 --layers 8 --packing \
        --out "$OUT/stage2" 2>&1 | tee "$OUT/train_step_stage2.log"
    echo "train_step stage 2 exit ${PIPESTATUS[0]}"
fi

if wants packing; then
    step "packing throughput, 7B widths, 2 layers"
    PYTHONPATH=$CORE timeout 150 python3 bench/packing.py --shape 7b-2layers --device cuda --seq-length 2048 --out "$OUT/packing.json" \
        2>&1 | tee "$OUT/packing.log"
    echo "packing exit ${PIPESTATUS[0]}"
    step "packed-row attention kernels, LLaVA-1.5-7B heads"
    PYTHONPATH=$CORE timeout 60 python3 bench/packed_attention.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/packed_attention.log"
    echo "packed_attention exit ${PIPESTATUS[0]}"
fi

if wants demo; then
    step "demo pretraining and inference on the GPU"
    MM_PLUGIN_DEVICE=cuda DEMO_NPROC=1 DEMO_DIR=/tmp/demo PYTHON=python3 PYTHONPATH=$CORE \
        timeout 240 bash examples/llava1.5/pretrain_llava1_5.sh --demo > "$OUT/demo.log" 2>&1
    echo "demo exit $?"
    grep -E "iteration +(50|150|250|300)/|with_images|shuffled|alone|Error|error" "$OUT/demo.log" | tail -20
    PYTHONPATH=$CORE timeout 45 python3 launch/inference.py --demo /tmp/demo > "$OUT/inference_demo.log" 2>&1
    echo "inference demo exit $?"
    tail -12 "$OUT/inference_demo.log"
fi

if wants megatron-lm; then
    step "Megatron-LM's stock pretrain(), bf16"
    MLM=.mlm:/tmp/site:.
    [ -d /tmp/demo/data ] || PYTHONPATH=$CORE python3 -m mm_plugin.training.demo prepare /tmp/demo > /dev/null
    COMMON="--micro-batch-size 16 --global-batch-size 32 --seq-length 64 --lr-decay-style cosine
        --lr-warmup-fraction 0.03 --weight-decay 0.0 --clip-grad 1.0 --log-interval 20 --bf16 --num-workers 1"
    run_megatron_lm() {  # name, then launch/pretrain.py arguments
        local name=$1; shift
        PYTHONPATH=$MLM timeout 90 python3 -m torch.distributed.run --nproc-per-node 1 --master-port 29533 \
            launch/pretrain.py $COMMON "$@" > "$OUT/megatron_lm_$name.log" 2>&1
        echo "megatron-lm $name exit $?"
        grep -E "iteration +[0-9]+/|validation loss|saved checkpoint|Error|error|Traceback" \
            "$OUT/megatron_lm_$name.log" | tail -12
    }
    run_megatron_lm lm --mm-model /tmp/demo/model_lm.json --mm-data /tmp/demo/data/text/data.json \
        --lr 3e-3 --train-iters 80 --save /tmp/megatron_lm/lm
    PYTHONPATH=$CORE timeout 30 python3 -m mm_plugin.training.demo export-lm /tmp/megatron_lm/lm \
        /tmp/demo/weights/converted_vicuna.pt 2>&1 | tail -3
    run_megatron_lm stage1 --mm-model /tmp/demo/model.json --mm-data /tmp/demo/data/train/data.json \
        --lr 2e-3 --train-iters 40 --save /tmp/megatron_lm/stage1
    ls /tmp/megatron_lm/stage1
fi
step done
