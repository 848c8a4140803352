"""The ``crop-accel`` command line: ``train`` now, further subcommands beside it.

``launch/train.py`` calls ``main`` too, so ``accelerate launch launch/train.py ...``,
``python launch/train.py ...`` and ``crop-accel train ...`` accept the same options.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from crop_accel.checkpoints import CheckpointError
from crop_accel.console import print_error, setup_logging
from crop_accel.datacheck import add_check_data_arguments, run_check_data
from crop_accel.inference import (
    add_evaluate_arguments,
    add_predict_arguments,
    run_evaluate,
    run_predict,
)
from crop_accel.model import ModelError
from crop_accel.options import add_lr_find_arguments, add_train_arguments
from crop_accel.scan import DataError

SUBCOMMANDS = ("train", "lr-find", "evaluate", "predict", "check-data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crop-accel",
        description="Fine-tune an ImageNet-pretrained timm CNN on a folder of crop photos.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = subcommands.add_parser(
        "train",
        help="Fine-tune a model on an ImageFolder.",
        description="Fine-tune a timm model with discriminative learning rates; "
        "start it with `accelerate launch` for several processes or mixed precision.",
    )
    add_train_arguments(train)
    train.set_defaults(handler=_run_train)

    lr_find = subcommands.add_parser(
        "lr-find",
        help="Run only the LR range test and report the suggested learning rate.",
        description="Sweep the head learning rate exponentially with the discriminative ratios kept, "
        "and write lr_finder.csv, lr_finder.png and lr_finder.json.",
    )
    add_lr_find_arguments(lr_find)
    lr_find.set_defaults(handler=_run_lr_find)

    evaluate = subcommands.add_parser(
        "evaluate",
        help="Score a trained model on a labelled folder.",
        description="Accuracy, per-class scores, confusion matrix and worst-error gallery of a trained model.",
    )
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(handler=run_evaluate)

    predict = subcommands.add_parser(
        "predict",
        help="Predict the classes of images with a trained model.",
        description="Write a CSV with the top-k classes and probabilities of each image.",
    )
    add_predict_arguments(predict)
    predict.set_defaults(handler=run_predict)

    check = subcommands.add_parser(
        "check-data",
        help="Report unreadable files, misnamed formats, small images and duplicates.",
        description="Scan an ImageFolder and write data_report.json; exit code 1 when it cannot be trained on.",
    )
    add_check_data_arguments(check)
    check.set_defaults(handler=_run_check_data)
    return parser


def _run_train(args, console: Console) -> int:
    from crop_accel.train import run_training

    return run_training(args, console)


def _run_lr_find(args, console: Console) -> int:
    from crop_accel.train import run_lr_find

    return run_lr_find(args, console)


def _run_check_data(args, console: Console) -> int:
    # check-data logs through the same handlers as training, on a single process.
    setup_logging(console, is_main_process=True)
    return run_check_data(args, console)


def main(argv: list[str] | None = None, default_command: str | None = None) -> int:
    """Parse ``argv`` and run the subcommand; return the process exit code.

    With ``default_command``, arguments that do not start with a subcommand name run
    that subcommand, so ``launch/train.py --data-dir X`` means ``train --data-dir X``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if default_command and (not argv or argv[0] not in SUBCOMMANDS):
        argv = [default_command, *argv]

    args = build_parser().parse_args(argv)
    # A job log is not a terminal, and rich would wrap it at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        return args.handler(args, console)
    except (DataError, ModelError, CheckpointError, ValueError) as error:
        print_error(console, error)
        return 2
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
