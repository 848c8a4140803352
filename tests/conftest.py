"""Shared fixtures: generated ImageFolders and paths to the optional real data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
REAL_DATA_DIR = SHARED_DIR / "data" / "agricultural_crops"
LITE0_WEIGHTS = SHARED_DIR / "weights" / "tf_efficientnet_lite0.in1k.safetensors"

# Base colours of the generated classes; a tiny CNN separates them within an epoch or two.
CLASS_COLOURS = {
    "blue_sky": (40, 60, 220),
    "green_leaf": (40, 200, 60),
    "red_soil": (210, 50, 40),
    "yellow_wheat": (230, 210, 40),
}


def write_pattern_image(path: Path, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 48) -> None:
    """Save a noisy image of ``colour`` with a random stripe, as JPEG or PNG by suffix."""
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[:] = colour
    pixels += rng.normal(0, 25, pixels.shape)
    start = int(rng.integers(0, size - 8))
    pixels[start : start + 6, :, :] *= 0.6
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.save(path)


def make_photo(seed: int, colour=(60, 140, 50), size=(240, 160)) -> Image.Image:
    """Return a smooth random image around ``colour``: blobs like foliage, soil and sky."""
    rng = np.random.default_rng(seed)
    coarse = np.clip(np.array(colour) + rng.normal(0, 50, (6, 9, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def make_image_folder(root: Path, num_classes: int = 3, per_class: int = 12, size: int = 48, seed: int = 0) -> Path:
    """Create an ImageFolder of learnable colour classes under ``root`` and return it."""
    rng = np.random.default_rng(seed)
    for name, colour in list(CLASS_COLOURS.items())[:num_classes]:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            suffix = ".jpg" if index % 2 == 0 else ".png"
            write_pattern_image(folder / f"img_{index:03d}{suffix}", colour, rng, size)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


def tiny_train_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Options for a fast CPU training run on a generated folder."""
    return [
        "--data-dir", str(data_dir),
        "--output-dir", str(output_dir),
        "--model", "resnet18",
        "--no-pretrained",
        "--image-size", "32",
        "--batch-size", "4",
        "--epochs", "2",
        "--num-workers", "0",
        "--lr", "3e-3",
        *extra,
    ]


def run_accelerate(script_args: list[str], num_processes: int = 2, extra_env: dict | None = None, timeout: int = 300):
    """Run ``accelerate launch`` with ``num_processes`` CPU processes over gloo and return the result.

    accelerate 1.16 starts a single process for ``--cpu --num_processes 2`` unless MPI is
    set up. ``--multi_gpu`` with ACCELERATE_USE_CPU=true starts torchrun workers that
    join a gloo process group on the CPU instead.
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "ACCELERATE_USE_CPU": "true",
        **(extra_env or {}),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", "0",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        *script_args,
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


requires_real_data = pytest.mark.skipif(
    not (REAL_DATA_DIR.is_dir() and LITE0_WEIGHTS.is_file()),
    reason=f"real crop photos ({REAL_DATA_DIR}) or lite0 ImageNet weights ({LITE0_WEIGHTS}) not present",
)
