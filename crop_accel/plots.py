"""PNG plots of a training run: confusion matrix, worst errors and training curves.

Figures are built on matplotlib's Agg canvas directly, without pyplot, so plotting needs
no display and leaves no global figure state behind in a long training process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from crop_accel.images import ImageLoadError, load_rgb

if TYPE_CHECKING:
    from crop_accel.analysis import WorstError

logger = logging.getLogger(__name__)

# Shorter side, in pixels, of the photos shown in error grids and W&B galleries. Larger
# photos are decoded at reduced resolution, which keeps a grid of 36 photos fast.
THUMBNAIL_MIN_SIDE = 256

# Above this many classes the cells are too small to hold a readable count.
MAX_ANNOTATED_CLASSES = 30

GRID_COLUMNS = 6


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` and rename it to ``path`` on success.

    A crash or an exception while writing leaves any previous ``path`` untouched and
    removes the temporary file, so readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def row_normalise(matrix: np.ndarray) -> np.ndarray:
    """Divide each row by its sum, so a cell is the share of the true class. All-zero rows stay 0."""
    matrix = np.asarray(matrix, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str], title: str | None = None) -> Figure:
    """Draw the row-normalised confusion matrix as a heatmap, rows being the true classes.

    Non-zero counts are written in their cells when there are at most
    ``MAX_ANNOTATED_CLASSES`` classes.
    """
    matrix = np.asarray(matrix)
    num_classes = len(class_names)
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(
            f"confusion matrix has shape {matrix.shape} but there are {num_classes} class names; "
            "pass the K x K matrix of the same classes"
        )
    shares = row_normalise(matrix)

    side = max(6.0, 0.42 * num_classes + 3.0)
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    heatmap = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(heatmap, ax=axes, fraction=0.046, pad=0.02, label="share of the true class")

    label_size = float(np.clip(240 / max(num_classes, 1), 6, 11))
    ticks = np.arange(num_classes)
    # Class and file names are shown as written, so a "$" in one does not start mathtext.
    # Class and file names are shown as written, so a "$" in one does not start mathtext.
    axes.set_xticks(
        ticks, labels=class_names, rotation=45, ha="right", rotation_mode="anchor", fontsize=label_size, parse_math=False
    )
    axes.set_yticks(ticks, labels=class_names, fontsize=label_size, parse_math=False)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title or f"Confusion matrix, row-normalised ({int(matrix.sum())} samples)")

    if num_classes <= MAX_ANNOTATED_CLASSES:
        count_size = float(np.clip(180 / max(num_classes, 1), 5, 12))
        for row, column in zip(*np.nonzero(matrix)):
            color = "white" if shares[row, column] > 0.5 else "black"
            count = str(int(matrix[row, column]))
            axes.text(column, row, count, ha="center", va="center", color=color, fontsize=count_size)
    return figure


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | Path, title: str | None = None) -> Path:
    """Save the row-normalised confusion matrix heatmap as a PNG at ``path``."""
    return save_figure(confusion_matrix_figure(matrix, class_names, title), path)


def plot_worst_errors(errors: Sequence[WorstError], data_dir: str | Path, path: str | Path) -> Path:
    """Save the grid of misclassified photos from ``worst_errors_figure`` as a PNG at ``path``."""
    return save_figure(worst_errors_figure(errors, data_dir), path)


def worst_errors_figure(errors: Sequence[WorstError], data_dir: str | Path) -> Figure:
    """Draw a grid of the misclassified photos, each titled with its caption and file name.

    A photo that cannot be decoded gets a grey tile naming the reason instead, so one bad
    file does not cost the whole grid.
    """
    if not errors:
        raise ValueError("no errors to plot; skip the grid when the model made no mistakes")
    data_dir = Path(data_dir)
    columns = min(GRID_COLUMNS, len(errors))
    rows = math.ceil(len(errors) / columns)
    figure = Figure(figsize=(2.7 * columns, 3.1 * rows), layout="constrained")
    FigureCanvasAgg(figure)

    for index, error in enumerate(errors):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.set_xticks([])
        axes.set_yticks([])
        try:
            axes.imshow(load_rgb(data_dir / error.path, min_side=THUMBNAIL_MIN_SIDE))
        except ImageLoadError as failure:
            logger.warning("Showing a blank tile for %s in the error grid: %s", error.path, failure.reason)
            axes.set_facecolor("0.85")
            message = textwrap.fill(f"cannot load image: {failure.reason}", 28)
            axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=6, transform=axes.transAxes)
        axes.set_title(textwrap.fill(error.caption(), 34), fontsize=7, parse_math=False)
        axes.set_xlabel(textwrap.shorten(Path(error.path).name, 40), fontsize=6, parse_math=False)
    return figure


def plot_training_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Save the two panels of ``training_curves_figure`` as a PNG at ``path``."""
    return save_figure(training_curves_figure(history), path)


def training_curves_figure(history: Sequence[dict]) -> Figure:
    """Draw loss and accuracy against epoch, for training and validation, as two panels.

    ``history`` contains one dict per epoch with the keys ``epoch``, ``train_loss``,
    ``train_acc``, ``val_loss`` and ``val_acc``. A missing or None value leaves a gap,
    for example in epochs without validation.
    """
    if not history:
        raise ValueError("history is empty; log at least one epoch before plotting curves")
    epochs = [entry["epoch"] for entry in history]
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)

    for axes, metric, label in ((loss_axes, "loss", "loss"), (accuracy_axes, "acc", "accuracy")):
        for split in ("train", "val"):
            values = [_to_float(entry.get(f"{split}_{metric}")) for entry in history]
            axes.plot(epochs, values, marker="o" if len(epochs) <= 30 else None, label=split)
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.set_title(label.capitalize())
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def figure_to_image(figure: Figure) -> Image.Image:
    """Render ``figure`` to an RGB PIL image, for logging to W&B without a file."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.convert("RGB")


def save_figure(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG at ``path`` through a temporary file and return ``path``."""
    path = Path(path)
    with atomic_output(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    logger.debug("Wrote %s", path)
    return path


def _to_float(value: object) -> float:
    return math.nan if value is None else float(value)
