"""A decoded-image cache for datasets that fit in memory.

Every image is decoded once, before training, at a short side slightly above the
training size, and kept as a uint8 array. Augmentation still runs on every epoch, on
the cached copy, so after the first decode no full-size JPEG is read again. Data loader
workers forked afterwards share the arrays' memory pages instead of copying them.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from crop_accel.images import load_rgb

logger = logging.getLogger(__name__)


def cache_min_side(data_config: dict) -> int:
    """Return the short side to cache at: the eval resize size, never below the input size.

    The eval transform resizes to input_size / crop_pct before its center crop, so at
    this size the cached copy loses nothing that validation would keep.
    """
    size = max(data_config["input_size"][1:])
    return max(size, math.ceil(size / data_config.get("crop_pct", 1.0)))


class DecodedImageCache:
    """RGB images as uint8 arrays, keyed by their path relative to ``root``."""

    def __init__(self, root: str | Path, min_side: int):
        self.root = Path(root)
        self.min_side = min_side
        self._arrays: dict[str, np.ndarray] = {}

    def fill(self, relative_paths: list[str], on_image: Callable[[int, int], None] | None = None) -> None:
        """Decode each path once; ``on_image(done, total)`` reports progress."""
        start = time.perf_counter()
        todo = [path for path in dict.fromkeys(relative_paths) if path not in self._arrays]
        for done, relative in enumerate(todo, start=1):
            image = load_rgb(self.root / relative, min_side=self.min_side)
            self._arrays[relative] = np.asarray(image, dtype=np.uint8)
            if on_image is not None:
                on_image(done, len(todo))
        logger.info(
            "Decoded-image cache: %d images at short side %d px, %.1f MiB in memory, filled in %.1f s",
            len(self._arrays), self.min_side, self.nbytes / 2**20, time.perf_counter() - start,
        )

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self._arrays.values())

    def __contains__(self, relative: str) -> bool:
        return relative in self._arrays

    def get(self, relative: str) -> Image.Image:
        """Return the cached image, decoding and storing it first if it is missing."""
        array = self._arrays.get(relative)
        if array is None:
            array = np.asarray(load_rgb(self.root / relative, min_side=self.min_side), dtype=np.uint8)
            self._arrays[relative] = array
        return Image.fromarray(array)
