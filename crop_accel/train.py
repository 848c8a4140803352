"""The ``train`` command: fine-tune a timm model on an ImageFolder with accelerate.

The flow reads top to bottom: accelerator, data, model and optimizer, prepare, then the
epoch loop with evaluation and the best model kept on disk.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console

from crop_accel import data as data_lib
from crop_accel.console import TrainingProgress, epoch_table, setup_logging
from crop_accel.engine import evaluate, train_one_epoch
from crop_accel.export import atomic_write_json, save_model
from crop_accel.model import build_param_groups, create_model
from crop_accel.runtime import build_accelerator, effective_precision, resolve_output_dir, share_from_main
from crop_accel.scan import ScanResult, scan_image_folder, validate_for_training

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """The scanned folder, its split and the two datasets built from it."""

    scan: ScanResult
    split: data_lib.Split
    train_set: data_lib.ImageFolderDataset
    val_set: data_lib.ImageFolderDataset


@dataclass
class History:
    """Per-epoch metrics and the best epoch so far, as written to metrics.json."""

    epochs: list[dict] = field(default_factory=list)
    best: dict | None = None

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


def scan_training_folder(accelerator: Accelerator, data_dir: str) -> ScanResult:
    """Scan the folder on the main process only and share the result with all processes."""
    scan = share_from_main(accelerator, lambda: scan_image_folder(data_dir))
    validate_for_training(scan)
    return scan


def build_training_data(accelerator: Accelerator, args, scan: ScanResult, data_config: dict, output_dir: Path) -> TrainingData:
    """Split the scanned images and build the train and validation datasets."""
    labels = [label for _, label in scan.samples]
    groups = None
    if args.group_duplicates and getattr(scan, "groups", None):
        groups = [scan.groups[path] for path, _ in scan.samples]
    split = data_lib.split_train_val(labels, args.val_fraction, args.seed, groups)

    train_transform, eval_transform = data_lib.build_transforms(data_config)
    train_set = data_lib.ImageFolderDataset(scan.data_dir, [scan.samples[i] for i in split.train], train_transform)
    val_set = data_lib.ImageFolderDataset(scan.data_dir, [scan.samples[i] for i in split.val], eval_transform)

    if accelerator.is_main_process:
        data_lib.write_split_csv(output_dir / "split.csv", scan.samples, scan.classes, split)
        logger.info(
            "%d classes, %d train and %d validation images, %d files skipped",
            len(scan.classes), len(train_set), len(val_set), len(scan.skipped),
        )
    return TrainingData(scan=scan, split=split, train_set=train_set, val_set=val_set)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
    """One-cycle with each group's own maximum lr, or a constant lr."""
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=max(1, total_steps)
    )


def build_run_config(args, accelerator: Accelerator, precision: str, data_config: dict, optimizer, data: TrainingData) -> dict:
    """Collect every resolved option and derived setting for config.json."""
    options = {key: (list(value) if isinstance(value, tuple) else value) for key, value in vars(args).items()}
    options.pop("handler", None)
    return {
        **options,
        "num_processes": accelerator.num_processes,
        "mixed_precision_requested": accelerator.mixed_precision,
        "mixed_precision": precision,
        "global_batch_size": args.batch_size * accelerator.num_processes * args.grad_accum_steps,
        "param_groups": [
            # OneCycleLR moves "lr" to its starting value and keeps the peak in "max_lr".
            {"name": group["name"], "lr": group.get("max_lr", group["lr"]), "divisor": group["divisor"]}
            for group in optimizer.param_groups
        ],
        "data_config": data_config,
        "classes": data.scan.classes,
        "train_images": len(data.train_set),
        "val_images": len(data.val_set),
        "skipped_files": [{"path": path, "reason": reason} for path, reason in data.scan.skipped],
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }


def run_training(args, console: Console | None = None) -> dict:
    """Train, evaluate every epoch, keep the best model; return metrics.json's content."""
    console = console or Console()
    accelerator = build_accelerator(args)
    setup_logging(console, accelerator.is_main_process, getattr(args, "verbose", False))
    precision = effective_precision(accelerator)
    set_seed(args.seed)
    output_dir = resolve_output_dir(accelerator, args.output_dir, args.model)

    # Data: the class list decides the head size, so the folder is scanned first.
    scan = scan_training_folder(accelerator, args.data_dir)
    model = create_model(args.model, len(scan.classes), args.pretrained, args.pretrained_file)
    data_config = data_lib.resolve_data_config(model, args.image_size)
    data = build_training_data(accelerator, args, scan, data_config, output_dir)

    # Model and optimizer. SyncBatchNorm must replace BatchNorm before DDP wraps the model.
    if args.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(build_param_groups(model, args.lr, args.lr_divisors))

    num_workers = args.num_workers if args.num_workers is not None else data_lib.default_num_workers()
    train_loader = data_lib.build_loader(data.train_set, args.batch_size, True, num_workers, args.seed)
    val_loader = data_lib.build_loader(data.val_set, args.batch_size, False, num_workers, args.seed)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if args.compile:
        model = torch.compile(model)

    # One scheduler step per optimizer step, counted on this process's shard of the data.
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    scheduler = accelerator.prepare(build_scheduler(optimizer, args.schedule, steps_per_epoch * args.epochs))

    run_config = build_run_config(args, accelerator, precision, data_config, optimizer, data)
    if accelerator.is_main_process:
        atomic_write_json(output_dir / "config.json", run_config)
        logger.info(
            "Training %s on %d process(es), %s precision, global batch %d, output in %s",
            args.model, accelerator.num_processes, precision, run_config["global_batch_size"], output_dir,
        )

    history = History()
    unwrapped = accelerator.unwrap_model(model)
    with TrainingProgress(console, args.epochs, len(train_loader), enabled=accelerator.is_main_process) as progress:
        for epoch in range(1, args.epochs + 1):
            progress.start_epoch(epoch)
            train_loader.set_epoch(epoch)
            train_stats = train_one_epoch(
                accelerator, model, train_loader, optimizer, scheduler, args.max_grad_norm, progress.update_batch
            )
            evaluation = evaluate(accelerator, model, val_loader)

            row = {
                "epoch": epoch,
                "train_loss": train_stats.loss,
                "train_acc": train_stats.accuracy,
                "val_loss": evaluation.loss,
                "val_acc": evaluation.accuracy,
                "lr": optimizer.param_groups[-1]["lr"],
                "group_lrs": [group["lr"] for group in optimizer.param_groups],
                "seconds": train_stats.seconds + evaluation.seconds,
                "train_images_per_second": train_stats.images_per_second,
                "val_images": len(evaluation.targets),
            }
            is_best = history.add(row)

            if accelerator.is_main_process:
                if is_best:
                    save_model(unwrapped, output_dir, args.model, data.scan.classes, data_config)
                atomic_write_json(output_dir / "metrics.json", history.to_dict())
            progress.end_epoch(
                f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
                f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}"
            )

    if accelerator.is_main_process:
        console.print(epoch_table(history.epochs))
        logger.info("Best epoch %d: val_acc %.4f. Model saved in %s", history.best["epoch"], history.best["val_acc"], output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return history.to_dict()
