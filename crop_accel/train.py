"""The ``train`` command: fine-tune a timm model on an ImageFolder with accelerate.

``run_training`` builds everything in order (accelerator, data, model and optimizer,
``prepare``, resume) and ``fit`` is the epoch loop: train, evaluate, keep the best
model, checkpoint.
"""

from __future__ import annotations

import logging
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console

from crop_accel import data as data_lib
from crop_accel.checkpoints import (
    CHECKPOINT_DIR,
    CheckpointError,
    TrainingState,
    read_training_state,
    resolve_resume_path,
    save_checkpoint,
)
from crop_accel.console import CountProgress, TrainingProgress, setup_logging
from crop_accel.datacheck import print_scan_summary
from crop_accel.engine import evaluate, train_one_epoch
from crop_accel.export import atomic_write_json
from crop_accel.lr_auto import previous_head_lr, sweep_on_main
from crop_accel.model import build_param_groups, check_model_options, create_model, to_memory_format
from crop_accel.records import History, build_run_config
from crop_accel.reporting import Reporter, epoch_row
from crop_accel.runtime import (
    build_accelerator,
    effective_precision,
    resolve_output_dir,
    share_from_main,
)
from crop_accel.scan import scan_image_folder, validate_for_training
from crop_accel.signals import StopRequest
from crop_accel.tracking import RunTracking, log_with_for, resolve_wandb_mode

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything the epoch loop works with, after ``prepare``."""

    args: object
    accelerator: Accelerator
    console: Console
    output_dir: Path
    data: data_lib.TrainingData
    data_config: dict
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: object
    val_loader: object
    state: TrainingState
    reporter: Reporter
    stop: StopRequest


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
    """One-cycle with each group's own maximum lr, or a constant lr."""
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=max(1, total_steps)
    )


def prepare_model(model: torch.nn.Module, args, accelerator: Accelerator) -> torch.nn.Module:
    """Apply --sync-bn and --channels-last; both must happen before DDP wraps the model."""
    if args.sync_bn and accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        logger.warning("--sync-bn is ignored: SyncBatchNorm works only on GPUs, and this run uses the CPU")
    elif args.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return to_memory_format(model, args.channels_last)


def default_output_dir(args) -> str | None:
    """Return --output-dir; with --resume PATH alone, the run folder that contains PATH."""
    if args.output_dir is not None or not args.resume:
        return args.output_dir
    if args.resume == "latest":
        raise CheckpointError("--resume without a path needs --output-dir, the folder of the run to continue")
    path = Path(args.resume)
    return str(path.parent.parent if path.parent.name == CHECKPOINT_DIR else path)


def load_model_and_data(args, accelerator: Accelerator, output_dir: Path, console: Console):
    """Scan the folder, create the model and build the split datasets; return all three.

    The class list decides the head size, so the folder is scanned before the model is built.
    """
    check_model_options(args.model, args.pretrained, args.pretrained_file)
    scan = share_from_main(accelerator, lambda: scan_image_folder(args.data_dir, cache_dir=output_dir))
    if accelerator.is_main_process:
        print_scan_summary(scan, console)
    validate_for_training(scan, group_duplicates=args.group_duplicates)
    model = create_model(args.model, len(scan.classes), args.pretrained, args.pretrained_file)
    data_config = data_lib.resolve_data_config(model, args.image_size)
    data = data_lib.build_training_data(scan, data_config, args.val_fraction, args.seed, args.group_duplicates)
    if args.cache_images:
        with CountProgress(console, "decoding images into the cache", accelerator.is_main_process) as progress:
            data_lib.attach_image_cache(data, data_config, progress.update)
    return model, data_config, data


def resolve_head_lr(args, accelerator: Accelerator, model, data, output_dir: Path, console: Console):
    """Return (head lr, LR range test summary or None) for ``--lr``.

    With ``--lr auto`` the test runs on the main process, unless a resumed run already
    recorded the lr it chose.
    """
    if args.lr != "auto":
        return args.lr, None
    if args.resume and previous_head_lr(output_dir) is not None:
        head_lr = previous_head_lr(output_dir)
        logger.info("Resuming with the lr chosen by the earlier LR range test: %.3g", head_lr)
        return head_lr, None
    summary = sweep_on_main(accelerator, args, model, data.train_set, output_dir, console)
    check_same_on_all_processes(accelerator, summary["suggestion"])
    return summary["suggestion"], summary


def check_same_on_all_processes(accelerator: Accelerator, head_lr: float) -> None:
    """Raise unless every process is about to train with ``head_lr``."""
    if accelerator.num_processes == 1:
        return
    values = accelerator.gather(torch.tensor([head_lr], dtype=torch.float64, device=accelerator.device))
    if not torch.all(values == values[0]):
        raise RuntimeError(f"processes disagree on the head lr: {values.tolist()}")


def build_run(args, console: Console) -> Run:
    """Set up accelerator, data, model, optimizer and schedule; load a checkpoint on --resume."""
    accelerator = build_accelerator(args, log_with=log_with_for(resolve_wandb_mode(args.wandb_mode)))
    setup_logging(console, accelerator.is_main_process, getattr(args, "verbose", False))
    precision = effective_precision(accelerator)
    set_seed(args.seed)
    output_dir = resolve_output_dir(accelerator, default_output_dir(args), args.model)

    model, data_config, data = load_model_and_data(args, accelerator, output_dir, console)
    model = prepare_model(model, args, accelerator)
    head_lr, lr_finder = resolve_head_lr(args, accelerator, model, data, output_dir, console)
    optimizer = torch.optim.Adam(build_param_groups(model, head_lr, args.lr_divisors))
    num_workers = data_lib.resolve_num_workers(args.num_workers, accelerator.device)
    train_loader = data_lib.build_loader(data.train_set, args.batch_size, True, num_workers)
    val_loader = data_lib.build_loader(data.val_set, args.batch_size, False, num_workers)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if args.compile:
        model = torch.compile(model)

    # One scheduler step per optimizer step, counted on this process's shard of the data.
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    scheduler = accelerator.prepare(build_scheduler(optimizer, args.schedule, steps_per_epoch * args.epochs))

    state = TrainingState(
        model=args.model, classes=data.scan.classes, num_processes=accelerator.num_processes,
        epochs=args.epochs, schedule=args.schedule,
    )
    if args.resume:
        path = resolve_resume_path(args.resume, output_dir)
        state = read_training_state(path, expected=state)
        state.epochs = args.epochs
        accelerator.load_state(str(path))
        logger.info("Resumed from %s at epoch %d, batch %d", path, state.epoch, state.batches_done)

    run_config = build_run_config(args, accelerator, precision, data_config, optimizer, data)
    run_config.update(
        lr=head_lr, lr_requested=args.lr, lr_finder=lr_finder, num_workers=num_workers, num_workers_requested=args.num_workers
    )
    tracking = RunTracking.start(accelerator, args, run_config, output_dir, resume=bool(args.resume))
    if lr_finder is not None:
        tracking.log_lr_finder(lr_finder["csv"], lr_finder["png"], step=0)
    reporter = Reporter(
        accelerator, output_dir, data, data_config, args.model, tracking,
        History.from_dict(state.history), console, run_config, args.num_worst,
    )
    if accelerator.is_main_process:
        atomic_write_json(output_dir / "config.json", run_config)
        data_lib.write_split_csv(output_dir / "split.csv", data.scan.samples, data.scan.classes, data.split)
        logger.info(
            "Training %s on %d process(es) with %d loader worker(s) each, mixed precision %s, global batch %d, "
            "%d train / %d val images, output in %s",
            args.model, accelerator.num_processes, num_workers, precision, run_config["global_batch_size"],
            len(data.train_set), len(data.val_set), output_dir,
        )

    return Run(
        args=args, accelerator=accelerator, console=console, output_dir=output_dir, data=data,
        data_config=data_config, model=model, optimizer=optimizer, scheduler=scheduler,
        train_loader=train_loader, val_loader=val_loader, state=state, reporter=reporter,
        stop=StopRequest().install(),
    )


def epoch_loader(run: Run, epoch: int):
    """Return the training loader for ``epoch``, past the batches trained before a resume.

    The seedable sampler's order depends on the epoch set here, so a resumed epoch
    sees the same order as an uninterrupted one.
    """
    run.train_loader.set_epoch(epoch)
    if run.state.batches_done == 0:
        return run.train_loader
    skipped = run.accelerator.skip_first_batches(run.train_loader, run.state.batches_done)
    skipped.set_epoch(epoch)
    return skipped


def stop_with_checkpoint(run: Run) -> int:
    """Write a checkpoint after a stop signal and tell the user how to resume."""
    path = save_checkpoint(run.accelerator, run.output_dir, run.state, run.args.keep_checkpoints)
    if run.accelerator.is_main_process:
        logger.warning(
            "Stopped at epoch %d, batch %d. Checkpoint: %s. To resume, run the same command with "
            "--output-dir %s --resume",
            run.state.epoch, run.state.batches_done, path, shlex.quote(str(run.output_dir)),
        )
    return run.stop.exit_code


def fit(run: Run) -> int:
    """Run the epochs from the current state; return the process exit code."""
    args, accelerator, state, reporter = run.args, run.accelerator, run.state, run.reporter
    enabled = accelerator.is_main_process

    with TrainingProgress(run.console, args.epochs, len(run.train_loader), enabled=enabled) as progress:

        def after_batch(batch_index: int, loss: float, accuracy: float, images: int) -> None:
            progress.update_batch(batch_index, loss, accuracy, images)
            state.batches_done = batch_index + 1
            if accelerator.sync_gradients:
                state.global_step += 1
                reporter.log_step(state.global_step, loss, run.optimizer)
                if args.checkpoint_every and state.global_step % args.checkpoint_every == 0:
                    save_checkpoint(accelerator, run.output_dir, state, args.keep_checkpoints)

        for epoch in range(state.epoch, args.epochs + 1):
            state.epoch = epoch
            progress.start_epoch(epoch, first_batch=state.batches_done)
            # NOTE: after a resume inside an epoch, that epoch's train_loss and train_acc cover
            # only the batches trained since the resume; weights and validation are exact.
            train_stats = train_one_epoch(
                accelerator, run.model, epoch_loader(run, epoch), run.optimizer, run.scheduler,
                args.max_grad_norm, after_batch, lambda: run.stop.should_stop(accelerator), state.batches_done,
            )
            if train_stats.stopped:
                return stop_with_checkpoint(run)

            evaluation = evaluate(accelerator, run.model, run.val_loader)
            row = epoch_row(epoch, train_stats, evaluation, run.optimizer)
            reporter.end_epoch(row, accelerator.unwrap_model(run.model), reporter.analyze(evaluation), state.global_step)
            progress.end_epoch(
                f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
                f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}"
            )

            # A finished epoch is stored as the start of the next one.
            state.epoch, state.batches_done, state.history = epoch + 1, 0, reporter.history.to_dict()
            save_checkpoint(accelerator, run.output_dir, state, args.keep_checkpoints)
    return 0


def run_training(args, console: Console | None = None) -> int:
    """Train with the options in ``args``; return the process exit code."""
    run = build_run(args, console or Console())
    try:
        code = fit(run)
    finally:
        run.stop.uninstall()
    if code == 0:
        run.reporter.finish()
    else:
        run.reporter.tracking.finish()
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return code


def run_lr_find(args, console: Console | None = None) -> int:
    """Run only the LR range test and report its suggestion (the lr-find command)."""
    console = console or Console()
    accelerator = build_accelerator(args)
    setup_logging(console, accelerator.is_main_process, getattr(args, "verbose", False))
    set_seed(args.seed)
    output_dir = resolve_output_dir(accelerator, args.output_dir, f"lr-find-{args.model}")
    model, _, data = load_model_and_data(args, accelerator, output_dir, console)
    model = prepare_model(model, args, accelerator)
    summary = sweep_on_main(accelerator, args, model, data.train_set, output_dir, console)
    if accelerator.is_main_process:
        atomic_write_json(output_dir / "lr_finder.json", summary)
        console.print(
            f"Suggested head lr: [bold]{summary['suggestion']:.2e}[/] ({summary['rule']}); "
            f"steepest descent at {summary['steepest_lr'] or float('nan'):.2e}, loss minimum at "
            f"{summary['min_loss_lr']:.2e}. Curve: {summary['png']}"
        )
    return 0
