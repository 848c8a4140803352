"""LR range test: an exponential learning-rate sweep that picks the training learning rate.

Every param group keeps its ratio to the largest group lr, so with discriminative
fine-tuning the sweep and its suggestion are in terms of the head lr. Weights, buffers,
gradients, optimizer state, module modes and RNG states are restored afterwards, so the
sweep leaves no trace on the training run that follows.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Defaults measured with tf_efficientnet_lite0 on the 30-class crop photo set (table in
# docs/lr_finder.md). 32 steps over 1e-5..1 cost 1.6 epochs of 20 batches, against 5 for
# the classic 100 steps over 1e-7..10. A 40-step sweep from 1e-6 and its curve cut at 1e-5
# both suggested 3.5e-3, where the classic sweep, with the same smoothing, suggests 2.8e-3.
DEFAULT_START_LR = 1e-5
DEFAULT_END_LR = 1.0
DEFAULT_NUM_STEPS = 32
DEFAULT_DIVERGE_FACTOR = 4.0
# An EMA time constant of about 10 steps. The classic 0.98 averages over about 50 steps,
# more than this sweep has, so on the crop set its steepest point fell on warm-up noise.
DEFAULT_SMOOTHING = 0.9

# Fewer points than this between the warm-up and the loss minimum make the steepest
# point meaningless, so the suggestion falls back to a tenth of the minimum's lr.
MIN_DESCENT_POINTS = 3
FALLBACK_DIVISOR = 10.0

ProgressCallback = Callable[[int, int, float, float], None]


class LRFinderError(RuntimeError):
    """An LR range test that recorded no usable loss."""


@dataclass
class LRFinderResult:
    """Curve and suggestion of one LR range test, with every learning rate given as the head lr."""

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggestion: float
    steepest_lr: float | None
    min_loss_lr: float
    rule: str
    stopped_early: str | None
    num_steps_run: int
    batch_size: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Return the summary without the per-step arrays, for config.json."""
        summary = asdict(self)
        for key in ("lrs", "losses", "smoothed_losses"):
            del summary[key]
        return summary


def lr_range_test(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    accelerator,
    start_lr: float = DEFAULT_START_LR,
    end_lr: float = DEFAULT_END_LR,
    num_steps: int = DEFAULT_NUM_STEPS,
    diverge_factor: float = DEFAULT_DIVERGE_FACTOR,
    smoothing: float = DEFAULT_SMOOTHING,
    progress: ProgressCallback | None = None,
) -> LRFinderResult:
    """Sweep the head lr from ``start_lr`` to ``end_lr`` and suggest a learning rate.

    Call it on one process, before ``accelerator.prepare``, with a plain model on
    ``accelerator.device`` and an unprepared optimizer and loader. Batches are
    ``(images, targets, ...)``, and the loader restarts when it is shorter than the sweep.
    The sweep stops early when the smoothed loss exceeds ``diverge_factor`` times the
    best smoothed loss or the loss is not finite. ``loss_fn`` must return a positive
    scalar, as cross-entropy does, for that test to mean anything.
    """
    _check_arguments(optimizer, start_lr, end_lr, num_steps, diverge_factor, smoothing)
    schedule = np.geomspace(start_lr, end_lr, num_steps).tolist()
    logger.info(
        "LR range test: head lr %.1e to %.1e over at most %d steps", start_lr, end_lr, num_steps
    )

    started = time.perf_counter()
    snapshot = _TrainingSnapshot(model, optimizer)
    try:
        curve = _sweep(model, optimizer, loader, loss_fn, accelerator, schedule, diverge_factor, smoothing, progress)
    finally:
        snapshot.restore(model, optimizer)
    seconds = time.perf_counter() - started

    if not curve.lrs:
        raise LRFinderError(
            f"LR range test recorded no finite loss because the first step failed "
            f"({curve.stopped_early}); check the data and loss_fn, or lower start_lr={start_lr:g}"
        )
    suggestion, steepest_lr, min_loss_lr, rule = suggest_learning_rate(curve.lrs, curve.smoothed_losses)
    result = LRFinderResult(
        **vars(curve), suggestion=suggestion, steepest_lr=steepest_lr, min_loss_lr=min_loss_lr,
        rule=rule, num_steps_run=len(curve.lrs), seconds=seconds,
    )
    _log_result(result)
    return result


def suggest_learning_rate(
    lrs: list[float], smoothed_losses: list[float]
) -> tuple[float, float | None, float, str]:
    """Pick a learning rate from a smoothed loss curve.

    Returns ``(suggestion, steepest_lr, min_loss_lr, rule)``. The rule is "steepest":
    the lr where d(smoothed loss)/d(log10 lr) is most negative, searched after the
    warm-up points (the first 10%, at least 2) and before the loss minimum. When fewer
    than MIN_DESCENT_POINTS lie there, or the loss never falls, the rule is
    "min_loss/10" and the suggestion is the minimum's lr divided by FALLBACK_DIVISOR.
    """
    losses = np.asarray(smoothed_losses, dtype=np.float64)
    log_lrs = np.log10(np.asarray(lrs, dtype=np.float64))
    min_index = int(np.argmin(losses))
    min_loss_lr = float(lrs[min_index])

    steepest_lr = None
    warmup = max(2, len(losses) // 10)
    if min_index - warmup >= MIN_DESCENT_POINTS:
        slopes = np.gradient(losses, log_lrs)
        steepest_index = warmup + int(np.argmin(slopes[warmup:min_index]))
        if slopes[steepest_index] < 0:
            steepest_lr = float(lrs[steepest_index])

    if steepest_lr is not None:
        return steepest_lr, steepest_lr, min_loss_lr, "steepest"
    return min_loss_lr / FALLBACK_DIVISOR, steepest_lr, min_loss_lr, "min_loss/10"


@dataclass
class _Curve:
    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    stopped_early: str | None = None
    batch_size: int = 0


def _sweep(model, optimizer, loader, loss_fn, accelerator, schedule, diverge_factor, smoothing, progress) -> _Curve:
    max_initial_lr = max(group["lr"] for group in optimizer.param_groups)
    ratios = [group["lr"] / max_initial_lr for group in optimizer.param_groups]
    use_scaler = accelerator.mixed_precision == "fp16" and accelerator.native_amp
    # NOTE: the fp16 GradScaler path needs a GPU and has not run in this project's tests.
    scaler = torch.amp.GradScaler(accelerator.device.type) if use_scaler else None
    curve = _Curve([], [], [])
    average, best = 0.0, math.inf
    batches = _cycle(loader)
    model.train()
    try:
        for step, head_lr in enumerate(schedule):
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = head_lr * ratio
            batch = next(batches)
            # Batches may carry sample indices as a third element.
            images, targets = batch[0].to(accelerator.device), batch[1].to(accelerator.device)
            curve.batch_size = curve.batch_size or len(images)
            loss = _train_step(model, optimizer, loss_fn, accelerator, scaler, images, targets)
            if not math.isfinite(loss):
                curve.stopped_early = f"loss is {loss} at step {step + 1} (head lr {head_lr:.2e})"
                break

            # Bias correction keeps the first smoothed values from being pulled towards 0.
            average = smoothing * average + (1 - smoothing) * loss
            smoothed = average / (1 - smoothing ** (step + 1))
            best = min(best, smoothed)
            curve.lrs.append(head_lr)
            curve.losses.append(loss)
            curve.smoothed_losses.append(smoothed)
            if progress is not None:
                progress(step + 1, len(schedule), head_lr, smoothed)
            if smoothed > diverge_factor * best:
                curve.stopped_early = (
                    f"smoothed loss {smoothed:.4g} exceeds {diverge_factor:g} x best {best:.4g} "
                    f"at step {step + 1} (head lr {head_lr:.2e})"
                )
                break
    finally:
        batches.close()
    return curve


def _train_step(model, optimizer, loss_fn, accelerator, scaler, images, targets) -> float:
    """Run one optimizer step and return the loss, skipping the step when the loss is not finite."""
    optimizer.zero_grad(set_to_none=True)
    with accelerator.autocast():
        loss = loss_fn(model(images), targets)
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        return loss_value
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss_value


def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise LRFinderError("the LR range test loader yielded no batches; pass a loader over the training set")


class _TrainingSnapshot:
    """CPU copies of everything the sweep changes, restored bit for bit."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.parameters = {name: _copy_to_cpu(p) for name, p in model.named_parameters()}
        self.gradients = {
            name: None if p.grad is None else _copy_to_cpu(p.grad) for name, p in model.named_parameters()
        }
        self.buffers = {name: _copy_to_cpu(b) for name, b in model.named_buffers()}
        self.modes = {name: module.training for name, module in model.named_modules()}
        self.optimizer_state = _copy_to_cpu(optimizer.state_dict())
        self.python_rng = random.getstate()
        self.numpy_rng = np.random.get_state()
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @torch.no_grad()
    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for name, saved in self.parameters.items():
            parameter = model.get_parameter(name)
            parameter.copy_(saved)
            saved_grad = self.gradients[name]
            parameter.grad = None if saved_grad is None else saved_grad.to(parameter.device)
        for name, saved in self.buffers.items():
            model.get_buffer(name).copy_(saved)
        for name, module in model.named_modules():
            module.training = self.modes[name]
        # load_state_dict moves the state back to each parameter's device. An empty saved
        # state clears the Adam moments that the sweep created.
        optimizer.load_state_dict(self.optimizer_state)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _copy_to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _copy_to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to_cpu(item) for item in value)
    return value


def _check_arguments(optimizer, start_lr, end_lr, num_steps, diverge_factor, smoothing) -> None:
    if not 0 < start_lr < end_lr:
        raise ValueError(f"invalid lr range {start_lr:g}..{end_lr:g}; pass 0 < start_lr < end_lr")
    if num_steps < 2 * MIN_DESCENT_POINTS:
        raise ValueError(f"num_steps={num_steps} is too few for a loss curve; pass at least {2 * MIN_DESCENT_POINTS}")
    if diverge_factor <= 1:
        raise ValueError(f"diverge_factor={diverge_factor:g} would stop at the first noisy step; pass a value above 1")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing={smoothing:g} is invalid; pass an EMA factor in [0, 1)")
    if max(group["lr"] for group in optimizer.param_groups) <= 0:
        raise ValueError("every optimizer param group has lr <= 0; set the groups' lrs to their relative sizes")


def _log_result(result: LRFinderResult) -> None:
    if result.stopped_early:
        logger.info("LR range test stopped early: %s", result.stopped_early)
    steepest = "none" if result.steepest_lr is None else f"{result.steepest_lr:.2e}"
    logger.info(
        "LR range test: steepest descent at lr %s, min smoothed loss at lr %.2e; using %.2e (rule %s), "
        "%d steps of batch %d in %.1f s",
        steepest, result.min_loss_lr, result.suggestion, result.rule,
        result.num_steps_run, result.batch_size, result.seconds,
    )
