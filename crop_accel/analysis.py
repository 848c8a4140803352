"""Evaluation of gathered validation predictions: scores, confusion and the worst errors.

The training loop gathers targets, softmax probabilities and image paths from every
process and calls these functions on the main process with plain numpy arrays.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from crop_accel import plots
from crop_accel.plots import atomic_output

logger = logging.getLogger(__name__)

# Probabilities are clipped here before the log, so a zero probability for the true class
# costs -log(1e-12) = 27.6 instead of infinity. Cross-entropy computed from logits can
# therefore be higher than this loss for extremely confident mistakes.
MIN_PROBABILITY = 1e-12

# Softmax rows in float16 or bfloat16 can miss 1 by a few thousandths.
ROW_SUM_TOLERANCE = 1e-2

NUM_CONFUSED_PAIRS = 10


@dataclass(frozen=True)
class ClassScore:
    """Precision, recall, F1 and support (number of true samples) of one class."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ConfusedPair:
    """Samples of ``true_class`` predicted as ``predicted_class``, and their share of ``true_class``."""

    true_class: str
    predicted_class: str
    count: int
    share: float


@dataclass(frozen=True)
class WorstError:
    """A misclassified sample with the probability of the predicted and of the true class."""

    path: str
    true_class: str
    predicted_class: str
    confidence: float
    true_probability: float

    def caption(self) -> str:
        """Format the caption used in the error grid and the W&B gallery."""
        return (
            f"true: {self.true_class} / pred: {self.predicted_class} "
            f"(p={self.confidence:.2f}, p_true={self.true_probability:.2f})"
        )


@dataclass
class Analysis:
    """Scores of one evaluation, with the per-sample targets and predictions behind them."""

    class_names: list[str]
    accuracy: float
    top5_accuracy: float | None
    loss: float
    macro_f1: float
    confusion: np.ndarray
    per_class: list[ClassScore]
    confused_pairs: list[ConfusedPair]
    worst_errors: list[WorstError]
    targets: np.ndarray = field(repr=False)
    predictions: np.ndarray = field(repr=False)

    @property
    def num_samples(self) -> int:
        return int(self.targets.shape[0])

    def scalar_metrics(self) -> dict[str, float]:
        """Return the scalar scores, with ``top5_accuracy`` only when there are more than 5 classes."""
        metrics = {"accuracy": self.accuracy, "loss": self.loss, "macro_f1": self.macro_f1}
        if self.top5_accuracy is not None:
            metrics["top5_accuracy"] = self.top5_accuracy
        return metrics

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable summary for metrics.json, without per-sample arrays."""
        return {
            "num_samples": self.num_samples,
            "accuracy": self.accuracy,
            "top5_accuracy": self.top5_accuracy,
            "loss": self.loss,
            "macro_f1": self.macro_f1,
            "per_class": {
                score.name: {"precision": score.precision, "recall": score.recall, "f1": score.f1, "support": score.support}
                for score in self.per_class
            },
            "confused_pairs": [vars(pair) for pair in self.confused_pairs],
            "worst_errors": [vars(error) for error in self.worst_errors],
            "confusion_matrix": {"classes": list(self.class_names), "counts": self.confusion.tolist()},
        }


def analyze_predictions(
    targets: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    paths: list[str],
    num_worst: int = 36,
) -> Analysis:
    """Score softmax ``probs`` (N, K) against integer ``targets`` (N,).

    ``paths`` are the images' paths relative to the data folder. The ``num_worst`` wrong
    predictions with the highest predicted probability become ``worst_errors``, most
    confident first. ``macro_f1`` averages over the classes present in ``targets``.
    """
    targets, probs = _validate(targets, probs, class_names, paths, num_worst)
    num_classes = len(class_names)
    labels = list(range(num_classes))
    predictions = probs.argmax(axis=1)
    true_probabilities = probs[np.arange(len(targets)), targets]

    top5_accuracy = None
    if num_classes > 5:
        top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
        top5_accuracy = float((top5 == targets[:, None]).any(axis=1).mean())

    matrix = confusion_matrix(targets, predictions, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predictions, labels=labels, zero_division=0
    )
    per_class = [
        ClassScore(name, float(p), float(r), float(f), int(s))
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
    ]
    present = support > 0

    return Analysis(
        class_names=list(class_names),
        accuracy=float((predictions == targets).mean()),
        top5_accuracy=top5_accuracy,
        loss=float(-np.log(np.clip(true_probabilities, MIN_PROBABILITY, 1.0)).mean()),
        macro_f1=float(f1[present].mean()),
        confusion=matrix,
        per_class=per_class,
        confused_pairs=most_confused_pairs(matrix, class_names),
        worst_errors=_worst_errors(targets, probs, predictions, class_names, paths, num_worst),
        targets=targets,
        predictions=predictions,
    )


def most_confused_pairs(matrix: np.ndarray, class_names: list[str], limit: int = NUM_CONFUSED_PAIRS) -> list[ConfusedPair]:
    """List the ``limit`` largest non-zero off-diagonal cells, largest first, ties in matrix order."""
    off_diagonal = np.array(matrix, copy=True)
    np.fill_diagonal(off_diagonal, 0)
    rows, columns = np.nonzero(off_diagonal)
    counts = off_diagonal[rows, columns]
    order = np.argsort(-counts, kind="stable")[:limit]
    totals = np.asarray(matrix).sum(axis=1)
    return [
        ConfusedPair(
            true_class=class_names[rows[i]],
            predicted_class=class_names[columns[i]],
            count=int(counts[i]),
            share=float(counts[i] / totals[rows[i]]),
        )
        for i in order
    ]


def write_analysis(analysis: Analysis, output_dir: str | Path, data_dir: str | Path) -> dict[str, Path]:
    """Write the CSV tables, then the confusion-matrix and worst-error PNGs, to ``output_dir``.

    Returns the written files by name. A plot that fails is logged and skipped, and the
    files written before it stay in place.
    """
    output_dir = Path(output_dir)
    written = {
        "confusion_matrix.csv": _write_confusion_csv(analysis, output_dir / "confusion_matrix.csv"),
        "per_class.csv": _write_per_class_csv(analysis, output_dir / "per_class.csv"),
        "worst_errors.csv": _write_worst_errors_csv(analysis, output_dir / "worst_errors.csv"),
    }

    title = f"Confusion matrix, row-normalised ({analysis.num_samples} samples, accuracy {analysis.accuracy:.3f})"

    def plot_confusion(path: Path) -> Path:
        return plots.plot_confusion_matrix(analysis.confusion, analysis.class_names, path, title)

    def plot_errors(path: Path) -> Path:
        return plots.plot_worst_errors(analysis.worst_errors, data_dir, path)

    plot_jobs = [("confusion_matrix.png", plot_confusion)]
    if analysis.worst_errors:
        plot_jobs.append(("worst_errors.png", plot_errors))
    else:
        logger.info("Writing no worst_errors.png because the model classified all %d samples correctly", analysis.num_samples)

    for name, plot in plot_jobs:
        try:
            written[name] = plot(output_dir / name)
        except Exception:
            logger.warning("Failed to write %s; the other analysis files are kept", output_dir / name, exc_info=True)
    return written


def print_analysis(analysis: Analysis, console: Console) -> None:
    """Print the headline scores, per-class scores and the most-confused pairs as rich tables."""
    top5 = "n/a" if analysis.top5_accuracy is None else f"{analysis.top5_accuracy:.3f}"
    console.print(
        f"accuracy {analysis.accuracy:.3f}  top-5 {top5}  macro F1 {analysis.macro_f1:.3f}  "
        f"loss {analysis.loss:.4f}  ({analysis.num_samples} samples)"
    )

    scores = Table(title="Per-class scores")
    for column in ("class", "precision", "recall", "F1", "support"):
        scores.add_column(column, justify="left" if column == "class" else "right")
    for score in analysis.per_class:
        style = "red" if score.support and score.f1 < 0.5 else None
        cells = (f"{score.precision:.3f}", f"{score.recall:.3f}", f"{score.f1:.3f}", str(score.support))
        scores.add_row(escape(score.name), *cells, style=style)
    console.print(scores)

    if not analysis.confused_pairs:
        console.print("No class was confused with another.")
        return
    pairs = Table(title="Most-confused class pairs")
    for column in ("true class", "predicted as", "count", "share of true class"):
        pairs.add_column(column, justify="right" if column in ("count", "share of true class") else "left")
    for pair in analysis.confused_pairs:
        pairs.add_row(escape(pair.true_class), escape(pair.predicted_class), str(pair.count), f"{pair.share:.1%}")
    console.print(pairs)


def _validate(targets, probs, class_names, paths, num_worst) -> tuple[np.ndarray, np.ndarray]:
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    if targets.ndim != 1 or targets.shape[0] == 0:
        raise ValueError(f"targets must be a non-empty 1-D array, got shape {targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if probs.shape != (targets.shape[0], num_classes):
        raise ValueError(
            f"probs has shape {probs.shape}, expected ({targets.shape[0]}, {num_classes}) "
            "for the given targets and class names"
        )
    if len(paths) != targets.shape[0]:
        raise ValueError(f"got {len(paths)} paths for {targets.shape[0]} targets; pass one path per sample")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes - 1}], got values from {targets.min()} to {targets.max()}")
    if num_worst < 0:
        raise ValueError(f"num_worst must be 0 or more, got {num_worst}")

    row_sums = probs.sum(axis=1)
    worst_row = int(np.argmax(np.abs(row_sums - 1.0)))
    if not np.isfinite(probs).all() or probs.min() < 0 or not math.isclose(row_sums[worst_row], 1.0, abs_tol=ROW_SUM_TOLERANCE):
        raise ValueError(
            f"probs must be finite, non-negative rows that sum to 1 (row {worst_row} sums to "
            f"{row_sums[worst_row]:.4f}); apply softmax to the logits first"
        )
    return targets.astype(np.int64), probs


def _worst_errors(targets, probs, predictions, class_names, paths, limit) -> list[WorstError]:
    wrong = np.flatnonzero(predictions != targets)
    confidences = probs[wrong, predictions[wrong]]
    order = wrong[np.argsort(-confidences, kind="stable")][:limit]
    return [
        WorstError(
            path=str(paths[i]),
            true_class=class_names[targets[i]],
            predicted_class=class_names[predictions[i]],
            confidence=float(probs[i, predictions[i]]),
            true_probability=float(probs[i, targets[i]]),
        )
        for i in order
    ]


def _write_confusion_csv(analysis: Analysis, path: Path) -> Path:
    rows = [["true \\ predicted", *analysis.class_names]]
    rows += [[name, *map(int, counts)] for name, counts in zip(analysis.class_names, analysis.confusion)]
    return _write_csv(path, rows)


def _write_per_class_csv(analysis: Analysis, path: Path) -> Path:
    rows: list[list[Any]] = [["class", "precision", "recall", "f1", "support"]]
    rows += [[s.name, f"{s.precision:.6f}", f"{s.recall:.6f}", f"{s.f1:.6f}", s.support] for s in analysis.per_class]
    return _write_csv(path, rows)


def _write_worst_errors_csv(analysis: Analysis, path: Path) -> Path:
    rows: list[list[Any]] = [["rank", "path", "true_class", "predicted_class", "confidence", "true_probability"]]
    rows += [
        [rank, e.path, e.true_class, e.predicted_class, f"{e.confidence:.6f}", f"{e.true_probability:.6f}"]
        for rank, e in enumerate(analysis.worst_errors, start=1)
    ]
    return _write_csv(path, rows)


def _write_csv(path: Path, rows: list[list[Any]]) -> Path:
    with atomic_output(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(rows)
    return path
