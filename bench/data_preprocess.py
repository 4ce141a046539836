"""Image preprocessing throughput, ours vs the PIL-based CLIPImageProcessor, on the same JPEGs in one run.

Both do what original LLaVA does per image: decode, convert to RGB, resize the short side to 336
(bicubic), centre-crop 336x336, rescale and normalise. The competitor is
``CLIPImageProcessorPil(...)(Image.open(path).convert("RGB"))`` (the PIL backend of transformers 5; the
class LLaVA used in transformers 4). One thread, one core; pipelines interleaved image by image, each
image's best of several rounds. Prints a Markdown table row block for BENCHMARKS.md.

    python bench/data_preprocess.py [--images 150] [--rounds 3] [--shortest 300 800]
    python bench/data_preprocess.py --stages      # where one image's time goes, ours vs Pillow, per stage
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_plugin.data.config import ImagePreprocessConfig  # noqa: E402
from mm_plugin.data.images import ImageProcessor  # noqa: E402
from machine import cpu_name  # noqa: E402


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Photo-like: smooth waves of random period, noise, a slight blur."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / rng.uniform(20, 90)) * 80 + 120, np.cos(y / rng.uniform(20, 90)) * 80 + 120,
                     (x + y) / (width + height) * 255], -1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy).filter(ImageFilter.GaussianBlur(1.2))


def make_jpegs(folder: Path, count: int, shortest: tuple[int, int]) -> list[str]:
    """Photo-like JPEGs: short side in ``shortest`` px, aspect 0.6-1.8, quality 90."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        short = int(rng.integers(shortest[0], shortest[1] + 1))
        aspect = float(rng.uniform(0.6, 1.8))
        width, height = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
        path = folder / f"{index:04d}.jpg"
        photo(width, height, rng).save(path, quality=90)
        paths.append(str(path))
    return paths


def best_times(candidates: dict, paths: list[str], rounds: int) -> dict[str, float]:
    """Seconds per pipeline for all images, each image's time the best of ``rounds``.

    The pipelines run image by image in turn, and the best of several rounds is kept per image, so load
    from other processes on a shared machine hits both sides alike and is filtered out.
    """
    best = {name: [float("inf")] * len(paths) for name in candidates}
    for _ in range(rounds):
        for position, path in enumerate(paths):
            for name, function in candidates.items():
                started = time.perf_counter()
                function(path)
                best[name][position] = min(best[name][position], time.perf_counter() - started)
    return {name: sum(times) for name, times in best.items()}


def stages(rounds: int = 7) -> None:
    """Per stage, one JPEG of each size: decode (simplejpeg vs Pillow), then ours' resize + crop +
    normalise in one C call vs Pillow's resize alone; best of ``rounds``."""
    import io

    from mm_plugin.data import fast_image

    processor = ImageProcessor(ImagePreprocessConfig())

    def best(function) -> float:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
        return min(times) * 1e3

    print("| image | JPEG decode: simplejpeg / Pillow | resize + crop + normalise: ours (C) / Pillow's resize alone |")
    print("|---|---|---|")
    rng = np.random.default_rng(0)
    for width, height in ((500, 375), (640, 480), (1600, 1200)):
        encoded = io.BytesIO()
        photo(width, height, rng).save(encoded, format="JPEG", quality=90)
        data = encoded.getvalue()
        pixels = fast_image.decode_jpeg(data)
        image = Image.fromarray(pixels)
        target = processor.resize_size(width, height)
        crop = processor.crop_box(*target)
        decode_ours = best(lambda: fast_image.decode_jpeg(data))
        decode_pillow = best(lambda: Image.open(io.BytesIO(data)).convert("RGB"))
        resize_ours = best(lambda: fast_image.resize_crop_normalize(pixels, target, crop, processor.table))
        resize_pillow = best(lambda: image.resize(target, Image.BICUBIC))
        print(f"| {width} x {height} | {decode_ours:.2f} / {decode_pillow:.2f} ms | "
              f"{resize_ours:.2f} / {resize_pillow:.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shortest", type=int, nargs=2, default=(300, 800), help="range of the short side (px)")
    parser.add_argument("--stages", action="store_true", help="time each stage on three image sizes instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.stages:
        return stages()

    import transformers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    clip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3)
    exact = ImageProcessor(ImagePreprocessConfig())
    draft = ImageProcessor(ImagePreprocessConfig(jpeg_draft=True))
    candidates = {
        "CLIPImageProcessor (PIL), LLaVA's call": lambda p: clip(Image.open(p).convert("RGB"), return_tensors="np"),
        "mm_plugin ImageProcessor (exact, default)": exact.load,
        "mm_plugin ImageProcessor, jpeg_draft=True": draft.load,
    }
    with tempfile.TemporaryDirectory() as folder:
        paths = make_jpegs(Path(folder), args.images, tuple(args.shortest))
        worst_exact, draft_errors = 0.0, []
        for path in paths:
            reference = clip(Image.open(path).convert("RGB"), return_tensors="np")["pixel_values"][0]
            worst_exact = max(worst_exact, float(np.abs(exact.load(path).numpy() - reference).max()))
            draft_errors.append(np.abs(draft.load(path).numpy() - reference))
        seconds = best_times(candidates, paths, args.rounds)

    rates = {name: len(paths) / total for name, total in seconds.items()}
    baseline = rates[next(iter(candidates))]
    cpu = cpu_name()
    print(f"machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, Pillow {Image.__version__}, "
          f"numpy {np.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{args.images} JPEGs, short side {args.shortest[0]}-{args.shortest[1]} px, aspect 0.6-1.8; 1 thread; "
          f"per image the best of {args.rounds} rounds, pipelines interleaved\n")
    print("| pipeline | images/s per core | vs CLIPImageProcessor | max abs diff vs it |")
    print("|---|---|---|---|")
    diffs = {0: "-", 1: f"{worst_exact:.1e}",
             2: f"{max(e.max() for e in draft_errors):.3f} (mean {np.mean([e.mean() for e in draft_errors]):.4f})"}
    for position, name in enumerate(candidates):
        print(f"| {name} | {rates[name]:.1f} | {rates[name] / baseline:.2f}x | {diffs[position]} |")


if __name__ == "__main__":
    main()
