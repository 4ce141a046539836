"""``mm-data check``: read every record as training would, in parallel, and report before GPU hours are spent.

Each record goes through exactly the checks of :meth:`LlavaDataset.load` (structure, template, path,
tokenization and length, full image decode) without the pixel preprocessing. The report counts problems
by reason (the names of ``BAD_REASONS``), lists the first records of each, gives image size and mode
statistics and caption and sequence lengths in tokens, counts records and problems per image sub-folder (the
sources of an instruction mix: ``coco/train2017``, ``ocr_vqa/images``, ...), and says whether the set is fit to
train.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import posixpath
from typing import Any, Optional

import numpy as np
from tqdm import tqdm

from .dataset import LlavaDataset
from .errors import BAD_REASONS, REASON_HINTS, BadSample

EXAMPLES_PER_REASON = 10
CHUNK = 256

_dataset: Optional[LlavaDataset] = None  # set in the parent before forking the pool


TEXT_ONLY = "(text-only)"
UNREADABLE = "(unreadable record)"


def _image_folder(position: int) -> str:
    """The sub-folder of the record's first image, as the record names it (``coco/train2017``), or
    ``TEXT_ONLY``: the mix's sources live in their own folders, and problems cluster by source."""
    try:
        raw = _dataset.index.record(int(_dataset.positions[position]))
    except ValueError:
        return UNREADABLE
    image = raw.get("image") if isinstance(raw, dict) else None
    first = image[0] if isinstance(image, list) and image else image
    if not isinstance(first, str):
        return TEXT_ONLY
    return posixpath.dirname(first.replace("\\", "/")) or "."


def _inspect_chunk(bounds: tuple[int, int]) -> dict[str, Any]:
    start, stop = bounds
    bad: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    counts: collections.Counter = collections.Counter()
    folders: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    modes: collections.Counter = collections.Counter()
    widths, heights, targets, lengths = [], [], [], []
    truncated = 0
    for position in range(start, stop):
        folder = folders[_image_folder(position)]
        folder["records"] += 1
        try:
            found = _dataset.inspect(position)
        except BadSample as error:
            counts[error.reason] += 1
            folder[error.reason] += 1
            if len(bad[error.reason]) < EXAMPLES_PER_REASON:
                bad[error.reason].append((position, _dataset.describe_bad(position, error)))
            continue
        for (width, height), mode in zip(found.image_sizes, found.image_modes):
            widths.append(width)
            heights.append(height)
            modes[mode] += 1
        if found.target_tokens is not None:
            targets.append(found.target_tokens)
            lengths.append(found.sequence_length)
        truncated += found.truncated
    return {"records": stop - start, "counts": counts, "examples": dict(bad), "modes": modes, "widths": widths,
            "heights": heights, "targets": targets, "lengths": lengths, "truncated": truncated,
            "folders": dict(folders)}


def _stats(values: list[int]) -> Optional[dict[str, float]]:
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "p5": float(np.percentile(array, 5)), "median": float(np.median(array)),
            "mean": round(float(array.mean()), 2), "p95": float(np.percentile(array, 95)),
            "max": float(array.max())}


def check_dataset(dataset: LlavaDataset, *, workers: int = 1, max_bad_fraction: float = 0.01,
                  progress: bool = True) -> dict[str, Any]:
    """Inspect every record of ``dataset``; returns the report as a JSON-able dict."""
    global _dataset
    _dataset = dataset
    chunks = [(start, min(start + CHUNK, len(dataset))) for start in range(0, len(dataset), CHUNK)]
    parts = []
    bar = tqdm(total=len(dataset), desc="checking", unit="rec", disable=not progress)
    try:
        if workers > 1 and len(chunks) > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for part in pool.imap_unordered(_inspect_chunk, chunks):
                    parts.append(part)
                    bar.update(part["records"])
        else:
            for chunk in chunks:
                parts.append(_inspect_chunk(chunk))
                bar.update(parts[-1]["records"])
    finally:
        bar.close()
        _dataset = None

    counts: collections.Counter = collections.Counter()
    modes: collections.Counter = collections.Counter()
    examples: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    folders: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    widths, heights, targets, lengths = [], [], [], []
    truncated = 0
    for part in parts:
        counts.update(part["counts"])
        for folder, found in part["folders"].items():
            folders[folder].update(found)
        modes.update(part["modes"])
        for reason, found in part["examples"].items():
            examples[reason].extend(found)
        widths += part["widths"]
        heights += part["heights"]
        targets += part["targets"]
        lengths += part["lengths"]
        truncated += part["truncated"]

    records = len(dataset)
    bad_total = sum(counts.values())
    fraction = bad_total / records if records else 1.0
    fit = records > bad_total and fraction <= max_bad_fraction
    by_reason = {
        reason: {"count": counts[reason], "first": [message for _, message in sorted(examples[reason])[:EXAMPLES_PER_REASON]],
                 "what_to_do": REASON_HINTS[reason]}
        for reason in BAD_REASONS if counts[reason]
    }
    verdict = (f"fit to train: {records - bad_total} of {records} records usable, {bad_total} bad ({fraction:.2%}, "
               f"limit {max_bad_fraction:.2%})") if fit else (
        f"NOT fit to train: {bad_total} of {records} records bad ({fraction:.2%}, limit max_bad_fraction="
        f"{max_bad_fraction:.2%}); fix the reasons below or raise the limit")
    return {
        "data_path": str(dataset.index.source),
        "data_folder": dataset.data_folder,
        "template": dataset.template.name,
        "tokenizer": getattr(dataset.encoder.tokenizer, "name_or_path", None) if dataset.encoder else None,
        "image_tokens": dataset.image_tokens,
        "model_max_length": dataset.model_max_length,
        "records": records,
        "valid": records - bad_total,
        "bad": bad_total,
        "bad_fraction": round(fraction, 6),
        "max_bad_fraction": max_bad_fraction,
        "bad_by_reason": by_reason,
        "by_image_folder": {folder: {"records": found["records"],
                                     "bad": {reason: found[reason] for reason in BAD_REASONS if found[reason]}}
                            for folder, found in sorted(folders.items())},
        "images": {"count": len(widths), "width": _stats(widths), "height": _stats(heights), "modes": dict(modes)},
        "caption_tokens": _stats(targets),
        "sequence_tokens": _stats(lengths),
        "truncated": truncated,
        "fit_to_train": fit,
        "verdict": verdict,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text for the terminal."""
    lines = [
        f"data:      {report['data_path']}",
        f"images:    {report['data_folder']}",
        f"template:  {report['template']}   tokenizer: {report['tokenizer'] or '(none: no token statistics)'}",
        f"records:   {report['records']}   valid: {report['valid']}   bad: {report['bad']} ({report['bad_fraction']:.2%})",
    ]
    for reason, entry in report["bad_by_reason"].items():
        lines.append(f"  {reason}: {entry['count']}  -> {entry['what_to_do']}")
        lines += [f"      {message}" for message in entry["first"][:3]]

    if len(report["by_image_folder"]) > 1:
        lines.append("by image folder:")
        width = max(len(folder) for folder in report["by_image_folder"])
        for folder, entry in report["by_image_folder"].items():
            bad = ", ".join(f"{reason} {count}" for reason, count in entry["bad"].items()) or "none bad"
            lines.append(f"  {folder:<{width}}  {entry['records']:>8} records  {bad}")

    def stats_line(name: str, stats: Optional[dict[str, float]]) -> str:
        if stats is None:
            return f"{name}: -"
        return (f"{name}: min {stats['min']:g}  p5 {stats['p5']:g}  median {stats['median']:g}  mean {stats['mean']:g}  "
                f"p95 {stats['p95']:g}  max {stats['max']:g}")

    images = report["images"]
    lines.append(f"images:    {images['count']}  modes: {images['modes']}")
    lines.append("  " + stats_line("width ", images["width"]))
    lines.append("  " + stats_line("height", images["height"]))
    lines.append(stats_line("caption tokens (in the loss)", report["caption_tokens"]))
    lines.append(stats_line(f"sequence tokens (image = {report['image_tokens']})", report["sequence_tokens"]))
    lines.append(f"truncated to model_max_length={report['model_max_length']}: {report['truncated']}")
    lines.append(report["verdict"])
    return "\n".join(lines)


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 16))
