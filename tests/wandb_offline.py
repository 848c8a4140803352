"""Read back what an offline W&B run stored, without a W&B server.

wandb 0.31 writes each run as a ``run-<id>.wandb`` file in the LevelDB log format:
a 7-byte file header (``:W&B``, magic 0xBEE1 little-endian, version 0), then 32 KiB
blocks of chunks. Each chunk has a 7-byte header (CRC-32 of type byte and data, data
length, type) and chunks of type FIRST, MIDDLE and LAST join into one record. Every
record is a serialised ``wandb.proto.wandb_internal_pb2.Record``. The format was checked
against files written by wandb 0.31.0.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wandb
from wandb.proto import wandb_internal_pb2

FILE_HEADER = struct.Struct("<4sHB")
FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class MediaEntry:
    """Media logged under ``key`` at ``step``: files relative to the run's ``files`` folder."""

    step: int
    key: str
    type: str
    files: list[str]
    captions: list[str]


def flush_offline_runs() -> None:
    """Shut down this process's wandb service so every finished run is on disk.

    In wandb 0.31, ``run.finish()`` in offline mode can return before the ``.wandb``
    file is written. In 5 of 18 tries on a 2-core CPU machine the file then held only
    its 7-byte header. ``wandb.teardown()`` waits for the service, and it also makes
    wandb read its environment variables again at the next ``wandb.init``.
    """
    wandb.teardown()


def find_offline_runs(wandb_dir: str | Path) -> list[Path]:
    """List the offline run folders under ``wandb_dir`` (WANDB_DIR or its ``wandb`` folder), oldest first."""
    wandb_dir = Path(wandb_dir)
    if (wandb_dir / "wandb").is_dir():
        wandb_dir = wandb_dir / "wandb"
    runs = [
        path
        for path in wandb_dir.glob("offline-run-*")
        if path.is_dir() and not path.is_symlink() and any(path.glob("run-*.wandb"))
    ]
    return sorted(runs, key=lambda path: path.name)


def iter_records(run_dir: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    """Yield every complete record of the run's ``.wandb`` file, checking each chunk's CRC.

    A truncated last record, as left by a killed process, ends the iteration.
    """
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    data = wandb_file.read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC or version != 0:
        raise ValueError(f"{wandb_file} is not a W&B transaction log (header {ident!r}, {magic:#x}, {version})")

    position = FILE_HEADER.size
    pending = b""
    while position + CHUNK_HEADER.size <= len(data):
        block_left = BLOCK_SIZE - position % BLOCK_SIZE
        if block_left < CHUNK_HEADER.size:
            position += block_left  # the writer pads a block tail too short for a header
            continue
        checksum, length, kind = CHUNK_HEADER.unpack_from(data, position)
        if length == 0 and kind == 0:
            position += block_left
            continue
        start = position + CHUNK_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length:
            return
        if zlib.crc32(bytes([kind]) + chunk) != checksum:
            raise ValueError(f"{wandb_file}: CRC mismatch in the chunk at byte {position}")
        position = start + length

        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_run(run_dir: str | Path) -> wandb_internal_pb2.RunRecord:
    """Return the run record: id, project, display name, tags and whether it was resumed."""
    runs = [record.run for record in iter_records(run_dir) if record.WhichOneof("record_type") == "run"]
    return runs[0]


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Return one dict per logged step, with nested keys (such as media fields) as nested dicts."""
    rows = []
    for record in iter_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(_merge_items(record.history.item))
    return rows


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """Return the run config after all updates, including wandb's own ``_wandb`` entry.

    The config given to ``wandb.init`` is stored in the run record, and later
    ``config.update`` calls, such as accelerate's, in config records.
    """
    config: dict[str, Any] = {}
    for record in iter_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _merge_into(config, record.run.config.update)
        elif kind == "config":
            _merge_into(config, record.config.update)
    return config


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """Return the run summary after all updates."""
    summary: dict[str, Any] = {}
    for record in iter_records(run_dir):
        if record.WhichOneof("record_type") == "summary":
            _merge_into(summary, record.summary.update)
    return summary


def read_artifacts(run_dir: str | Path) -> list[dict[str, Any]]:
    """Return the logged artifacts with name, type, aliases and the paths in their manifest."""
    artifacts = []
    for record in iter_records(run_dir):
        if record.WhichOneof("record_type") == "artifact":
            artifact = record.artifact
            artifacts.append({
                "name": artifact.name,
                "type": artifact.type,
                "aliases": list(artifact.aliases),
                "paths": sorted(entry.path for entry in artifact.manifest.contents),
            })
    return artifacts


def read_media(run_dir: str | Path) -> list[MediaEntry]:
    """Return every image, image list and table logged in the history, in logging order."""
    entries = []
    for row in read_history(run_dir):
        for key, value in row.items():
            if not isinstance(value, dict) or "_type" not in value:
                continue
            kind = value["_type"]
            if kind == "images/separated":
                files, captions = value["filenames"], value.get("captions", [])
            elif "path" in value:
                files, captions = [value["path"]], [value["caption"]] if "caption" in value else []
            else:
                continue
            entries.append(MediaEntry(step=row["_step"], key=key, type=kind, files=files, captions=captions))
    return entries


def read_table(run_dir: str | Path, entry: MediaEntry) -> dict[str, Any]:
    """Return the ``columns`` and ``data`` of a logged table entry."""
    return json.loads((Path(run_dir) / "files" / entry.files[0]).read_text(encoding="utf-8"))


def _merge_items(items) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    _merge_into(merged, items)
    return merged


def _merge_into(target: dict[str, Any], items) -> None:
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
