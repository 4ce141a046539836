"""What verifying a checkpoint costs next to loading it: manifest hashing and the pickle check vs dist_checkpointing.load.

Saves a dist_checkpointing checkpoint of ``--gib`` GiB of weights in this process (a world of one;
``mm_plugin.training.checkpointing.save_checkpoint``'s manifest step included), then times, ``--rounds``
times each, with the files in the page cache as a load right after a save finds them (or, ``--cold``, not):

* ``dist_checkpointing.load`` of every tensor (what a resume reads), unchecked;
* the same load inside ``checkpoint.reading.reading_checkpoint``, as every load of ours runs: pickles checked
  first, files hashed against the manifest on a thread while the load reads them;
* on their own: ``verify_manifest`` (CRC-32 of every file, the part of the check that grows with the
  checkpoint) and ``check_dist_checkpoint`` (the pickles read without executing them).

``--dtype bf16 --gib 12.6`` is LLaVA-1.5-7B's language model in bf16 (6.74 B parameters), what a stage-2
checkpoint holds before its optimizer. ``--cold`` drops the page cache before each step (needs root), as a
load after a restart or on another node finds the files.

    python bench/checkpoint_verify.py [--gib 2] [--rounds 3] [--dtype fp32|bf16] [--cold]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_name  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each step (root)")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    import mm_plugin  # noqa: F401  (patches: megatron-core on the CPU)
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from mm_plugin.parallel.world import join_world, set_model_parallel
    from mm_plugin.safe_io import check_dist_checkpoint
    from mm_plugin.checkpoint import reading
    from mm_plugin.checkpoint.manifest import verify_manifest, write_manifest

    join_world()
    set_model_parallel(1, 1)
    rows = 4096
    count = max(1, round(args.gib * 2**30 / (rows * rows * dtype.itemsize)))

    def state(fill):
        return {f"layer{k}.weight": ShardedTensor.from_rank_offsets(
            f"layer{k}.weight", fill((rows, rows), dtype=dtype)) for k in range(count)}

    def settle():
        if args.cold:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")

    with tempfile.TemporaryDirectory(prefix="ckpt-verify-", dir=os.environ.get("TMPDIR")) as folder:
        directory = Path(folder) / "iter_0000001"
        directory.mkdir()
        dist_checkpointing.save(state(torch.randn), str(directory))  # the state is freed before loading
        start = time.perf_counter()
        write_manifest(directory)
        write_seconds = time.perf_counter() - start
        size = sum(path.stat().st_size for path in directory.iterdir()) / 2**30
        times = {"load": [], "verified": [], "manifest": [], "pickles": []}
        for _ in range(args.rounds):
            settle()
            start = time.perf_counter()
            loaded = dist_checkpointing.load(state(torch.empty), str(directory))
            times["load"].append(time.perf_counter() - start)
            del loaded
            settle()
            reading._verified.clear()  # verify again every round
            start = time.perf_counter()
            with reading.reading_checkpoint(directory):
                loaded = dist_checkpointing.load(state(torch.empty), str(directory))
            times["verified"].append(time.perf_counter() - start)
            del loaded
            settle()
            start = time.perf_counter()
            assert verify_manifest(directory) is None
            times["manifest"].append(time.perf_counter() - start)
            settle()
            start = time.perf_counter()
            check_dist_checkpoint(directory)
            times["pickles"].append(time.perf_counter() - start)

    best = {name: min(values) for name, values in times.items()}
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; one process")
    cache = "page cache dropped before each step" if args.cold else "files in the page cache"
    print(f"checkpoint: {count} {args.dtype} tensors of {rows}x{rows}, {size:.2f} GiB on disk; best of "
          f"{args.rounds}, {cache}\n")
    print("| step | seconds | GiB/s | share of the unchecked load |")
    print("|---|---|---|---|")
    print(f"| dist_checkpointing.load, unchecked | {best['load']:.2f} | {size / best['load']:.2f} | 100% |")
    for name, label in (("verified", "the same load, verified while it reads (reading_checkpoint)"),
                        ("manifest", "verify_manifest alone (CRC-32 of every file)"),
                        ("pickles", "check_dist_checkpoint (pickles, shard sizes)")):
        print(f"| {label} | {best[name]:.2f} | {size / best[name]:.2f} | {100 * best[name] / best['load']:.0f}% |")
    print(f"| write_manifest at save | {write_seconds:.2f} | {size / write_seconds:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
