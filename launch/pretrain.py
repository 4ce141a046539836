"""LLaVA-1.5 pretraining entry point (torchrun-able).

    torchrun --nproc-per-node 8 launch/pretrain.py --mm-model model.json --mm-data data.json \
        --micro-batch-size 32 --global-batch-size 256 --seq-length 2048 --lr 1e-3 ... --save ckpt

Megatron-LM's ``megatron.training.pretrain`` runs when a Megatron-LM checkout is on PYTHONPATH;
otherwise mm_plugin's loop with the same contract. See ``mm_plugin.training``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mm_plugin.console import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()  # before megatron-core is imported: its fallback warnings are summarised
from mm_plugin.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
