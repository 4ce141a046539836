#!/bin/bash
# LLaVA-1.5-7B stage 2 with LoRA (original LLaVA's scripts/v1_5/finetune_lora.sh): finetune_llava1_5.sh with LORA=1.
#
#   bash examples/llava1.5/finetune_lora_llava1_5.sh          # the real run (see finetune_llava1_5.sh)
#   bash examples/llava1.5/finetune_lora_llava1_5.sh --demo   # the demo's stage 2 with LoRA (checkpoints/stage2-lora)
LORA=1 exec bash "$(dirname "$0")/finetune_llava1_5.sh" "$@"
