"""``mm-plot LOGDIR``: the loss curve of a run as a PNG.

Reads the ``metrics.jsonl`` the training loop writes next to its TensorBoard events (``--tensorboard-dir``,
default ``<save>/tensorboard``): training loss per logged iteration, validation loss where evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def read_metrics(folder: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: point mm-plot at a run's --tensorboard-dir "
                                "(default <save>/tensorboard)")
    train, valid = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from error
        if "valid_loss" in record:
            valid.append((record["iteration"], record["valid_loss"]))
        elif "loss" in record:
            train.append((record["iteration"], record["loss"]))
    return train, valid


def plot(folder: Path, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mm_plugin.safe_io import atomic_path

    train, valid = read_metrics(folder)
    if not train:
        raise ValueError(f"{folder / 'metrics.jsonl'} holds no training loss yet")
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(*zip(*train), label="training loss")
    if valid:
        axes.plot(*zip(*valid), "o-", label="validation loss")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss (per trained token)")
    axes.set_title(str(folder))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(output) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
    return output


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mm-plot", description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="a run's TensorBoard folder (holds metrics.jsonl)")
    parser.add_argument("--output", type=Path, default=None, help="PNG to write (default LOGDIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        written = plot(args.logdir, args.output or args.logdir / "loss.png")
    except (FileNotFoundError, ValueError) as error:
        print(f"mm-plot: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
