"""W&B payloads: tables, charts and images built from an analysis or the LR finder curve."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from crop_accel import plots
from crop_accel.analysis import Analysis
from crop_accel.images import ImageLoadError, load_rgb

logger = logging.getLogger(__name__)


def analysis_payload(analysis: Analysis, data_dir: Path, prefix: str) -> dict[str, Any]:
    import wandb

    scores = wandb.Table(
        columns=["class", "precision", "recall", "f1", "support"],
        data=[[s.name, s.precision, s.recall, s.f1, s.support] for s in analysis.per_class],
    )
    pairs = wandb.Table(
        columns=["true_class", "predicted_class", "count", "share"],
        data=[[p.true_class, p.predicted_class, p.count, p.share] for p in analysis.confused_pairs],
    )
    heatmap = plots.figure_to_image(plots.confusion_matrix_figure(analysis.confusion, analysis.class_names))
    payload: dict[str, Any] = {
        f"{prefix}/per_class": scores,
        f"{prefix}/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=analysis.targets.tolist(), preds=analysis.predictions.tolist(),
            class_names=list(analysis.class_names), title="Confusion matrix (counts)",
        ),
        f"{prefix}/confusion_matrix_normalised": wandb.Image(heatmap, caption="rows: true class, share of the true class"),
        f"{prefix}/confused_pairs": pairs,
    }
    # Accuracy and loss are left to the training loop, whose loss comes from the logits.
    payload[f"{prefix}/macro_f1"] = analysis.macro_f1
    if analysis.top5_accuracy is not None:
        payload[f"{prefix}/top5_accuracy"] = analysis.top5_accuracy

    gallery = []
    for error in analysis.worst_errors:
        try:
            image = load_rgb(data_dir / error.path, min_side=plots.THUMBNAIL_MIN_SIDE)
        except ImageLoadError as failure:
            logger.warning("Leaving %s out of the W&B worst-error gallery: %s", error.path, failure.reason)
            continue
        gallery.append(wandb.Image(image, caption=error.caption()))
    if gallery:
        payload[f"{prefix}/worst_errors"] = gallery
    return payload


def lr_finder_payload(csv_path: Path, png_path: Path) -> dict[str, Any]:
    import wandb

    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = [{name: finite_or_none(value) for name, value in row.items()} for row in csv.DictReader(handle)]
    if not rows or "lr" not in rows[0] or "loss" not in rows[0]:
        raise ValueError(f"{csv_path} needs the columns 'lr' and 'loss' and at least one row")

    columns = [*rows[0].keys(), "log10_lr"]
    data = [[*row.values(), math.log10(row["lr"]) if row["lr"] and row["lr"] > 0 else None] for row in rows]
    table = wandb.Table(columns=columns, data=data)
    # crop_accel.lr_finder writes a smoothed_loss column next to the raw loss. The smoothed
    # curve is the one to judge by eye, because the raw loss jumps from batch to batch.
    y_column = "smoothed_loss" if "smoothed_loss" in columns else "loss"
    return {
        "lr_finder/table": table,
        "lr_finder/curve": wandb.plot.line(table, "log10_lr", y_column, title=f"LR finder: {y_column} against log10(lr)"),
        "lr_finder/plot": wandb.Image(str(png_path)),
    }


def finite_or_none(text: str) -> float | None:
    # JSON, and so a W&B table, has no NaN or infinity, so a diverged loss becomes an empty cell.
    value = float(text)
    return value if math.isfinite(value) else None
