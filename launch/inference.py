"""LLaVA-1.5 inference entry point (torchrun-able); see ``mm_plugin.inference.cli``.

    torchrun --nproc-per-node 1 launch/inference.py --mm-model examples/llava1.5/inference_llava.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mm_plugin.console import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()  # before megatron-core is imported: its fallback warnings are summarised
from mm_plugin.inference.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
