"""Per-file facts of a scanned folder (format, size, hashes) and their on-disk cache.

Each file is read and decoded once. The results are cached in a JSON file keyed by
(relative path, size, mtime_ns), so a second scan of an unchanged folder decodes
nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from crop_accel.duplicates import difference_hash
from crop_accel.images import ImageLoadError, load_rgb

logger = logging.getLogger(__name__)

CACHE_FILE_NAME = "scan_cache.json"


# Bump when FileInfo or the hash changes, so old caches are ignored instead of misread.
CACHE_VERSION = 1


# Shorter side of the decoded image that the perceptual hash is computed from, so large
# JPEGs are decoded at 1/2 to 1/8 scale (DCT scaling). At 64 px, the scaled decode moved a
# photo's hash up to 6 bits away from that of its PNG re-save. At 256 px it moved 2 at most.
HASH_DECODE_SIDE = 256


# Pillow names a multi-picture JPEG "MPO", but its first frame is a plain JPEG.
_EQUIVALENT_FORMATS = {"MPO": "JPEG"}


_DECODE_ERRORS = (OSError, UnidentifiedImageError, ImageLoadError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class FileInfo:
    """One file under a class folder: its bytes, its format from content and its hashes.

    ``error`` is set when the file could not be read or decoded, and then only ``path``
    and ``size_bytes`` are meaningful. ``width`` and ``height`` are the stored size,
    before EXIF rotation. ``dhash`` is the 64-bit difference hash in hexadecimal.
    """

    path: str
    size_bytes: int
    sha256: str = ""
    format: str | None = None
    width: int = 0
    height: int = 0
    frames: int = 1
    dhash: str = ""
    error: str | None = None

    @property
    def extension(self) -> str:
        return os.path.splitext(self.path)[1].lower()

    @property
    def extension_format(self) -> str | None:
        """Pillow's format for the file name's extension, e.g. "JPEG" for .jpe; None if unknown."""
        return Image.registered_extensions().get(self.extension)

    @property
    def extension_mismatch(self) -> bool:
        """True for a decoded image whose extension names another format (or none)."""
        if self.error is not None:
            return False
        expected = _EQUIVALENT_FORMATS.get(self.extension_format, self.extension_format)
        return _EQUIVALENT_FORMATS.get(self.format, self.format) != expected

    @property
    def is_non_image(self) -> bool:
        """True for an undecodable file without an image extension, such as notes.txt."""
        return self.error is not None and self.extension_format is None


def inspect_file(path: Path, relative: str) -> FileInfo:
    """Hash and decode one file; any read or decode failure is returned in ``error``."""
    try:
        file_stat = os.stat(path)
    except OSError as error:
        return FileInfo(relative, 0, error=_describe_error(error, path))
    if not stat.S_ISREG(file_stat.st_mode):
        # Opening a FIFO would block the scan until something writes to it.
        return FileInfo(relative, 0, error="not a regular file (a FIFO, socket or device); remove it")

    try:
        digest = _sha256_of(path)
        with Image.open(path) as image:
            image_format, (width, height) = image.format, image.size
            frames = getattr(image, "n_frames", 1)
        # load_rgb rejects a decompression bomb from its header, before decoding any pixel.
        dhash = difference_hash(load_rgb(path, min_side=HASH_DECODE_SIDE))
    except _DECODE_ERRORS as error:
        return FileInfo(relative, file_stat.st_size, error=_describe_error(error, path))
    return FileInfo(relative, file_stat.st_size, digest, image_format, width, height, frames, dhash)


def inspect_files(data_dir: Path, entries: list[tuple[str, int, Path]], cache_path: Path | None) -> tuple[dict[str, FileInfo], int]:
    cache = _load_cache(cache_path, data_dir) if cache_path is not None else {}
    infos: dict[str, FileInfo] = {}
    keys: dict[str, list[int]] = {}
    to_decode: list[tuple[str, Path]] = []
    for relative, _, path in entries:
        keys[relative] = _cache_key(path)
        cached = _cached_info(cache.get(relative), keys[relative])
        if cached is not None:
            infos[relative] = cached
        else:
            to_decode.append((relative, path))

    # Pillow's decoders and hashlib release the GIL, so threads decode files in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for info in pool.map(lambda item: inspect_file(item[1], item[0]), to_decode):
            infos[info.path] = info

    if cache_path is not None and to_decode:
        _save_cache(cache_path, data_dir, {path: {"key": keys[path], "info": asdict(info)} for path, info in infos.items()})
    return infos, len(to_decode)


def _cached_info(entry, key: list[int]) -> FileInfo | None:
    # A hand-edited or foreign cache entry counts as a miss instead of stopping the scan.
    try:
        return FileInfo(**entry["info"]) if entry["key"] == key else None
    except (TypeError, KeyError):
        return None


def _cache_key(path: Path) -> list[int]:
    try:
        file_stat = os.stat(path)
    except OSError:
        return [-1, -1]
    return [file_stat.st_size, file_stat.st_mtime_ns]


def _load_cache(cache_path: Path, data_dir: Path) -> dict:
    try:
        with open(cache_path, encoding="ascii") as handle:
            content = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning("Ignoring the scan cache %s because it cannot be read (%s); all files are decoded again", cache_path, error)
        return {}
    if not isinstance(content, dict) or content.get("version") != CACHE_VERSION:
        return {}
    if content.get("data_dir") != os.path.abspath(data_dir) or not isinstance(content.get("files"), dict):
        return {}
    return content["files"]


def _save_cache(cache_path: Path, data_dir: Path, files: dict) -> None:
    # ensure_ascii escapes the surrogates of undecodable file names, and json.load restores them.
    content = {"version": CACHE_VERSION, "data_dir": os.path.abspath(data_dir), "files": files}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name and an atomic rename keep the cache whole when two processes write it.
        temporary = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "w", encoding="ascii") as stream:
                json.dump(content, stream, ensure_ascii=True)
            os.replace(temporary, cache_path)
        finally:
            if temporary.exists():
                temporary.unlink()
    except OSError as error:
        logger.warning("Cannot write the scan cache %s (%s); the next scan decodes every file again", cache_path, error)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe_error(error: BaseException, path: Path) -> str:
    # Reports list paths relative to DATA_DIR, so the absolute path that Pillow puts into
    # some messages ("cannot identify image file '/data/x.txt'") is left out.
    if isinstance(error, ImageLoadError):
        return error.reason
    if isinstance(error, OSError) and error.strerror:
        return f"{type(error).__name__}: {error.strerror}"
    message = str(error).replace(f" {str(path)!r}", "").replace(f" {str(path)}", "")
    return f"{type(error).__name__}: {message}"
