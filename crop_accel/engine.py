"""One training epoch and one evaluation pass, written against an Accelerator."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator


@dataclass
class EpochStats:
    """Training loss and accuracy over the images of one epoch, summed over all processes."""

    loss: float
    accuracy: float
    images: int
    seconds: float
    batches: int
    stopped: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalOutput:
    """Gathered validation predictions: each image exactly once, in loader order."""

    targets: np.ndarray
    probs: np.ndarray
    indices: np.ndarray
    loss: float
    accuracy: float
    seconds: float


# Called after every batch with (batch index, batch loss, batch accuracy, images in batch).
BatchCallback = Callable[[int, float, float, int], None]
# Called after every batch; True ends the epoch early, e.g. on a stop signal.
StopCheck = Callable[[], bool]


def train_one_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    max_grad_norm: float | None = None,
    on_batch: BatchCallback | None = None,
    should_stop: StopCheck | None = None,
    first_batch: int = 0,
) -> EpochStats:
    """Run one pass over ``loader`` with gradient accumulation and optional clipping.

    ``first_batch`` is the index of the loader's first batch within the epoch, for a
    loader that skips the batches trained before a resume.
    """
    model.train()
    device = accelerator.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    start = time.perf_counter()
    batches, stopped = 0, False

    for batch_index, (images, targets, _) in enumerate(loader, start=first_batch):
        # accumulate() skips the DDP gradient all-reduce (no_sync) on the micro-batches
        # that do not end an accumulation window, and tells the optimizer when to step.
        # prepare() already wraps the model's forward in autocast for mixed precision.
        with accelerator.accumulate(model):
            logits = model(images)
            loss = F.cross_entropy(logits, targets)
            accelerator.backward(loss)

            if accelerator.sync_gradients and max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        batch_size = targets.shape[0]
        batch_correct = (logits.detach().argmax(dim=1) == targets).sum()
        loss_sum += loss.detach().double() * batch_size
        correct += batch_correct
        seen += batch_size
        batches += 1
        if on_batch is not None:
            on_batch(batch_index, loss.item(), batch_correct.item() / batch_size, batch_size)
        # Stop only at the end of an accumulation window, so no gradient is lost.
        if should_stop is not None and accelerator.sync_gradients and should_stop():
            stopped = True
            break

    # Training metrics come from each process's own shard, so sum them over processes.
    totals = accelerator.reduce(torch.stack([loss_sum, correct.double(), seen.double()]), reduction="sum")
    images = int(totals[2].item())
    return EpochStats(
        loss=float(totals[0].item()) / max(images, 1),
        accuracy=float(totals[1].item()) / max(images, 1),
        images=images,
        seconds=time.perf_counter() - start,
        batches=batches,
        stopped=stopped,
    )


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader) -> EvalOutput:
    """Predict every image of ``loader`` and gather the results on all processes.

    ``gather_for_metrics`` drops the samples that the distributed sampler repeats to
    give every process an equal share, so each image is counted exactly once.
    """
    model.eval()
    start = time.perf_counter()
    all_logits, all_targets, all_indices = [], [], []
    for images, targets, indices in loader:
        logits = model(images)
        logits, targets, indices = accelerator.gather_for_metrics((logits.float(), targets, indices))
        all_logits.append(logits.cpu())
        all_targets.append(targets.cpu())
        all_indices.append(indices.cpu())

    logits = torch.cat(all_logits)
    targets = torch.cat(all_targets)
    indices = torch.cat(all_indices)
    if len(torch.unique(indices)) != len(indices):
        raise RuntimeError("evaluation gathered some validation images more than once")

    return EvalOutput(
        targets=targets.numpy(),
        probs=torch.softmax(logits, dim=1).numpy(),
        indices=indices.numpy(),
        loss=F.cross_entropy(logits, targets).item(),
        accuracy=(logits.argmax(dim=1) == targets).double().mean().item(),
        seconds=time.perf_counter() - start,
    )
