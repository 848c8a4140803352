"""Measure throughput in images/s: model alone, training loop, evaluation, LR range test, loader alone.

The measurements share one model, one optimizer with train's discriminative param
groups, one Accelerator, and the same batch size, image size and torch thread count.
The ratio of the training loop to the model alone is therefore the share of the model's
speed that the data pipeline (decoding, augmentation, data loader) leaves. Run it as
``python bench/throughput.py --data-dir DIR ...``, or for a GPU under ``accelerate launch``
with one process. docs/benchmarks.md has the commands and measured figures.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import accelerate
import torch
from accelerate.utils import set_seed
from rich.console import Console

from crop_accel import data as data_lib
from crop_accel.console import TrainingProgress, print_error, setup_logging
from crop_accel.engine import evaluate, train_one_epoch
from crop_accel.export import atomic_write_json
from crop_accel.lr_finder import MIN_DESCENT_POINTS, lr_range_test
from crop_accel.model import ModelError, build_param_groups, create_model, to_memory_format
from crop_accel.options import add_channels_last_argument, add_model_arguments, positive_int
from crop_accel.runtime import build_accelerator, effective_precision
from crop_accel.scan import DataError, scan_image_folder, validate_for_training
from crop_accel.train import build_scheduler

# bench/ is a folder of scripts; Python puts it on sys.path when it runs one of them.
from bench_report import build_report, print_report, read_load_average
from timed_windows import Sizes, interleaved_schedule, sequential_windows, window_rates

logger = logging.getLogger("bench.throughput")

# train's default head lr; the measured speed does not depend on it.
HEAD_LR = 1e-3
# (steps, repeats, warm-up batches) without and with --short.
DEFAULT_SIZES, SHORT_SIZES = (5, 3, 2), (4, 3, 1)
# The benchmark sweep only needs its steps to run. Learning rates this small keep the loss
# from diverging within a few steps, which would end the sweep before the timed steps.
SWEEP_START_LR, SWEEP_END_LR = 1e-7, 1e-5

def build_parser() -> argparse.ArgumentParser:
    """Return train's data and model options plus the measurement options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--threads", type=positive_int, default=None,
                       help="torch intra-op threads (default: torch's choice, which OMP_NUM_THREADS sets).")
    add_channels_last_argument(bench)
    bench.add_argument("--steps", type=positive_int, default=None, help="Batches per timed repeat (default: 5; 4 with --short).")
    bench.add_argument("--repeats", type=positive_int, default=None, help="Timed repeats; the median is reported (default: 3, also with --short).")
    bench.add_argument("--warmup", type=positive_int, default=None, help="Untimed batches before the first timed window of each measurement (default: 2; 1 with --short).")
    bench.add_argument("--short", action="store_true", help="Short measurement for tests and quick checks (4 batches x 3 repeats, 1 warm-up batch).")
    bench.add_argument("--output", type=Path, default=None,
                       help="Write the JSON report to this file (default: OUTPUT_DIR/throughput.json with --output-dir, else none).")
    bench.add_argument("--verbose", action="store_true", help="Log debug messages.")
    return parser


def resolve_sizes(args) -> Sizes:
    """Return the sizes given as options, else the defaults of the mode (--short or not)."""
    defaults = SHORT_SIZES if args.short else DEFAULT_SIZES
    given = (args.steps, args.repeats, args.warmup)
    return Sizes(*(value if value is not None else default for value, default in zip(given, defaults)))


@dataclass
class Bench:
    """Model, optimizer, data and loaders shared by the measurements; ``prepare`` replaces them with prepared ones."""

    accelerator: accelerate.Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: data_lib.TrainingData
    data_config: dict
    batch_size: int
    num_workers: int
    cache_seconds: float | None
    scheduler: object = None
    train_loader: object = None
    val_loader: object = None


def set_up(args) -> Bench:
    """Build the Accelerator, model, param groups and datasets the way ``train`` does."""
    if not Path(args.data_dir).is_dir():
        raise DataError(f"--data-dir {args.data_dir} is not a folder; pass an ImageFolder root")
    accelerator = build_accelerator(args)
    if accelerator.num_processes > 1:
        raise ValueError(
            f"the benchmark measures one process, not {accelerator.num_processes}; "
            "start it with accelerate launch --num_processes 1"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)

    scan = scan_image_folder(args.data_dir)
    validate_for_training(scan)
    model = create_model(args.model, len(scan.classes), args.pretrained, args.pretrained_file)
    data_config = data_lib.resolve_data_config(model, args.image_size)
    data = data_lib.build_training_data(scan, data_config, args.val_fraction, args.seed, args.group_duplicates)
    cache_seconds = None
    if args.cache_images:
        started = time.perf_counter()
        data_lib.attach_image_cache(data, data_config)
        cache_seconds = time.perf_counter() - started

    model = to_memory_format(model, args.channels_last).to(accelerator.device)
    optimizer = torch.optim.Adam(build_param_groups(model, HEAD_LR, args.lr_divisors))
    num_workers = data_lib.resolve_num_workers(args.num_workers, accelerator.device)
    return Bench(accelerator, model, optimizer, data, data_config, args.batch_size, num_workers, cache_seconds)


def prepare(bench: Bench) -> Bench:
    """Build both loaders and pass everything through ``accelerator.prepare``, as ``train`` does."""
    train_loader = data_lib.build_loader(bench.data.train_set, bench.batch_size, True, bench.num_workers)
    val_loader = data_lib.build_loader(bench.data.val_set, bench.batch_size, False, bench.num_workers)
    model, optimizer, train_loader, val_loader = bench.accelerator.prepare(
        bench.model, bench.optimizer, train_loader, val_loader
    )
    scheduler = bench.accelerator.prepare(build_scheduler(optimizer, "constant", 1))
    return replace(
        bench, model=model, optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, val_loader=val_loader
    )


def random_batches(bench: Bench) -> list[tuple[torch.Tensor, ...]]:
    """Return two batches of random images, labels and indices, already on the device."""
    channels, height, width = bench.data_config["input_size"]
    num_classes = len(bench.data.scan.classes)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        images = torch.randn(bench.batch_size, channels, height, width, generator=generator)
        targets = torch.randint(num_classes, (bench.batch_size,), generator=generator)
        indices = torch.arange(bench.batch_size)
        batches.append(tuple(tensor.to(bench.accelerator.device) for tensor in (images, targets, indices)))
    return batches


def loader_epochs(loader):
    """Yield the batches of ``loader`` epoch after epoch, setting each epoch as train's loop does."""
    epoch = 0
    while True:
        epoch += 1
        loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the training loader yielded no batches; check that --data-dir has training images")


def scheduled_batches(sources: list[str], in_memory: list, loader):
    """Yield an in-memory batch or the next loader batch for each entry of ``sources``."""
    real_batches = loader_epochs(loader)
    for index, source in enumerate(sources):
        yield in_memory[index % len(in_memory)] if source == "model_only" else next(real_batches)
    real_batches.close()


def measure_training(bench: Bench, sizes: Sizes, console: Console) -> dict[str, list[float]]:
    """Time train_one_epoch on random in-memory batches and on the prepared loader, interleaved.

    Both sources go through the same train_one_epoch call with train's progress bar as
    the batch callback, so the two rates differ only by the data pipeline.
    """
    # DataLoader prefetches prefetch_factor (default 2) batches per worker.
    sources, windows = interleaved_schedule(sizes, switch_batches=2 * bench.num_workers)
    logger.info(
        "Timing %d batches, random and real in alternating windows; the loss and accuracy shown mix both and mean nothing",
        len(sources),
    )
    stamps: list[tuple[float, int]] = []
    with TrainingProgress(console, epochs=1, steps_per_epoch=len(sources)) as progress:

        def record(batch_index: int, loss: float, accuracy: float, images: int) -> None:
            progress.update_batch(batch_index, loss, accuracy, images)
            stamps.append((time.perf_counter(), images))

        progress.start_epoch(1)
        batches = scheduled_batches(sources, random_batches(bench), bench.train_loader)
        train_one_epoch(bench.accelerator, bench.model, batches, bench.optimizer, bench.scheduler, None, record)
    return {name: window_rates(stamps, windows[name]) for name in windows}


def measure_loader(bench: Bench, sizes: Sizes) -> list[float]:
    """Time the training loader alone: the most images/s the data pipeline can feed the model."""
    stamps = []
    batches = loader_epochs(bench.train_loader)
    for _ in range(sizes.batches):
        images = len(next(batches)[0])
        stamps.append((time.perf_counter(), images))
    batches.close()
    return window_rates(stamps, sequential_windows(sizes))


def measure_evaluate(bench: Bench, sizes: Sizes) -> list[float]:
    """Time ``repeats`` passes of evaluate over the validation set, after one untimed pass."""
    evaluate(bench.accelerator, bench.model, bench.val_loader)
    rates = []
    for _ in range(sizes.repeats):
        output = evaluate(bench.accelerator, bench.model, bench.val_loader)
        rates.append(len(output.targets) / output.seconds)
    return rates


def measure_lr_range_test(bench: Bench, sizes: Sizes) -> list[float]:
    """Time the steps of one lr_range_test sweep on a plain loader over the training images.

    The sweep must run before ``prepare``. Its snapshot and restore of the model happen
    once per sweep, outside the timed windows.
    """
    loader = data_lib.build_loader(bench.data.train_set, bench.batch_size, True, bench.num_workers)
    step_ends: list[float] = []
    result = lr_range_test(
        bench.model, bench.optimizer, loader, torch.nn.functional.cross_entropy, bench.accelerator,
        start_lr=SWEEP_START_LR, end_lr=SWEEP_END_LR, num_steps=max(2 * MIN_DESCENT_POINTS, sizes.batches),
        progress=lambda *_: step_ends.append(time.perf_counter()),
    )
    if result.stopped_early:
        raise RuntimeError(f"the LR range test stopped before the timed steps ended: {result.stopped_early}")
    return window_rates([(end, result.batch_size) for end in step_ends], sequential_windows(sizes))


def describe_settings(args, bench: Bench, sizes: Sizes) -> dict:
    """Return every setting the figures depend on, for the report."""
    settings = {name: getattr(args, name) for name in ("model", "cache_images", "channels_last", "seed", "val_fraction")}
    settings.update(
        pretrained=bool(args.pretrained or args.pretrained_file), image_size=bench.data_config["input_size"][1],
        batch_size=bench.batch_size, num_workers=bench.num_workers, torch_threads=torch.get_num_threads(),
        mixed_precision=effective_precision(bench.accelerator), **asdict(sizes),
        evaluate_repeat="one pass over the validation images",
    )
    return settings


def describe_data(args, bench: Bench) -> dict:
    """Return the image folder, its split and how long the image cache took to fill."""
    return {
        "data_dir": str(args.data_dir), "classes": len(bench.data.scan.classes), "train_images": len(bench.data.train_set),
        "val_images": len(bench.data.val_set), "cache_fill_seconds": bench.cache_seconds,
    }


def run_benchmark(args, console: Console) -> dict:
    """Set up once, then run the four measurements; the LR range test must come before ``prepare``."""
    sizes = resolve_sizes(args)
    load_before = read_load_average()
    bench = set_up(args)
    rates = {"lr_range_test": measure_lr_range_test(bench, sizes)}
    bench = prepare(bench)
    rates.update(measure_training(bench, sizes, console))
    rates["evaluate"] = measure_evaluate(bench, sizes)
    rates["loader_only"] = measure_loader(bench, sizes)
    settings, data = describe_settings(args, bench, sizes), describe_data(args, bench)
    return build_report(bench.accelerator.device, settings, data, rates, load_before)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    setup_logging(console, is_main_process=True, verbose=args.verbose)
    try:
        report = run_benchmark(args, console)
    except (DataError, ModelError, ValueError) as error:
        print_error(console, error)
        return 2

    print_report(console, report)
    output = args.output or (Path(args.output_dir) / "throughput.json" if args.output_dir else None)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output, report)
        logger.info("Wrote the report to %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
