"""Timed windows of a benchmark's batches, and the images/s of each window.

A measurement runs warm-up batches, then ``repeats`` windows of ``steps`` batches. The
training measurement interleaves windows of random in-memory batches with windows of
real loader batches, so both see the same machine load.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """Measurement size: ``repeats`` timed windows of ``steps`` batches after ``warmup`` untimed batches."""

    steps: int
    repeats: int
    warmup: int

    @property
    def batches(self) -> int:
        return self.warmup + self.steps * self.repeats


def window_rates(stamps: list[tuple[float, int]], windows: list[range]) -> list[float]:
    """Return the images/s of each window of batch indices from the (end time, images) of every batch.

    A window starts when the batch before it ends, so each timed batch's loading and
    compute fall inside its window. Index 0 is therefore never the start of a window.
    """
    needed = max(window.stop for window in windows)
    if len(stamps) < needed:
        raise RuntimeError(f"only {len(stamps)} of the {needed} batches of the measurement ran")
    rates = []
    for window in windows:
        seconds = stamps[window.stop - 1][0] - stamps[window.start - 1][0]
        images = sum(stamps[index][1] for index in window)
        rates.append(images / seconds)
    return rates


def sequential_windows(sizes: Sizes) -> list[range]:
    """Return the windows of ``repeats`` x ``steps`` consecutive batches after ``warmup`` batches."""
    return [range(sizes.warmup + repeat * sizes.steps, sizes.warmup + (repeat + 1) * sizes.steps) for repeat in range(sizes.repeats)]


def interleaved_schedule(sizes: Sizes, switch_batches: int) -> tuple[list[str], dict[str, list[range]]]:
    """Return the source of every batch and the timed windows of each source.

    Every repeat times ``steps`` random batches and ``steps`` loader batches back to
    back, so a change in background load hits both halves of a pair alike. The order
    alternates between repeats (AB BA AB ...), so a steady drift in speed does not favour
    one source. ``switch_batches`` untimed batches precede each window after the first,
    because the loader's workers keep prefetching during a random-batch window and would
    start the next loader window ahead.
    """
    sources: list[str] = []
    windows: dict[str, list[range]] = {"model_only": [], "train_loop": []}
    for repeat in range(sizes.repeats):
        order = list(windows) if repeat % 2 == 0 else list(windows)[::-1]
        for name in order:
            sources += [name] * (max(sizes.warmup, switch_batches) if repeat == 0 else switch_batches)
            windows[name].append(range(len(sources), len(sources) + sizes.steps))
            sources += [name] * sizes.steps
    return sources, windows
