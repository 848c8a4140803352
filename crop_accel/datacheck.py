"""The ``check-data`` command: scan a dataset and report what would hurt training.

It prints rich tables (images per class, unreadable and non-image files, extension
mismatches, image sizes, duplicates, label conflicts) and writes the same facts to
``data_report.json``, with every path relative to DATA_DIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from crop_accel.duplicates import DEFAULT_NEAR_DUPLICATE_THRESHOLD, HASH_BITS
from crop_accel.scan import DataError, ScanResult, display_path, scan_image_folder, validate_for_training

logger = logging.getLogger(__name__)

REPORT_FILE_NAME = "data_report.json"
_SUMMARY_LISTED_SKIPS = 5


def add_check_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``check-data`` options to ``parser``."""
    parser.add_argument("data_dir", help="ImageFolder to check: one subfolder of images per class.")
    parser.add_argument(
        "--output-dir", default="data_check",
        help="Folder for data_report.json and the scan cache (default: ./data_check).",
    )
    parser.add_argument(
        "--min-image-size", type=int, default=224,
        help="Report images whose shorter side is below this many pixels (default: 224).",
    )
    parser.add_argument(
        "--near-duplicate-threshold", type=int, default=DEFAULT_NEAR_DUPLICATE_THRESHOLD,
        help=f"Maximum Hamming distance, in bits out of {HASH_BITS}, between the difference hashes "
        f"of two near-duplicate images; -1 reports exact duplicates only (default: {DEFAULT_NEAR_DUPLICATE_THRESHOLD}).",
    )
    parser.add_argument(
        "--max-rows", type=int, default=50,
        help="Rows shown per table; data_report.json always lists everything; 0 shows all (default: 50).",
    )


def run_check_data(args: argparse.Namespace, console: Console) -> int:
    """Scan ``args.data_dir``, print the report tables and write data_report.json.

    Returns 0 when the folder can be used for training, 1 when it cannot (the reason is
    printed and stored in the report), and 2 when DATA_DIR is missing or not a folder.
    """
    if not -1 <= args.near_duplicate_threshold <= HASH_BITS:
        raise ValueError(
            f"--near-duplicate-threshold must be between -1 and {HASH_BITS}, got {args.near_duplicate_threshold}"
        )
    output_dir = Path(args.output_dir)
    try:
        result = scan_image_folder(
            args.data_dir, cache_dir=output_dir, min_image_size=args.min_image_size,
            near_duplicate_threshold=args.near_duplicate_threshold,
        )
    except DataError as error:
        console.print(Text(f"error: {error}", style="bold red"))
        return 2

    problem = None
    try:
        validate_for_training(result, group_duplicates=True)
    except DataError as error:
        problem = str(error)

    _print_tables(result, console, args.max_rows)
    report_path = output_dir / REPORT_FILE_NAME
    write_report(result, report_path, problem)
    if problem is not None:
        console.print(Text(f"Not ready for training: {problem}", style="bold red"))
    else:
        console.print(Text("Ready for training.", style="bold green"))
    console.print(Text(f"Report: {report_path}"))
    return 1 if problem is not None else 0


def print_scan_summary(result: ScanResult, console: Console) -> None:
    """Print a short summary of a scan for the start of training: counts, skips, duplicates."""
    counts = result.class_counts()
    console.print(Text(
        f"Data: {len(result.samples)} images in {len(result.classes)} classes "
        f"({min(counts, default=0)} to {max(counts, default=0)} per class) from {result.data_dir}; "
        f"{result.cached_count} of {result.cached_count + result.decoded_count} files from the scan cache."
    ))
    if result.skipped:
        listed = ", ".join(f"{display_path(path)} ({reason})" for path, reason in result.skipped[:_SUMMARY_LISTED_SKIPS])
        more = len(result.skipped) - _SUMMARY_LISTED_SKIPS
        suffix = f", and {more} more" if more > 0 else ""
        console.print(Text(f"Skipped files ({len(result.skipped)}): {listed}{suffix}.", style="yellow"))
    groups = result.group_members()
    in_groups = sum(len(members) for members in groups.values())
    console.print(Text(
        f"Duplicate groups: {len(groups)} ({in_groups} images, {len(result.duplicate_pairs)} pairs); "
        "crop-accel check-data DATA_DIR lists them."
    ))
    if result.conflicts:
        first = ", ".join(display_path(path) for path in result.conflicts[0])
        console.print(Text(
            f"Label conflicts (duplicate groups that span classes): {len(result.conflicts)}, e.g. {first}.",
            style="yellow",
        ))


def build_report(result: ScanResult, problem: str | None = None) -> dict:
    """Return the JSON-ready report of a scan; paths are relative to DATA_DIR and valid Unicode."""
    labels = {path: label for path, label in result.samples}
    shorter_sides = [min(info.width, info.height) for info in result.images()]
    return {
        "data_dir": display_path(str(result.data_dir)),
        "ready_for_training": problem is None,
        "problem": problem,
        "settings": {
            "min_image_size": result.min_image_size,
            "near_duplicate_threshold": result.near_duplicate_threshold,
            "hash": f"difference hash, {HASH_BITS} bits",
        },
        "counts": {
            "images": len(result.samples),
            "classes": len(result.classes),
            "skipped": len(result.skipped),
            "hidden_files_ignored": result.hidden_count,
            "duplicate_groups": len(result.group_members()),
            "conflicts": len(result.conflicts),
        },
        "classes": [{"name": name, "images": count} for name, count in zip(result.classes, result.class_counts())],
        "files_outside_class_folders": [display_path(name) for name in result.root_files],
        "skipped": [
            {"path": display_path(path), "kind": _skip_kind(result, path), "reason": reason}
            for path, reason in result.skipped
        ],
        "extension_mismatches": [
            {"path": display_path(info.path), "extension": info.extension, "format": info.format}
            for info in result.extension_mismatches()
        ],
        "shorter_side": _size_summary(shorter_sides),
        "small_images": [
            {"path": display_path(info.path), "width": info.width, "height": info.height}
            for info in result.small_images()
        ],
        "duplicate_pairs": [
            {
                "kind": pair.kind, "distance": pair.distance,
                "first": display_path(pair.first), "second": display_path(pair.second),
                "same_class": labels[pair.first] == labels[pair.second],
            }
            for pair in result.duplicate_pairs
        ],
        "conflicts": [
            [{"path": display_path(path), "class": result.classes[labels[path]]} for path in members]
            for members in result.conflicts
        ],
        "images": [
            {
                "path": display_path(info.path), "class": result.classes[labels[info.path]],
                "format": info.format, "width": info.width, "height": info.height, "frames": info.frames,
                "bytes": info.size_bytes, "sha256": info.sha256, "dhash": info.dhash,
                "group": display_path(result.group_of(info.path)),
            }
            for info in result.images()
        ],
    }


def write_report(result: ScanResult, path: Path, problem: str | None = None) -> None:
    """Write ``build_report(result)`` to ``path`` as UTF-8 JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(build_report(result, problem), handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def _skip_kind(result: ScanResult, path: str) -> str:
    info = result.files.get(path)
    return "non-image" if info is not None and info.is_non_image else "unreadable"


def _size_summary(sides: list[int]) -> dict | None:
    if not sides:
        return None
    return {"min": min(sides), "median": statistics.median(sides), "max": max(sides)}


def _print_tables(result: ScanResult, console: Console, max_rows: int) -> None:
    labels = {path: label for path, label in result.samples}
    console.print(Text(f"Checked {display_path(str(result.data_dir))}", style="bold"))

    per_class = _table("Images per class", "class", "images")
    for name, count in zip(result.classes, result.class_counts()):
        per_class.add_row(Text(name), Text(str(count), style="red" if count < 2 else ""))
    console.print(per_class)

    unreadable = [(path, reason) for path, reason in result.skipped if _skip_kind(result, path) == "unreadable"]
    non_image = [(path, reason) for path, reason in result.skipped if _skip_kind(result, path) == "non-image"]
    _print_rows(console, _table("Unreadable files (skipped)", "file", "error"), unreadable, max_rows)
    _print_rows(console, _table("Non-image files (skipped)", "file", "error"), non_image, max_rows)

    mismatches = [(info.path, info.extension or "(none)", info.format) for info in result.extension_mismatches()]
    _print_rows(console, _table("Extension does not match content", "file", "extension", "format"), mismatches, max_rows)

    sizes = _size_summary([min(info.width, info.height) for info in result.images()])
    if sizes is not None:
        console.print(Text(
            f"Shorter side: min {sizes['min']} px, median {sizes['median']:g} px, max {sizes['max']} px."
        ))
    small = [(info.path, f"{info.width}x{info.height}") for info in result.small_images()]
    title = f"Images with a shorter side below {result.min_image_size} px"
    _print_rows(console, _table(title, "file", "width x height"), small, max_rows)

    within = [p for p in result.duplicate_pairs if labels[p.first] == labels[p.second]]
    rows = [(p.first, display_path(p.second), p.kind, str(p.distance)) for p in within]
    _print_rows(console, _table("Duplicate pairs within a class", "file", "duplicate", "kind", "distance"), rows, max_rows)

    conflicts = _table("Label conflicts: copies of one photo in different classes", "group", "files (class)")
    for number, members in enumerate(result.conflicts[: max_rows or None], start=1):
        listed = ", ".join(f"{display_path(path)} ({result.classes[labels[path]]})" for path in members)
        conflicts.add_row(Text(str(number)), Text(listed))
    _print_table_or_none(console, conflicts, len(result.conflicts), max_rows)

    outside = ", ".join(display_path(name) for name in result.root_files[:5])
    console.print(Text(
        f"Images: {len(result.samples)}. Skipped: {len(result.skipped)}. Hidden files ignored: {result.hidden_count}. "
        f"Files outside class folders, ignored: {len(result.root_files)}" + (f" ({outside})." if outside else ".")
    ))


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    return table


def _print_rows(console: Console, table: Table, rows: list[tuple], max_rows: int) -> None:
    # The first cell of every row is a path, which may need its undecodable bytes escaped.
    for first, *rest in rows[: max_rows or None]:
        table.add_row(Text(display_path(first)), *(Text(str(cell)) for cell in rest))
    _print_table_or_none(console, table, len(rows), max_rows)


def _print_table_or_none(console: Console, table: Table, total: int, max_rows: int) -> None:
    if total == 0:
        console.print(Text(f"{table.title}: none"))
        return
    if max_rows and total > max_rows:
        table.caption = f"{max_rows} of {total} rows shown; data_report.json lists all"
    console.print(table)
