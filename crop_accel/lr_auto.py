"""The LR range test inside a run: ``train --lr auto`` and the ``lr-find`` command.

The sweep runs on the main process only, before ``accelerator.prepare``, on the plain
model with the per-process batch size. Its suggestion is broadcast, so every process
trains with the same head lr. With N processes the global batch is N times the sweep's
batch, and the suggestion is not rescaled for that.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from rich.console import Console

from crop_accel.console import CountProgress
from crop_accel.data import build_loader, resolve_num_workers
from crop_accel.lr_finder import (
    DEFAULT_END_LR,
    DEFAULT_NUM_STEPS,
    DEFAULT_START_LR,
    LRFinderResult,
    lr_range_test,
)
from crop_accel.lr_finder_plot import save_lr_finder_outputs
from crop_accel.model import build_param_groups
from crop_accel.runtime import share_from_main

logger = logging.getLogger(__name__)


def add_lr_finder_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LR range test (--lr auto and lr-find)")
    group.add_argument(
        "--lr-find-start", type=float, default=DEFAULT_START_LR,
        help=f"First head learning rate of the sweep (default: {DEFAULT_START_LR:g}).",
    )
    group.add_argument(
        "--lr-find-end", type=float, default=DEFAULT_END_LR,
        help=f"Last head learning rate of the sweep (default: {DEFAULT_END_LR:g}).",
    )
    group.add_argument(
        "--lr-find-steps", type=int, default=DEFAULT_NUM_STEPS,
        help=f"Maximum optimizer steps of the sweep; it stops earlier when the loss diverges (default: {DEFAULT_NUM_STEPS}).",
    )


def sweep_on_main(accelerator: Accelerator, args, model: torch.nn.Module, train_set, output_dir: Path,
                  console: Console) -> dict:
    """Run the LR range test on the main process; return its summary on every process.

    The summary is ``LRFinderResult.to_dict()`` plus the file paths; its ``suggestion``
    is the head lr to train with.
    """

    def sweep() -> dict:
        model.to(accelerator.device)
        optimizer = torch.optim.Adam(build_param_groups(model, 1.0, args.lr_divisors))
        # The sweep's steps cost as much as training steps, so it needs the same loader
        # workers; decoding in this process would leave a GPU waiting.
        workers = resolve_num_workers(args.num_workers, accelerator.device)
        loader = build_loader(train_set, args.batch_size, train=True, num_workers=workers)
        with CountProgress(console, "LR range test") as progress:
            result = lr_range_test(
                model, optimizer, loader, F.cross_entropy, accelerator,
                start_lr=args.lr_find_start, end_lr=args.lr_find_end, num_steps=args.lr_find_steps,
                progress=lambda step, total, lr, loss: progress.update(step, total),
            )
        return summarize(result, output_dir)

    summary = share_from_main(accelerator, sweep)
    summary["num_processes"] = accelerator.num_processes
    if accelerator.is_main_process and accelerator.num_processes > 1:
        logger.info(
            "The LR range test used batches of %d on one process. Training uses that batch on each of %d "
            "processes, and the suggested lr is not rescaled for the larger global batch.",
            summary["batch_size"], accelerator.num_processes,
        )
    return summary


def summarize(result: LRFinderResult, output_dir: Path) -> dict:
    """Write the curve files and return the summary recorded in config.json."""
    csv_path, png_path = save_lr_finder_outputs(result, output_dir)
    return {**result.to_dict(), "csv": str(csv_path), "png": str(png_path)}


def previous_head_lr(output_dir: Path) -> float | None:
    """Return the head lr that an earlier start of this run recorded, for resuming --lr auto."""
    try:
        value = json.loads((output_dir / "config.json").read_text(encoding="utf-8")).get("lr")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def report_sweep_cost(summary: dict, epoch_seconds: float) -> None:
    """Log the sweep's wall time beside one training epoch's and store both in ``summary``."""
    summary["epoch_seconds"] = epoch_seconds
    summary["sweep_to_epoch_ratio"] = summary["seconds"] / epoch_seconds if epoch_seconds > 0 else None
    logger.info(
        "LR range test took %.1f s, one training epoch %.1f s (%.2f epochs of work)",
        summary["seconds"], epoch_seconds, summary["sweep_to_epoch_ratio"] or 0.0,
    )
