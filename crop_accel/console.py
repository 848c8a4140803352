"""Console output of the main process: rich progress bars, or log lines for job logs.

A terminal gets live bars for epochs and batches. When stdout is not a terminal (a
cluster job writing to a file), bars would fill the log with control codes, so the same
figures go out as plain log lines instead, about ten per epoch.
"""

from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

logger = logging.getLogger(__name__)


def setup_logging(console: Console, is_main_process: bool, verbose: bool = False) -> None:
    """Send log records of the main process through rich; other processes log warnings only."""
    level = logging.DEBUG if verbose else logging.INFO
    if not is_main_process:
        level = logging.WARNING
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, markup=False)
        logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", handlers=[handler], force=True)
    else:
        # Job logs get one plain line per record, which grep and log collectors handle.
        handler = logging.StreamHandler(console.file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "timm", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_error(console: Console, error: Exception) -> None:
    """Print ``error`` as one ``error:`` line, unwrapped by rich, so that grep finds it in job logs."""
    console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)


class TrainingProgress:
    """Epoch and batch progress with running loss, accuracy, images/s and ETA."""

    def __init__(self, console: Console, epochs: int, steps_per_epoch: int, enabled: bool = True):
        self.console = console
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self._progress: Progress | None = None
        self._epoch_task = None
        self._batch_task = None
        self._reset_epoch_counters()

    def __enter__(self) -> "TrainingProgress":
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._epoch_task = self._progress.add_task("epochs", total=self.epochs, stats="")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Start the bar of ``epoch``; ``first_batch`` > 0 when resuming inside it."""
        self._reset_epoch_counters()
        self._epoch = epoch
        self._first_batch = first_batch
        if self._progress is not None:
            if self._batch_task is not None:
                self._progress.remove_task(self._batch_task)
            self._batch_task = self._progress.add_task(
                f"epoch {epoch}/{self.epochs}", total=self.steps_per_epoch, completed=first_batch, stats=""
            )
            self._progress.update(self._epoch_task, completed=epoch - 1)

    def update_batch(self, batch_index: int, loss: float, accuracy: float, images: int) -> None:
        """Record one batch of the main process's shard; figures are per process."""
        if not self.enabled:
            return
        self._loss_sum += loss * images
        self._correct += accuracy * images
        self._images += images
        elapsed = time.perf_counter() - self._epoch_start
        rate = self._images / elapsed if elapsed > 0 else 0.0
        stats = f"loss {self._loss_sum / self._images:.4f} acc {self._correct / self._images:.3f} {rate:.1f} img/s"

        if self._progress is not None:
            self._progress.update(self._batch_task, completed=batch_index + 1, stats=stats)
            return
        step = batch_index + 1
        every = max(1, self.steps_per_epoch // 10)
        if step % every == 0 or step == self.steps_per_epoch:
            remaining = (self.steps_per_epoch - step) * elapsed / max(1, step - self._first_batch)
            logger.info(
                "epoch %d/%d step %d/%d %s, epoch ETA %.0fs",
                self._epoch, self.epochs, step, self.steps_per_epoch, stats, remaining,
            )

    def end_epoch(self, summary: str) -> None:
        if self._progress is not None:
            self._progress.update(self._epoch_task, advance=1, stats=summary)
        elif self.enabled:
            logger.info("epoch %d/%d done: %s", self._epoch, self.epochs, summary)

    def _reset_epoch_counters(self) -> None:
        self._epoch = 0
        self._first_batch = 0
        self._epoch_start = time.perf_counter()
        self._loss_sum = 0.0
        self._correct = 0.0
        self._images = 0


def epoch_table(history: list[dict]) -> Table:
    """Build the per-epoch summary table printed at the end of training."""
    table = Table(title="Training summary")
    for column in ("epoch", "train loss", "train acc", "val loss", "val acc", "lr (head)", "seconds", "img/s"):
        table.add_column(column, justify="right")
    best_epoch = max(history, key=lambda row: row["val_acc"])["epoch"] if history else None
    for row in history:
        style = "bold green" if row["epoch"] == best_epoch else None
        table.add_row(
            str(row["epoch"]),
            f"{row['train_loss']:.4f}",
            f"{row['train_acc']:.3f}",
            f"{row['val_loss']:.4f}",
            f"{row['val_acc']:.3f}",
            f"{row['lr']:.2e}",
            f"{row['seconds']:.1f}",
            f"{row['train_images_per_second']:.1f}",
            style=style,
        )
    return table


class CountProgress:
    """A single transient bar for a counted task, such as filling the image cache."""

    def __init__(self, console: Console, description: str, enabled: bool = True):
        self.enabled = enabled and console.is_terminal
        self._progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                  console=console, transient=True)
        self._task = None

    def __enter__(self) -> "CountProgress":
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.enabled:
            self._progress.stop()

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._task is None:
            self._task = self._progress.add_task("", total=total)
        self._progress.update(self._task, completed=done)
