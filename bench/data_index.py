"""Start-up time and memory per DataLoader worker: the shared record index vs ``json.load`` + a list.

Writes a synthetic LLaVA-Pretrain-shaped file (558k records by default, ids, image paths, a prompt and
a caption each), then, each in a fresh process:

Start-up is the time to make the records readable (imports excluded; the index side's main-process RSS
includes torch, which ``import mm_plugin`` loads and a training process has anyway).

* ``json.load`` + list: load the file, fork N workers; each reads every record (as a training epoch
  does over its shard, here all of them) and reports its private memory (USS) and PSS.
* ``RecordIndex`` cold: first open (builds the index), then the same workers reading records through it.
* ``RecordIndex`` warm: open with the index already cached (what every later rank/worker/run sees).

    python bench/data_index.py [--records 558128] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a of photo man woman dog cat city street car tree sky beach house room table food people "
         "red blue green white black small large old new two three standing sitting with on in at near").split()
PROMPTS = ("<image>\nRender a clear and concise summary of the photo.", "Give a brief description of the image.\n<image>",
           "<image>\nShare a concise interpretation of the image provided.")


def write_dataset(path: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as handle:
        handle.write("[\n")
        for index in range(count):
            caption = " ".join(rng.choice(WORDS, int(rng.integers(6, 20))))
            record = {"id": f"{index:09d}", "image": f"{index // 1000:05d}/{index:09d}.jpg",
                      "conversations": [{"from": "human", "value": PROMPTS[index % 3]},
                                        {"from": "gpt", "value": caption}]}
            handle.write(json.dumps(record) + (",\n" if index < count - 1 else "\n"))
        handle.write("]\n")


def _memory() -> tuple[float, float]:
    import psutil

    info = psutil.Process().memory_full_info()
    return info.uss / 2**20, info.pss / 2**20


def _worker(reader, count: int, results) -> None:
    total = 0
    for index in range(count):  # what a worker does over an epoch: read records, look at their text
        record = reader(index)
        total += len(record["conversations"][1]["value"])
    results.put((_memory(), total))


def measure(mode: str, path: str, workers: int) -> dict:
    """Runs inside a fresh interpreter (see main)."""
    import psutil

    if mode == "index":  # the training process has imported torch and the package already; not timed
        sys.path.insert(0, str(ROOT))
        from mm_plugin.data.index import RecordIndex
    started = time.perf_counter()
    if mode == "json":
        with open(path) as handle:
            records = json.load(handle)
        reader, count = records.__getitem__, len(records)
    else:
        index = RecordIndex.open(path)
        reader, count = index.record, len(index)
    startup = time.perf_counter() - started
    parent_rss = psutil.Process().memory_info().rss / 2**20
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(reader, count, results)) for _ in range(workers)]
    for process in processes:
        process.start()
    memories = [results.get()[0] for _ in processes]
    for process in processes:
        process.join()
    return {"startup_s": startup, "parent_rss_mb": parent_rss,
            "worker_uss_mb": float(np.mean([m[0] for m in memories])),
            "worker_pss_mb": float(np.mean([m[1] for m in memories])), "records": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=558_128)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # internal: mode, path
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.workers)))
        return

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "blip_laion_cc_sbu_558k.json"
        write_dataset(path, args.records)
        size = path.stat().st_size / 2**20
        rows = []
        for label, mode in (("json.load + list", "json"), ("RecordIndex, first open (builds index)", "index"),
                            ("RecordIndex, cached index", "index")):
            output = subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--measure", mode,
                                     str(path)], capture_output=True, text=True, check=True).stdout
            rows.append((label, json.loads(output.strip().splitlines()[-1])))

    cpu = cpu_name()
    print(f"machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, numpy {np.__version__}")
    print(f"{args.records} records, {size:.0f} MiB JSON; {args.workers} forked workers, each reading every record\n")
    print("| loader | start-up (s) | main process RSS (MiB) | per-worker private memory, USS (MiB) | per-worker PSS (MiB) |")
    print("|---|---|---|---|---|")
    for label, result in rows:
        print(f"| {label} | {result['startup_s']:.2f} | {result['parent_rss_mb']:.0f} | {result['worker_uss_mb']:.0f} | "
              f"{result['worker_pss_mb']:.0f} |")


if __name__ == "__main__":
    main()
