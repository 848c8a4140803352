"""The Accelerator, the output folder and the precision really in effect."""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, broadcast_object_list

logger = logging.getLogger(__name__)


def usable_cpu_cores() -> int:
    """Return the number of CPU cores in this process's affinity mask, or all cores where the OS has no mask."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def local_process_count() -> int:
    """Return the number of training processes on this node, from LOCAL_WORLD_SIZE as ``accelerate launch`` sets it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def build_accelerator(args, log_with: str | None = None) -> Accelerator:
    """Create the Accelerator from the options and accelerate's launch settings.

    The process-group timeout is long because the other processes wait while the main
    process alone scans the data or runs the LR range test. The seedable sampler makes
    the shuffled order a function of seed and epoch, which resuming relies on.
    """
    return Accelerator(
        cpu=_is_multi_process_cpu_launch(),
        mixed_precision=getattr(args, "mixed_precision", None),
        gradient_accumulation_steps=getattr(args, "grad_accum_steps", 1),
        log_with=log_with,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=getattr(args, "dist_timeout", 60)))],
    )


def _is_multi_process_cpu_launch() -> bool:
    # accelerate launch --multi_gpu starts torchrun workers, but on a machine without a GPU
    # they join one gloo process group only when configured for the CPU. Without this each
    # worker would train alone and all of them would write to the same output folder.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > 1 and not torch.cuda.is_available()


def effective_precision(accelerator: Accelerator) -> str:
    """Return the mixed precision really used: "no", "fp16" or "bf16".

    accelerate keeps ``mixed_precision == "fp16"`` on a CPU but then runs in fp32 without
    autocast (``native_amp`` is False). That case is reported as "no" with a warning.
    """
    requested = accelerator.mixed_precision
    if requested == "no" or accelerator.native_amp:
        return requested
    logger.warning(
        "fp16 mixed precision needs a GPU; this run uses fp32 (no mixed precision) on %s. "
        "Use --mixed_precision bf16 on CPU.",
        accelerator.device,
    )
    return "no"


def resolve_output_dir(accelerator: Accelerator, requested: str | None, model_name: str) -> Path:
    """Return the output dir, the same on every process, created by the main process.

    Without ``requested``, the main process names a new folder under ``runs/`` from the
    model and the start time, and broadcasts that name to the other processes.
    """
    if requested is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        requested = str(Path("runs") / f"{model_name.replace('/', '_')}-{stamp}")
    [requested] = broadcast_object_list([requested]) if accelerator.num_processes > 1 else [requested]
    output_dir = Path(requested)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return output_dir


def share_from_main(accelerator: Accelerator, compute):
    """Run ``compute()`` on the main process only and return its result on every process.

    An exception on the main process is sent to the others too, so every process stops
    with the same error instead of the others waiting until the timeout.
    """
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = compute()
        except Exception as caught:  # re-raised below on every process
            error = caught
    if accelerator.num_processes > 1:
        result, error = broadcast_object_list([result, error])
    if error is not None:
        raise error
    return result
