"""The ``evaluate`` and ``predict`` commands: run a trained model dir on images.

Both use the model's own data config (input size, interpolation, crop_pct, mean and
std) for the evaluation transform, and both run under ``accelerate launch`` too: each
process predicts a shard, and ``gather_for_metrics`` returns every image exactly once.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from pathlib import Path

import numpy as np
import timm.data
from rich.console import Console

from crop_accel.analysis import analyze_predictions, print_analysis, write_analysis
from crop_accel.console import setup_logging
from crop_accel.data import ImageFolderDataset, build_loader, resolve_num_workers
from crop_accel.engine import evaluate
from crop_accel.export import atomic_write_json, load_model
from crop_accel.model import to_memory_format
from crop_accel.images import ImageLoadError, load_rgb
from crop_accel.options import NUM_WORKERS_HELP, add_channels_last_argument, non_negative_int, positive_int
from crop_accel.runtime import build_accelerator, share_from_main
from crop_accel.scan import DataError, list_class_files, scan_image_folder

logger = logging.getLogger(__name__)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True, help="Output dir of a training run (model.safetensors + model.json).")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per process per batch (default: 64).")
    parser.add_argument("--num-workers", type=non_negative_int, default=None, help=NUM_WORKERS_HELP)
    add_channels_last_argument(parser)
    parser.add_argument(
        "--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="Mixed precision (default: accelerate's setting)."
    )


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--data-dir", required=True, help="Labelled ImageFolder with the model's class folders.")
    parser.add_argument("--output-dir", default=None, help="Folder for the analysis files (default: MODEL_DIR/evaluation).")
    parser.add_argument("--num-worst", type=int, default=36, help="Images in the worst-error gallery (default: 36).")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("inputs", nargs="+", help="Image files or folders (searched recursively).")
    parser.add_argument("--output", required=True, help="CSV file to write, one row per image.")
    parser.add_argument("--top-k", type=positive_int, default=3, help="Classes listed per image, most probable first (default: 3).")


def _eval_transform(data_config: dict):
    return timm.data.create_transform(**data_config, is_training=False)


def run_evaluate(args, console: Console) -> int:
    """Score a trained model on a labelled folder and write the same analysis as training."""
    accelerator = build_accelerator(args)
    setup_logging(console, accelerator.is_main_process)
    bundle = load_model(args.model_dir)
    scan = share_from_main(accelerator, lambda: scan_image_folder(args.data_dir))
    if not scan.samples:
        raise DataError(f"no readable images in {args.data_dir}; {len(scan.skipped)} files were skipped")
    if scan.classes != bundle.class_names:
        raise DataError(
            f"{args.data_dir} has classes {scan.classes}, but the model in {args.model_dir} was trained on "
            f"{bundle.class_names}; evaluate on a folder with the same class folders"
        )

    dataset = ImageFolderDataset(scan.data_dir, scan.samples, _eval_transform(bundle.data_config))
    workers = resolve_num_workers(args.num_workers, accelerator.device)
    model, loader = accelerator.prepare(to_memory_format(bundle.model, args.channels_last), build_loader(dataset, args.batch_size, False, workers))
    output = evaluate(accelerator, model, loader)

    if accelerator.is_main_process:
        output_dir = Path(args.output_dir) if args.output_dir else Path(args.model_dir) / "evaluation"
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = [scan.samples[i][0] for i in output.indices]
        analysis = analyze_predictions(output.targets, output.probs, bundle.class_names, paths, args.num_worst)
        write_analysis(analysis, output_dir, scan.data_dir)
        atomic_write_json(output_dir / "metrics.json", analysis.to_dict())
        print_analysis(analysis, console)
        logger.info("Evaluated %d images: accuracy %.4f. Files in %s", len(paths), analysis.accuracy, output_dir)
    accelerator.wait_for_everyone()
    return 0


def collect_images(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and folders into decodable images; return (images, skipped with reasons)."""
    candidates: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files, _, _ = list_class_files(path)
            candidates.extend(files)
        elif path.is_file():
            candidates.append(path)
        else:
            raise DataError(f"input {item} not found; pass image files or folders")

    images, skipped = [], []
    for path in candidates:
        try:
            load_rgb(path, min_side=32)
        except ImageLoadError as error:
            skipped.append((str(path), error.reason))
            continue
        images.append(path)
    return images, skipped


def run_predict(args, console: Console) -> int:
    """Predict the top-k classes of every input image and write them to a CSV file."""
    accelerator = build_accelerator(args)
    setup_logging(console, accelerator.is_main_process)
    bundle = load_model(args.model_dir)
    images, skipped = share_from_main(accelerator, lambda: collect_images(args.inputs))
    for path, reason in skipped:
        logger.warning("Skipping %s: %s", path, reason)
    if not images:
        raise DataError(f"no readable images in {' '.join(args.inputs)}; {len(skipped)} file(s) were skipped")

    # Labels are unused; 0 keeps the batch layout of the training dataset.
    samples = [(os.path.abspath(path), 0) for path in images]
    dataset = ImageFolderDataset("/", samples, _eval_transform(bundle.data_config))
    workers = resolve_num_workers(args.num_workers, accelerator.device)
    model, loader = accelerator.prepare(to_memory_format(bundle.model, args.channels_last), build_loader(dataset, args.batch_size, False, workers))
    output = evaluate(accelerator, model, loader)

    if accelerator.is_main_process:
        write_predictions(Path(args.output), [str(images[i]) for i in output.indices], output.probs, bundle.class_names, args.top_k)
        logger.info("Wrote predictions for %d image(s) to %s (%d skipped)", len(images), args.output, len(skipped))
    accelerator.wait_for_everyone()
    return 0


def write_predictions(path: Path, image_paths: list[str], probs: np.ndarray, class_names: list[str], top_k: int) -> None:
    """Write path, then (class, probability) pairs for the ``top_k`` classes, sorted by path."""
    if top_k > len(class_names):
        logger.info("--top-k %d is more than the %d classes; listing all of them", top_k, len(class_names))
    top_k = min(top_k, len(class_names))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    header = ["path"]
    for rank in range(1, top_k + 1):
        header += [f"class_{rank}", f"prob_{rank}"]

    rows = []
    for image_path, classes, row_probs in zip(image_paths, order, probs):
        row = [image_path]
        for index in classes:
            row += [class_names[index], f"{row_probs[index]:.6f}"]
        rows.append(row)
    rows.sort(key=lambda row: row[0])

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(temporary, path)
