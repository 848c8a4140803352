"""Files of an LR range test: the curve as CSV and as a log-scale plot."""

from __future__ import annotations

import csv
from pathlib import Path

from matplotlib.figure import Figure

from crop_accel.lr_finder import LRFinderResult


def save_lr_finder_outputs(result: LRFinderResult, output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``lr_finder.csv`` and ``lr_finder.png`` into ``output_dir`` and return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = output_dir / "lr_finder.csv"
    png_path = output_dir / "lr_finder.png"

    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lr", "loss", "smoothed_loss"])
        writer.writerows(zip(result.lrs, result.losses, result.smoothed_losses))

    # A bare Figure renders with Agg without touching pyplot's global backend.
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(result.lrs, result.losses, color="tab:blue", alpha=0.35, label="loss")
    axes.plot(result.lrs, result.smoothed_losses, color="tab:blue", label="smoothed loss")
    axes.axvline(result.suggestion, color="tab:green", linestyle="--",
                 label=f"suggestion ({result.rule}): {result.suggestion:.2e}")
    min_index = result.lrs.index(result.min_loss_lr)
    axes.plot([result.min_loss_lr], [result.smoothed_losses[min_index]], "o", color="tab:red",
              label=f"min smoothed loss at lr {result.min_loss_lr:.2e}")
    axes.set_xscale("log")
    # Raw spikes after divergence would flatten the interesting part of the curve.
    axes.set_ylim(min(result.losses) * 0.95, max(result.smoothed_losses) * 1.1)
    axes.set_xlabel("head learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(f"LR range test: {result.num_steps_run} steps, batch {result.batch_size}")
    axes.legend()
    figure.savefig(png_path, dpi=120)
    return csv_path, png_path
