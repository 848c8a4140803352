"""Compare training steps in the channels_last and contiguous memory formats.

Both copies of the model start from the same weights and train on the same random batch
in one process. Their windows alternate round by round (AB BA AB ...), so a change in
machine load hits both, and the per-round ratio is the figure to read. Run it as
``python bench/memory_format.py --model resnet50``; docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from bench_report import machine_info
from crop_accel.console import print_error
from crop_accel.export import atomic_write_json
from crop_accel.model import ModelError, create_model
from crop_accel.options import positive_int

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
WARMUP_STEPS = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name, random weights (default: tf_efficientnet_lite0).")
    parser.add_argument("--image-size", type=positive_int, default=224, help="Square input size in pixels (default: 224).")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="Images per step (default: 32).")
    parser.add_argument("--num-classes", type=positive_int, default=30, help="Classifier outputs (default: 30).")
    parser.add_argument("--rounds", type=positive_int, default=6, help="Number of rounds, each timing both formats once (default: 6).")
    parser.add_argument("--steps", type=positive_int, default=3, help="Training steps per format and round (default: 3).")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice).")
    parser.add_argument("--output", type=Path, default=None, help="Write the JSON report to this file.")
    return parser


class FormatRunner:
    """One model copy in one memory format, with its own Adam optimizer."""

    def __init__(self, model: torch.nn.Module, memory_format: torch.memory_format):
        self.model = model.to(memory_format=memory_format)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(images), targets).backward()
        self.optimizer.step()


def measure(args) -> dict[str, list[float]]:
    """Return the images/s of every round for each format, after untimed warm-up steps."""
    torch.manual_seed(0)
    base = create_model(args.model, args.num_classes, pretrained=False, pretrained_file=None).train()
    runners = {name: FormatRunner(copy.deepcopy(base), memory_format) for name, memory_format in FORMATS.items()}
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    targets = torch.randint(args.num_classes, (args.batch_size,))
    for runner in runners.values():
        for _ in range(WARMUP_STEPS):
            runner.step(images, targets)

    rates: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(args.rounds):
        order = list(runners) if round_index % 2 == 0 else list(runners)[::-1]
        for name in order:
            started = time.perf_counter()
            for _ in range(args.steps):
                runners[name].step(images, targets)
            rates[name].append(args.batch_size * args.steps / (time.perf_counter() - started))
    return rates


def build_report(args, rates: dict[str, list[float]]) -> dict:
    ratios = [last / contiguous for last, contiguous in zip(rates["channels_last"], rates["contiguous"])]
    settings = {name: getattr(args, name) for name in ("model", "image_size", "batch_size", "rounds", "steps")}
    return {
        "machine": machine_info(torch.device("cpu")),
        "settings": {**settings, "warmup_steps": WARMUP_STEPS, "torch_threads": torch.get_num_threads()},
        "images_per_second": {name: statistics.median(values) for name, values in rates.items()},
        "repeats_images_per_second": rates,
        "repeats_ratio_channels_last_to_contiguous": ratios,
        "ratio_channels_last_to_contiguous": statistics.median(ratios),
    }


def print_report(console: Console, report: dict) -> None:
    settings = report["settings"]
    table = Table(title=f"{settings['model']} training steps at {settings['image_size']} px, batch {settings['batch_size']}")
    for column in ("memory format", "images/s (median)", "rounds (images/s)"):
        table.add_column(column, justify="left" if column == "memory format" else "right")
    for name, median in report["images_per_second"].items():
        rounds = ", ".join(f"{value:.1f}" for value in report["repeats_images_per_second"][name])
        table.add_row(name, f"{median:.1f}", rounds)
    console.print(table)
    ratios = ", ".join(f"{ratio:.2f}" for ratio in report["repeats_ratio_channels_last_to_contiguous"])
    console.print(
        f"channels_last / contiguous: {report['ratio_channels_last_to_contiguous']:.2f} (median of the rounds {ratios})",
        highlight=False,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        rates = measure(args)
    except ModelError as error:
        print_error(console, error)
        return 2

    report = build_report(args, rates)
    print_report(console, report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
