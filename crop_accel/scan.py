"""Discovery of an ImageFolder tree: class folders, image files and the files to skip.

The scan decodes every file once, so files that cannot be read are reported and left out
before training starts instead of failing in the middle of an epoch. It also records what
``check-data`` reports about each file (format, size, hashes) and groups duplicate photos.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


from crop_accel.duplicates import DEFAULT_NEAR_DUPLICATE_THRESHOLD, DuplicatePair, find_duplicates
from crop_accel.fileinfo import CACHE_FILE_NAME, FileInfo, inspect_files

logger = logging.getLogger(__name__)

_MAX_LOGGED_SKIPS = 20
_LINKED_FOLDER_REASON = "symbolic link to a folder, not followed; move or copy its images into the class folder"


class DataError(ValueError):
    """A data folder that cannot be used for training, with the reason and the fix."""


@dataclass
class ScanResult:
    """Readable images, skipped files and duplicate groups of one ImageFolder tree.

    Paths are relative to ``data_dir`` and use forward slashes; names that are not valid
    UTF-8 keep their bytes as surrogate escapes (``os.fsdecode``), see ``display_path``.
    ``samples`` is sorted by class, then path, so the same folder always gives the same
    order. ``groups`` maps every sample to its duplicate group, its own path when it has
    no duplicate. ``conflicts`` lists the groups whose members are in different classes.
    """

    data_dir: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, FileInfo] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    duplicate_pairs: list[DuplicatePair] = field(default_factory=list)
    conflicts: list[list[str]] = field(default_factory=list)
    hidden_count: int = 0
    root_files: list[str] = field(default_factory=list)
    min_image_size: int | None = None
    near_duplicate_threshold: int = DEFAULT_NEAR_DUPLICATE_THRESHOLD
    decoded_count: int = 0
    cached_count: int = 0

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for _, label in self.samples:
            counts[label] += 1
        return counts

    def group_of(self, path: str) -> str:
        """Return the duplicate group of ``path``; a path missing from ``groups`` is its own."""
        return self.groups.get(path, path)

    def group_members(self) -> dict[str, list[str]]:
        """Map each group of two or more samples to its sorted member paths."""
        members: dict[str, list[str]] = {}
        for path, _ in self.samples:
            members.setdefault(self.group_of(path), []).append(path)
        return {group: sorted(paths) for group, paths in sorted(members.items()) if len(paths) > 1}

    def images(self) -> list[FileInfo]:
        return [self.files[path] for path, _ in self.samples if path in self.files]

    def extension_mismatches(self) -> list[FileInfo]:
        return [info for info in self.images() if info.extension_mismatch]

    def small_images(self) -> list[FileInfo]:
        """Return the images whose shorter side is below ``min_image_size`` pixels."""
        if self.min_image_size is None:
            return []
        return [info for info in self.images() if min(info.width, info.height) < self.min_image_size]

    def non_image_files(self) -> list[str]:
        return [path for path, _ in self.skipped if path in self.files and self.files[path].is_non_image]


def display_path(path: str) -> str:
    """Return ``path`` as valid Unicode, writing each byte that is not UTF-8 as ``\\xNN``.

    Use it for consoles, logs and JSON reports, which reject the surrogate escapes that
    ``os.fsdecode`` leaves in such names.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def list_class_folders(data_dir: Path) -> list[str]:
    """Return the sorted names of the non-hidden subfolders of ``data_dir``."""
    if not data_dir.exists():
        raise DataError(f"data folder {data_dir} not found; pass an existing folder with one subfolder per class")
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} is a file; pass the folder that contains one subfolder per class")
    return sorted(entry.name for entry in os.scandir(data_dir) if entry.is_dir() and not entry.name.startswith("."))


def list_class_files(class_dir: Path) -> tuple[list[Path], list[tuple[Path, str]], int]:
    """Return the files under ``class_dir`` (recursively), the folders not entered with the reason, and the hidden count.

    Symlinked folders are not followed, so a symlink loop cannot make the walk endless.
    Hidden entries (``.DS_Store``, ``._photo.jpg``, ``.ipynb_checkpoints``) are counted,
    and hidden folders are not entered.
    """
    files: list[Path] = []
    folders_not_entered: list[tuple[Path, str]] = []
    hidden = 0

    def record_unlistable(error: OSError) -> None:
        reason = f"{type(error).__name__}: {error.strerror}; the folder's files were not scanned"
        folders_not_entered.append((Path(error.filename), reason))

    for root, dirs, names in os.walk(class_dir, onerror=record_unlistable, followlinks=False):
        hidden += sum(name.startswith(".") for name in dirs + names)
        visible_dirs = sorted(d for d in dirs if not d.startswith("."))
        linked = {d for d in visible_dirs if os.path.islink(os.path.join(root, d))}
        folders_not_entered.extend((Path(root) / d, _LINKED_FOLDER_REASON) for d in sorted(linked))
        dirs[:] = [d for d in visible_dirs if d not in linked]
        files.extend(Path(root) / name for name in sorted(names) if not name.startswith("."))
    return files, folders_not_entered, hidden


def scan_image_folder(
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    min_image_size: int | None = None,
    near_duplicate_threshold: int = DEFAULT_NEAR_DUPLICATE_THRESHOLD,
) -> ScanResult:
    """Decode every file under ``data_dir``, sort it into samples and skipped files, and group duplicates.

    With ``cache_dir``, per-file results are kept in ``scan_cache.json`` there, keyed by
    path, size and modification time, so files that did not change are not decoded again.
    ``min_image_size`` only marks small images for the report; they stay in ``samples``.
    """
    started = time.perf_counter()
    data_dir = Path(data_dir)
    classes = list_class_folders(data_dir)
    root_files = sorted(entry.name for entry in os.scandir(data_dir) if not entry.is_dir() and not entry.name.startswith("."))

    entries: list[tuple[str, int, Path]] = []
    skipped: list[tuple[str, str]] = []
    hidden = sum(entry.name.startswith(".") for entry in os.scandir(data_dir))
    for label, class_name in enumerate(classes):
        files, folders_not_entered, class_hidden = list_class_files(data_dir / class_name)
        hidden += class_hidden
        entries.extend((path.relative_to(data_dir).as_posix(), label, path) for path in files)
        skipped.extend((path.relative_to(data_dir).as_posix(), reason) for path, reason in folders_not_entered)

    cache_path = Path(cache_dir) / CACHE_FILE_NAME if cache_dir is not None else None
    infos, decoded = inspect_files(data_dir, entries, cache_path)

    samples = [(relative, label) for relative, label, _ in entries if infos[relative].error is None]
    skipped.extend((relative, infos[relative].error) for relative, _, _ in entries if infos[relative].error is not None)
    skipped.sort()
    duplicates = find_duplicates(
        [path for path, _ in samples],
        [label for _, label in samples],
        [infos[path].sha256 for path, _ in samples],
        [infos[path].dhash for path, _ in samples],
        near_duplicate_threshold,
    )

    _log_skipped(skipped)
    logger.info(
        "Scanned %d files of %s in %.1f s (%d decoded, %d from the cache)",
        len(entries), display_path(str(data_dir)), time.perf_counter() - started, decoded, len(entries) - decoded,
    )
    return ScanResult(
        data_dir=data_dir, classes=classes, samples=samples, skipped=skipped, files=infos,
        groups=duplicates.groups, duplicate_pairs=duplicates.pairs, conflicts=duplicates.conflicts,
        hidden_count=hidden, root_files=root_files, min_image_size=min_image_size,
        near_duplicate_threshold=near_duplicate_threshold, decoded_count=decoded, cached_count=len(entries) - decoded,
    )


def _log_skipped(skipped: list[tuple[str, str]]) -> None:
    for relative, reason in skipped[:_MAX_LOGGED_SKIPS]:
        logger.warning("Skipping %s: %s", display_path(relative), reason)
    if len(skipped) > _MAX_LOGGED_SKIPS:
        logger.warning("Skipping %d more files; run crop-accel check-data for the full list", len(skipped) - _MAX_LOGGED_SKIPS)


def validate_for_training(result: ScanResult, group_duplicates: bool = False) -> None:
    """Raise DataError when the scanned folder cannot give a train and a validation set.

    With ``group_duplicates``, a class also needs two duplicate groups, because a split
    that keeps each group on one side cannot put a photo and its copy on both sides.
    """
    if not result.classes:
        if result.root_files:
            raise DataError(
                f"{result.data_dir} contains {len(result.root_files)} files but no class folders; "
                "move the images into one subfolder per class, e.g. DATA_DIR/maize/img1.jpg"
            )
        raise DataError(
            f"no class folders in {result.data_dir}; expected one subfolder per class, "
            "e.g. DATA_DIR/maize/img1.jpg"
        )
    counts = result.class_counts()
    if sum(counts) == 0:
        raise DataError(f"no readable images in {result.data_dir}; {len(result.skipped)} files were skipped")
    if len(result.classes) < 2:
        raise DataError(
            f"only one class folder ({result.classes[0]!r}) in {result.data_dir}; "
            "a classifier needs at least 2 classes"
        )
    too_small = [f"{name!r} ({count})" for name, count in zip(result.classes, counts) if count < 2]
    if too_small:
        raise DataError(
            f"classes with fewer than 2 readable images cannot be split into train and "
            f"validation: {', '.join(too_small)}; add images or remove these folders"
        )
    if group_duplicates:
        _check_groups_per_class(result)


def _check_groups_per_class(result: ScanResult) -> None:
    groups_per_class: list[set[str]] = [set() for _ in result.classes]
    for path, label in result.samples:
        groups_per_class[label].add(result.group_of(path))
    single = [name for name, groups in zip(result.classes, groups_per_class) if len(groups) < 2]
    if single:
        raise DataError(
            f"all images of class {', '.join(map(repr, single))} are copies of one photo, so a split "
            "that keeps duplicates together cannot put any in validation; add different photos, "
            "or pass --no-group-duplicates"
        )
