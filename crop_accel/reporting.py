"""Reports of the main process after each step and epoch: files, console and W&B.

Every file is rewritten whole after each epoch through a temporary name, so a run
killed at any point leaves the outputs of its last finished epoch intact.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console

from crop_accel.analysis import Analysis, analyze_predictions, print_analysis, write_analysis
from crop_accel.console import epoch_table
from crop_accel.engine import EpochStats, EvalOutput
from crop_accel.export import atomic_write_json, save_model
from crop_accel.lr_auto import report_sweep_cost
from crop_accel.plots import plot_training_curves
from crop_accel.records import History
from crop_accel.tracking import RunTracking

logger = logging.getLogger(__name__)


class Reporter:
    """Writes metrics, the best model and its analysis; sends the same to W&B.

    Only the main process writes; on the others every method returns at once.
    """

    def __init__(self, accelerator, output_dir: Path, data, data_config: dict, model_name: str,
                 tracking: RunTracking, history: History, console: Console, run_config: dict,
                 num_worst: int = 36):
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.data = data
        self.data_config = data_config
        self.model_name = model_name
        self.tracking = tracking
        self.history = history
        self.console = console
        self.run_config = run_config
        self.num_worst = num_worst
        self.best_analysis: Analysis | None = None
        self.active = accelerator.is_main_process

    def log_step(self, step: int, loss: float, optimizer) -> None:
        """Send the batch loss and every param group's learning rate to W&B."""
        if not self.active or not self.tracking.enabled:
            return
        metrics = {"train/loss_step": loss}
        for group in optimizer.param_groups:
            metrics[f"lr/{group['name']}"] = group["lr"]
        self.tracking.log(metrics, step=step)

    def analyze(self, evaluation: EvalOutput) -> Analysis | None:
        """Score gathered predictions; validation paths come from the split."""
        if not self.active:
            return None
        samples = self.data.val_set.samples
        paths = [samples[index][0] for index in evaluation.indices]
        class_names = self.data.scan.classes
        return analyze_predictions(evaluation.targets, evaluation.probs, class_names, paths, self.num_worst)

    def end_epoch(self, row: dict, model, analysis: Analysis | None, step: int) -> bool:
        """Record the epoch; on a new best, save the model and its analysis. Return is_best."""
        if analysis is not None:
            row["val_macro_f1"] = analysis.macro_f1
            if analysis.top5_accuracy is not None:
                row["val_top5_acc"] = analysis.top5_accuracy
        is_best = self.history.add(row)
        if not self.active:
            return is_best

        if is_best:
            save_model(model, self.output_dir, self.model_name, self.data.scan.classes, self.data_config)
            write_analysis(analysis, self.output_dir, self.data.scan.data_dir)
            self.best_analysis = analysis
        atomic_write_json(self.output_dir / "metrics.json", self.history.to_dict())
        self._plot_curves()
        lr_finder = self.run_config.get("lr_finder")
        if lr_finder is not None and "epoch_seconds" not in lr_finder:
            report_sweep_cost(lr_finder, row["seconds"])
            atomic_write_json(self.output_dir / "config.json", self.run_config)

        scalars = {f"epoch/{key}": value for key, value in row.items() if isinstance(value, (int, float))}
        self.tracking.log(scalars, step=step)
        if is_best:
            self.tracking.log_analysis(analysis, step=step, data_dir=self.data.scan.data_dir)
        return is_best

    def finish(self) -> None:
        """Print the summary tables and close the W&B run with the best model attached."""
        if self.active and self.history.epochs:
            self.console.print(epoch_table(self.history.epochs))
            if self.best_analysis is not None:
                print_analysis(self.best_analysis, self.console)
            best = self.history.best
            logger.info(
                "Best epoch %d: val_acc %.4f. Model and analysis in %s", best["epoch"], best["val_acc"], self.output_dir
            )
            self.tracking.log_model_artifact(self.output_dir)
        self.tracking.finish()

    def _plot_curves(self) -> None:
        try:
            plot_training_curves(self.history.epochs, self.output_dir / "training_curves.png")
        except Exception:  # a plot must never end a training run
            logger.warning("Failed to write training_curves.png", exc_info=True)


def epoch_row(epoch: int, train_stats: EpochStats, evaluation: EvalOutput, optimizer) -> dict:
    """Build the metrics.json row of one epoch."""
    return {
        "epoch": epoch,
        "train_loss": train_stats.loss,
        "train_acc": train_stats.accuracy,
        "val_loss": evaluation.loss,
        "val_acc": evaluation.accuracy,
        "lr": optimizer.param_groups[-1]["lr"],
        "group_lrs": [group["lr"] for group in optimizer.param_groups],
        "seconds": train_stats.seconds + evaluation.seconds,
        "train_images_per_second": train_stats.images_per_second,
        # Fewer than the loader's batches when the epoch was resumed from a mid-epoch checkpoint;
        # train_loss and train_acc then cover only these batches.
        "train_batches": train_stats.batches,
        "val_images": len(evaluation.targets),
    }
