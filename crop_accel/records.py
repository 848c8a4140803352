"""Run records: the resolved config and the per-epoch metrics history."""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch
from accelerate import Accelerator

from crop_accel.scan import display_path


@dataclass
class History:
    """Per-epoch metrics and the best epoch so far, as written to metrics.json."""

    epochs: list[dict] = field(default_factory=list)
    best: dict | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "History":
        return cls(epochs=list(data.get("epochs", [])), best=data.get("best"))

    def add(self, row: dict) -> bool:
        """Append an epoch; return True when it is the best so far.

        Best means the highest validation accuracy, and among equal accuracies the
        lowest validation loss.
        """
        self.epochs.append(row)
        key = (row["val_acc"], -row["val_loss"])
        if self.best is None or key > (self.best["val_acc"], -self.best["val_loss"]):
            self.best = {"epoch": row["epoch"], "val_acc": row["val_acc"], "val_loss": row["val_loss"]}
            return True
        return False

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "best": self.best}


def build_run_config(args, accelerator: Accelerator, precision: str, data_config: dict, optimizer, data) -> dict:
    """Collect every resolved option and derived setting for config.json."""
    options = {key: (list(value) if isinstance(value, tuple) else value) for key, value in vars(args).items()}
    options.pop("handler", None)
    return {
        **options,
        "num_processes": accelerator.num_processes,
        "mixed_precision_requested": accelerator.mixed_precision,
        "mixed_precision": precision,
        "global_batch_size": args.batch_size * accelerator.num_processes * args.grad_accum_steps,
        "lr_scaling": "none: --lr is used as given whatever the global batch size",
        "param_groups": [
            # OneCycleLR moves "lr" to its starting value and keeps the peak in "max_lr".
            {"name": group["name"], "lr": group.get("max_lr", group["lr"]), "divisor": group["divisor"]}
            for group in optimizer.param_groups
        ],
        "data_config": data_config,
        "classes": data.scan.classes,
        "train_images": len(data.train_set),
        "val_images": len(data.val_set),
        "skipped_files": [{"path": display_path(path), "reason": reason} for path, reason in data.scan.skipped],
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
