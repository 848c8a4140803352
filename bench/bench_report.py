"""The benchmark's JSON report: machine, settings, data, and the median images/s of each measurement."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import accelerate
import timm
import torch
from rich.console import Console
from rich.table import Table

from crop_accel.runtime import usable_cpu_cores

LABELS = {
    "model_only": "model only (random tensors in memory)",
    "train_loop": "training loop (real images, train_one_epoch)",
    "evaluate": "evaluation (evaluate)",
    "lr_range_test": "LR range test (lr_range_test)",
    "loader_only": "data loader alone (real images, no model)",
}
RATIO_KEY = "ratio_train_loop_to_model_only"


def read_cpu_model() -> str:
    """Return the "model name" of /proc/cpuinfo, else what the platform module reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_load_average() -> list[float] | None:
    """Return the 1, 5 and 15 minute load averages, or None where /proc/loadavg is missing."""
    try:
        return [float(value) for value in Path("/proc/loadavg").read_text(encoding="ascii").split()[:3]]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    """Return the CPU, core counts, torch threads and library versions that the figures depend on."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu_model": read_cpu_model(), "cpu_cores": os.cpu_count(), "usable_cores": usable_cpu_cores(),
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "accelerate_version": accelerate.__version__, "timm_version": timm.__version__,
        "python_version": platform.python_version(), "device": str(device), "gpu": gpu,
    }


def build_report(device: torch.device, settings: dict, data: dict, rates: dict[str, list[float]], load_before) -> dict:
    """Collect machine, settings, data and the median images/s of each measurement with its repeats."""
    measurements = {
        name: {"images_per_second": statistics.median(rates[name]), "repeats_images_per_second": rates[name]}
        for name in LABELS
    }
    machine = machine_info(device)
    machine.update(load_average_before=load_before, load_average_after=read_load_average())
    # The two windows of a repeat ran back to back, so the ratio within a pair is less
    # exposed to changes in background load than the ratio of the two medians.
    ratios = [loop / model for loop, model in zip(rates["train_loop"], rates["model_only"])]
    measurements["train_loop"]["repeats_ratio_to_model_only"] = ratios
    return {
        "machine": machine, "settings": settings, "data": data, "measurements": measurements,
        RATIO_KEY: statistics.median(ratios),
    }


def print_report(console: Console, report: dict) -> None:
    """Print the measurements as a table, then the ratio and the load averages."""
    settings = report["settings"]
    title = (
        f"{settings['model']} at {settings['image_size']} px, batch {settings['batch_size']}, "
        f"{settings['torch_threads']} torch threads, {settings['num_workers']} workers, "
        f"cache {'on' if settings['cache_images'] else 'off'}, on {report['machine']['device']}"
    )
    table = Table(title=title)
    for column, justify in (("measurement", "left"), ("images/s (median)", "right"), ("repeats (images/s)", "right")):
        table.add_column(column, justify=justify)
    for name, label in LABELS.items():
        values = report["measurements"][name]
        repeats = ", ".join(f"{value:.1f}" for value in values["repeats_images_per_second"])
        table.add_row(label, f"{values['images_per_second']:.1f}", repeats)
    console.print(table)
    pairs = ", ".join(f"{ratio:.3f}" for ratio in report["measurements"]["train_loop"]["repeats_ratio_to_model_only"])
    console.print(f"training loop / model only: {report[RATIO_KEY]:.3f} (median of the repeats {pairs})", highlight=False)
    machine = report["machine"]
    console.print(
        f"load average (1, 5, 15 min) before {machine['load_average_before']}, after {machine['load_average_after']}",
        highlight=False,
    )
