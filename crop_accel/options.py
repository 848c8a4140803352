"""Command-line options of ``train`` and the options it shares with other subcommands."""

from __future__ import annotations

import argparse

from crop_accel.lr_auto import add_lr_finder_arguments
from crop_accel.model import DEFAULT_LR_DIVISORS
from crop_accel.tracking import add_tracking_arguments


def parse_lr(text: str) -> float | str:
    """Parse ``--lr``: a positive float, or ``auto`` for the LR range test."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --lr {text!r}; expected a number such as 1e-3, or 'auto'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid --lr {text!r}; it must be positive")
    return value


def parse_divisors(text: str) -> tuple[float, ...]:
    """Parse ``--lr-divisors``: comma-separated positive numbers, stem first."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --lr-divisors {text!r}; expected numbers like 10,8,6,4,2,1") from None
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"invalid --lr-divisors {text!r}; expected positive numbers like 10,8,6,4,2,1")
    return values


NUM_WORKERS_HELP = (
    "Data loader worker processes per process; 0 loads in the process itself (default: with a GPU, this process's "
    "share of the usable CPU cores minus one, at most 8; on the CPU, one per 8 of those cores, so 0 below 8 cores)."
)


def whole_number(text: str, minimum: int) -> int:
    """Parse an integer option that must be at least ``minimum``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; expected a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; expected at least {minimum}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return whole_number(text, 0)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the data and model options that ``train`` and ``lr-find`` share."""
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", required=True, help="ImageFolder root: one subfolder of images per class.")
    data.add_argument(
        "--output-dir",
        default=None,
        help="Folder for everything the command writes: config, metrics, checkpoints and the model for train, "
        "lr_finder.csv/.png/.json for lr-find (default: a new folder under runs/).",
    )
    data.add_argument(
        "--val-fraction", type=float, default=0.2, help="Share of each class held out for validation (default: 0.2)."
    )
    data.add_argument(
        "--no-group-duplicates",
        dest="group_duplicates",
        action="store_false",
        help="Split images independently even when they are copies of one photo (leaks; for comparison only).",
    )
    data.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="Square input size in pixels (default: the model's own data config, e.g. 224).",
    )
    data.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=None,
        help=NUM_WORKERS_HELP,
    )
    data.add_argument(
        "--cache-images",
        action="store_true",
        help="Decode every image once, at a short side of input size / crop_pct, and keep it in memory "
        "(uint8; about 0.25 MiB per image at 224 px). Speeds up small datasets.",
    )
    data.add_argument("--seed", type=int, default=42, help="Seed for the split, initial head, augmentation and order (default: 42).")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet50", help="timm model name (default: resnet50).")
    model.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Start from ImageNet weights downloaded by timm (default: on).",
    )
    model.add_argument(
        "--pretrained-file",
        default=None,
        help="Local ImageNet weights (.safetensors, or a .pth state dict read with weights_only=True); no download.",
    )
    model.add_argument("--batch-size", type=positive_int, default=32, help="Images per process per step (default: 32).")
    model.add_argument(
        "--lr-divisors",
        type=parse_divisors,
        default=DEFAULT_LR_DIVISORS,
        help="Head lr divided by these for the param groups from stem to head "
        "(default: 10,8,6,4,2,1). Models with another number of groups interpolate them geometrically.",
    )
    model.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default=None,
        help="Mixed precision (default: what accelerate launch or its config sets, else no).",
    )


def add_channels_last_argument(parser) -> None:
    """Add --channels-last / --no-channels-last to a parser or argument group."""
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Store the model in the channels_last (NHWC) memory format, in which convolutions usually run faster "
        "on CPUs and on GPUs with tensor cores (default: on).",
    )


def add_lr_find_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``lr-find``: data, model and the sweep."""
    add_model_arguments(parser)
    add_channels_last_argument(parser)
    parser.add_argument("--sync-bn", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="Log debug messages.")
    add_lr_finder_arguments(parser)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option of ``train``."""
    add_model_arguments(parser)

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=positive_int, default=7, help="Total training epochs (default: 7).")
    optim.add_argument(
        "--lr",
        type=parse_lr,
        default="auto",
        help="Maximum learning rate of the head; the other groups get lr / divisor. 'auto' runs an LR "
        "range test on the main process first and trains with its suggestion (default: auto).",
    )
    optim.add_argument(
        "--schedule",
        choices=("onecycle", "constant"),
        default="onecycle",
        help="Learning-rate schedule: one-cycle with each group's own maximum, or constant (default: onecycle).",
    )
    optim.add_argument(
        "--grad-accum-steps",
        type=positive_int,
        default=1,
        help="Micro-batches per optimizer step; global batch = batch size x processes x this (default: 1).",
    )
    optim.add_argument(
        "--max-grad-norm",
        type=float,
        default=None,
        help="Clip the total gradient L2 norm to this value (default: no clipping).",
    )

    checkpoints = parser.add_argument_group("checkpoints")
    checkpoints.add_argument(
        "--resume",
        nargs="?",
        metavar="PATH",
        const="latest",
        default=None,
        help="Continue from the latest checkpoint in --output-dir, or from the checkpoint folder PATH. "
        "--epochs stays the total number of epochs.",
    )
    checkpoints.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        help="Also checkpoint every N optimizer steps (default: only at the end of each epoch).",
    )
    checkpoints.add_argument(
        "--keep-checkpoints", type=positive_int, default=2, help="Number of newest checkpoints kept (default: 2)."
    )

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--sync-bn",
        action="store_true",
        help="Convert BatchNorm to SyncBatchNorm for multi-GPU runs; worth it when the per-GPU batch is small (< 16).",
    )
    add_channels_last_argument(runtime)
    runtime.add_argument("--compile", action="store_true", help="Compile the model with torch.compile (default: off).")
    runtime.add_argument(
        "--dist-timeout",
        type=positive_int,
        default=60,
        help="Minutes a process waits for the others, e.g. during the LR range test on the main process (default: 60).",
    )
    runtime.add_argument("--verbose", action="store_true", help="Log debug messages.")
    runtime.add_argument(
        "--num-worst", type=int, default=36, help="Images in the gallery of most confident errors (default: 36)."
    )

    add_lr_finder_arguments(parser)
    add_tracking_arguments(parser)
