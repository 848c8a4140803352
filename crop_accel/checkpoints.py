"""Training checkpoints: accelerate's ``save_state`` made crash-safe, and resuming.

A checkpoint is a folder ``checkpoints/step-SSSSSS`` (global optimizer step) with accelerate's files
(model, optimizer, scheduler, scaler, RNG states of every process) and
``training_state.json`` (epoch, batches done in it, global step, metrics history). It is
written under a temporary name and renamed into place, so a kill during the write leaves
the previous checkpoints as they were. ``load_state`` reads tensors with safetensors or
``torch.load(weights_only=True)``, so no arbitrary object is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "training_state.json"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be resumed, with the fix."""


@dataclass
class TrainingState:
    """Loop position and history stored beside accelerate's files.

    ``epoch`` is the epoch in progress (1-based) and ``batches_done`` the batches of it
    already trained; a finished epoch is stored as the next epoch with 0 batches done.
    """

    epoch: int = 1
    batches_done: int = 0
    global_step: int = 0
    history: dict = field(default_factory=lambda: {"epochs": [], "best": None})
    model: str = ""
    classes: list[str] = field(default_factory=list)
    num_processes: int = 1
    epochs: int = 0
    schedule: str = ""


def checkpoint_name(state: TrainingState) -> str:
    return f"step-{state.global_step:06d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Return the complete checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if _NAME.match(path.name) and (path / STATE_FILE).is_file()]
    return sorted(found, key=lambda path: int(_NAME.match(path.name).group(1)))


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: TrainingState, keep: int) -> Path:
    """Save a checkpoint on all processes and keep the newest ``keep`` of them.

    Every process must call this, because each one writes its own RNG state.
    """
    folder = Path(output_dir) / CHECKPOINT_DIR
    final = folder / checkpoint_name(state)
    temporary = folder / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        (temporary / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("Checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def resolve_resume_path(resume: str, output_dir: Path) -> Path:
    """Turn ``--resume`` (``latest`` or a path) into a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(
                f"--resume found no checkpoint in {Path(output_dir) / CHECKPOINT_DIR}; "
                "pass the --output-dir of the interrupted run, or --resume PATH"
            )
        return found[-1]

    path = Path(resume)
    if (path / CHECKPOINT_DIR).is_dir():
        return resolve_resume_path("latest", path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume {path} is not a checkpoint (no {STATE_FILE}); pass a folder under "
            f"OUTPUT_DIR/{CHECKPOINT_DIR}/ or the run's output dir"
        )
    return path


def read_training_state(path: Path, expected: TrainingState) -> TrainingState:
    """Read a checkpoint's loop state and check that it fits the run being resumed.

    ``expected`` carries the new run's model, classes, process count and schedule.
    """
    try:
        state = TrainingState(**json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"cannot read {Path(path) / STATE_FILE}: {error}; pass another checkpoint") from error
    model, classes, num_processes = expected.model, expected.classes, expected.num_processes
    if state.model != model:
        raise CheckpointError(f"checkpoint {path} is for model {state.model!r}, not {model!r}; pass --model {state.model}")
    if state.classes != classes:
        raise CheckpointError(
            f"checkpoint {path} was trained on classes {state.classes}, but --data-dir has {classes}; "
            "resume with the same data folder"
        )
    if state.num_processes != num_processes:
        raise CheckpointError(
            f"checkpoint {path} was written by {state.num_processes} process(es), this run has {num_processes}; "
            f"resume with --num_processes {state.num_processes} so the data shards and RNG states line up"
        )
    if state.schedule == "onecycle" and (expected.schedule, expected.epochs) != ("onecycle", state.epochs):
        raise CheckpointError(
            f"checkpoint {path} follows a one-cycle schedule planned for {state.epochs} epochs; resume with "
            f"--epochs {state.epochs} --schedule onecycle (--epochs is the total, not the number of extra epochs)"
        )
    return state
