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
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from crop_accel.images import load_rgb, size_at_min_side
from crop_accel.memory import available_memory_bytes
from crop_accel.scan import DataError

logger = logging.getLogger(__name__)

# Share of the available memory that the caches of a node may take. The rest is left for
# the model, activations, loader workers and the page cache.
MAX_MEMORY_SHARE = 0.5


def cache_min_side(data_config: dict) -> int:
    """Return the short side to cache at: the eval resize size, never below the input size.

    The eval transform resizes to input_size / crop_pct before its center crop, so at
    this size the cached copy loses nothing that validation would keep.
    """
    size = max(data_config["input_size"][1:])
    return max(size, math.ceil(size / data_config.get("crop_pct", 1.0)))


def estimate_cache_bytes(stored_sizes: Iterable[tuple[int, int]], min_side: int) -> int:
    """Return the bytes of uint8 RGB arrays for images of these (width, height) cached at ``min_side``.

    EXIF rotation swaps width and height but keeps the pixel count, so stored sizes suffice.
    """
    total = 0
    for width, height in stored_sizes:
        cached_width, cached_height = size_at_min_side(width, height, min_side)
        total += cached_width * cached_height * 3
    return total


def check_cache_fits(bytes_per_process: int, processes: int, available: int | None = None) -> None:
    """Raise DataError when ``processes`` caches of ``bytes_per_process`` exceed the memory share.

    ``available`` defaults to the memory available now. Where that is unknown, nothing is checked.
    """
    available = available_memory_bytes() if available is None else available
    if available is None:
        return
    needed = bytes_per_process * processes
    if needed > MAX_MEMORY_SHARE * available:
        raise DataError(
            f"--cache-images needs about {needed / 2**30:.1f} GiB ({processes} process(es) on this node, "
            f"{bytes_per_process / 2**30:.1f} GiB each), more than {MAX_MEMORY_SHARE:.0%} of the "
            f"{available / 2**30:.1f} GiB of memory available; train without --cache-images or with a smaller --image-size"
        )
    logger.debug("Decoded-image cache estimate: %.1f MiB per process, %.1f GiB available", bytes_per_process / 2**20, available / 2**30)


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
