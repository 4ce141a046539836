#!/bin/bash
# Everything a lent GPU machine (one H100/H200, no network) should check, as one script; results in $OUT.
#
#   OUT=<dir> bash bench/gpu_run.sh [model] [demo] [megatron-lm]      # default: all three
#
# Prepare here, then carry .mlm and .whl (both in .git/info/exclude):
#   mkdir -p .mlm && git -C <Megatron-LM clone> archive core_v0.16.1 megatron | tar -x -C .mlm
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection \
#       'typing_extensions>=4.16'          # what megatron.training imports and the machine lacks
#
# model:       bench/gpu_checks.py, LLaVA-1.5-7B shape: bf16 + flash parity against Hugging Face's fp32,
#              inference speed against Hugging Face generate, stage-1 training step throughput.
# demo:        the --demo pretraining and inference on the GPU (our loop: NCCL, DDP, optimizer, dist_checkpointing).
# megatron-lm: Megatron-LM's stock megatron.training.pretrain with mm_plugin's providers, bf16: the demo's
#              language model, then stage 1 on it.
set -uo pipefail
: "${OUT:?set OUT to the results folder}"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
STEPS=${*:-model demo megatron-lm}
step() { echo; echo "== $* ($(date +%T))"; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)" \
    | tee -a "$OUT/machine.txt"
mkdir -p /tmp/core/megatron && cp -r .mlm/megatron/core /tmp/core/megatron/  # megatron-core without megatron.training
CORE=/tmp/core:.

if wants model; then
    step "model checks, 7B shape"
    PYTHONPATH=$CORE timeout 300 python3 bench/gpu_checks.py --device cuda --repeats 7 --out "$OUT" 2>&1 | tee "$OUT/gpu_checks.log"
    echo "gpu_checks exit ${PIPESTATUS[0]}"
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
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
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
