"""Folder scan: per-file facts, pathological files, the cache and training validation."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crop_accel.images import ImageLoadError, load_rgb
from conftest import make_photo as make_conftest_photo
from crop_accel.scan import (
    CACHE_FILE_NAME,
    DataError,
    display_path,
    scan_image_folder,
    validate_for_training,
)


def make_photo(seed: int, colour=(60, 140, 50), size=(120, 90)) -> Image.Image:
    """Return a smooth random image around ``colour``, smaller than conftest's default."""
    return make_conftest_photo(seed, colour, size)

def make_folder(root: Path, classes=("maize", "rice"), per_class: int = 3) -> Path:
    for class_index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            make_photo(class_index * 100 + index).save(root / name / f"img{index}.jpg", quality=90)
    return root


def write_png_header(path: Path, width: int, height: int) -> None:
    """Write a PNG whose header declares ``width`` x ``height`` but that contains almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def skip_reason(result, path: str) -> str:
    reasons = dict(result.skipped)
    assert path in reasons, f"{path} not skipped; skipped: {result.skipped}"
    return reasons[path]


# Per-file facts


def test_scan_records_format_size_and_hashes(tmp_path):
    data = make_folder(tmp_path / "data")
    result = scan_image_folder(data)
    info = result.files["maize/img0.jpg"]
    assert info.format == "JPEG"
    assert (info.width, info.height) == (120, 90)
    assert info.sha256 == hashlib.sha256((data / "maize/img0.jpg").read_bytes()).hexdigest()
    assert len(info.dhash) == 16
    assert result.classes == ["maize", "rice"]
    assert result.class_counts() == [3, 3]
    assert result.samples[0] == ("maize/img0.jpg", 0)


def test_groups_cover_every_sample(tmp_path):
    data = make_folder(tmp_path / "data")
    result = scan_image_folder(data)
    assert set(result.groups) == {path for path, _ in result.samples}
    assert all(result.groups[path] == path for path, _ in result.samples)


def test_extension_mismatches_detected(tmp_path):
    data = make_folder(tmp_path / "data")
    folder = data / "maize"
    make_photo(1).save(folder / "webp.jpg", format="WEBP")
    make_photo(2).save(folder / "jpeg.png", format="JPEG")
    make_photo(3).save(folder / "noextension", format="PNG")
    make_photo(4).save(folder / "short.jpe", format="JPEG")
    make_photo(5).save(folder / "scan.tiff", format="TIFF")
    make_photo(6).save(folder / "long.JPEG", format="JPEG")
    make_photo(7).save(folder / "stereo.jpg", format="MPO", save_all=True, append_images=[make_photo(8)])

    result = scan_image_folder(data)

    mismatched = {info.path: info.format for info in result.extension_mismatches()}
    assert mismatched == {"maize/webp.jpg": "WEBP", "maize/jpeg.png": "JPEG", "maize/noextension": "PNG"}
    assert result.files["maize/stereo.jpg"].format == "MPO"
    assert result.files["maize/stereo.jpg"].frames == 2
    assert result.files["maize/scan.tiff"].format == "TIFF"


def test_non_image_files_skipped(tmp_path):
    data = make_folder(tmp_path / "data")
    (data / "maize" / "notes.txt").write_text("taken in June\n")
    (data / "maize" / "labels.csv").write_text("file,label\n")
    result = scan_image_folder(data)
    assert skip_reason(result, "maize/notes.txt") == "UnidentifiedImageError: cannot identify image file"
    assert sorted(result.non_image_files()) == ["maize/labels.csv", "maize/notes.txt"]
    assert len(result.samples) == 6


def test_small_images_marked_not_skipped(tmp_path):
    data = make_folder(tmp_path / "data")
    make_photo(9, size=(60, 300)).save(data / "rice" / "thin.png")
    result = scan_image_folder(data, min_image_size=100)
    assert [info.path for info in result.small_images()] == [
        "maize/img0.jpg", "maize/img1.jpg", "maize/img2.jpg",
        "rice/img0.jpg", "rice/img1.jpg", "rice/img2.jpg", "rice/thin.png",
    ]
    assert ("rice/thin.png", 1) in result.samples
    assert scan_image_folder(data, min_image_size=80).small_images()[0].path == "rice/thin.png"


def test_hidden_files_ignored_and_counted(tmp_path):
    data = make_folder(tmp_path / "data")
    (data / "maize" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    make_photo(10).save(data / "maize" / "._img0.jpg")
    (data / "rice" / ".ipynb_checkpoints").mkdir()
    make_photo(11).save(data / "rice" / ".ipynb_checkpoints" / "img0.jpg")
    result = scan_image_folder(data)
    assert result.hidden_count == 3
    assert result.skipped == []
    assert len(result.samples) == 6


def test_root_files_listed(tmp_path):
    data = make_folder(tmp_path / "data")
    (data / "README.md").write_text("crop photos\n")
    assert scan_image_folder(data).root_files == ["README.md"]


# Pathological files: none may stop the scan


def test_truncated_jpeg_skipped(tmp_path):
    data = make_folder(tmp_path / "data")
    make_photo(12, size=(400, 300)).save(data / "maize" / "cut.jpg", quality=95)
    content = (data / "maize" / "cut.jpg").read_bytes()
    (data / "maize" / "cut.jpg").write_bytes(content[: len(content) * 2 // 3])
    reason = skip_reason(scan_image_folder(data), "maize/cut.jpg")
    assert "truncated" in reason.lower()


def test_zero_byte_file_skipped(tmp_path):
    data = make_folder(tmp_path / "data")
    (data / "maize" / "empty.jpg").touch()
    result = scan_image_folder(data)
    assert "cannot identify image file" in skip_reason(result, "maize/empty.jpg")
    assert result.non_image_files() == []


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [20000, 10000])
def test_decompression_bomb_png_rejected_from_header(tmp_path, side):
    # 20000^2 is over twice Pillow's limit, which Image.open rejects itself. 10000^2 is
    # between the limit and twice it, where Pillow only warns and the scan must reject it.
    data = make_folder(tmp_path / "data")
    write_png_header(data / "maize" / "bomb.png", side, side)
    reason = skip_reason(scan_image_folder(data), "maize/bomb.png")
    assert "decompression bomb" in reason
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_rgb(data / "maize" / "bomb.png")


def test_16bit_png_and_cmyk_jpeg_decode(tmp_path):
    data = make_folder(tmp_path / "data")
    ramp = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)
    Image.fromarray(ramp).save(data / "maize" / "deep.png")
    make_photo(13).convert("CMYK").save(data / "rice" / "print.jpg", quality=90)
    result = scan_image_folder(data)
    assert ("maize/deep.png", 0) in result.samples
    assert ("rice/print.jpg", 1) in result.samples
    assert result.files["rice/print.jpg"].format == "JPEG"


def test_symlink_loops_do_not_hang(tmp_path):
    data = make_folder(tmp_path / "data")
    os.symlink(data / "maize", data / "maize" / "loop")
    os.symlink("self.jpg", data / "rice" / "self.jpg")
    result = scan_image_folder(data)
    assert "symbolic link to a folder" in skip_reason(result, "maize/loop")
    assert "Too many levels of symbolic links" in skip_reason(result, "rice/self.jpg")
    assert len(result.samples) == 6


def test_fifo_skipped_without_blocking(tmp_path):
    data = make_folder(tmp_path / "data")
    os.mkfifo(data / "maize" / "pipe.jpg")
    assert "not a regular file" in skip_reason(scan_image_folder(data), "maize/pipe.jpg")


def test_unreadable_file_skipped(tmp_path):
    # Root reads files whatever their mode, so as root the scan runs in a forked child
    # that has switched to the unprivileged user "nobody".
    data = make_folder(Path(tempfile.mkdtemp(prefix="crop_scan_")) / "data")
    try:
        (data / "maize" / "locked.jpg").write_bytes((data / "maize" / "img0.jpg").read_bytes())
        os.chmod(data / "maize" / "locked.jpg", 0)
        (data / "rice" / "closed").mkdir()
        make_photo(30).save(data / "rice" / "closed" / "img.jpg")
        os.chmod(data / "rice" / "closed", 0)
        if os.geteuid() == 0:
            for folder in (data.parent, data, data / "maize", data / "rice"):
                os.chmod(folder, 0o755)
            skipped = _scan_skipped_as_nobody(data)
        else:
            skipped = [list(entry) for entry in scan_image_folder(data).skipped]
    finally:
        os.chmod(data / "rice" / "closed", 0o755)
        shutil.rmtree(data.parent)
    assert skipped == [
        ["maize/locked.jpg", "PermissionError: Permission denied"],
        ["rice/closed", "PermissionError: Permission denied; the folder's files were not scanned"],
    ]


def _scan_skipped_as_nobody(data: Path) -> list:
    scan_image_folder(data)  # imports every module the child needs while still root
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        status = 1
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            payload = json.dumps([list(entry) for entry in scan_image_folder(data).skipped]).encode()
            os.write(write_end, payload)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        payload = stream.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the scan as user nobody failed"
    return json.loads(payload)


def test_non_utf8_name_survives(tmp_path):
    data = make_folder(tmp_path / "data")
    name = os.path.join(os.fsencode(data / "maize"), b"caf\xe9.jpg")
    descriptor = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(descriptor, (data / "rice" / "img0.jpg").read_bytes())
    os.close(descriptor)

    first = scan_image_folder(data, cache_dir=tmp_path / "out")
    second = scan_image_folder(data, cache_dir=tmp_path / "out")

    path = os.fsdecode(b"maize/caf\xe9.jpg")
    assert (path, 0) in first.samples
    assert display_path(path) == "maize/caf\\xe9.jpg"
    assert (path, 0) in second.samples
    assert second.decoded_count == 0
    assert first.conflicts == [["maize/caf\udce9.jpg", "rice/img0.jpg"]]


# Cache


def test_second_scan_reads_cache(tmp_path):
    data = make_folder(tmp_path / "data")
    (data / "maize" / "notes.txt").write_text("not an image\n")
    first = scan_image_folder(data, cache_dir=tmp_path / "out")
    second = scan_image_folder(data, cache_dir=tmp_path / "out")
    assert first.decoded_count == 7
    assert second.decoded_count == 0
    assert second.cached_count == 7
    assert second.files == first.files
    assert second.skipped == first.skipped
    assert (tmp_path / "out" / CACHE_FILE_NAME).is_file()


def test_cache_keyed_by_size_and_mtime(tmp_path):
    data = make_folder(tmp_path / "data")
    target = data / "maize" / "img1.jpg"
    scan_image_folder(data, cache_dir=tmp_path / "out")

    # Same size and modification time: the scan uses the cached record and does not decode the damaged file.
    before = target.stat()
    target.write_bytes(b"\0" * before.st_size)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    cached = scan_image_folder(data, cache_dir=tmp_path / "out")
    assert ("maize/img1.jpg", 0) in cached.samples
    assert cached.decoded_count == 0

    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    rescanned = scan_image_folder(data, cache_dir=tmp_path / "out")
    assert rescanned.decoded_count == 1
    assert "maize/img1.jpg" in dict(rescanned.skipped)


def test_cache_of_other_folder_ignored(tmp_path):
    first = make_folder(tmp_path / "first")
    second = make_folder(tmp_path / "second")
    scan_image_folder(first, cache_dir=tmp_path / "out")
    assert scan_image_folder(second, cache_dir=tmp_path / "out").decoded_count == 6


def test_corrupt_cache_ignored(tmp_path):
    data = make_folder(tmp_path / "data")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / CACHE_FILE_NAME).write_text("{not json")
    result = scan_image_folder(data, cache_dir=tmp_path / "out")
    assert result.decoded_count == 6
    assert json.loads((tmp_path / "out" / CACHE_FILE_NAME).read_text())["version"] == 1


# Validation before training


def test_missing_folder_raises(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_image_folder(tmp_path / "absent")


def test_empty_folder_raises(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        validate_for_training(scan_image_folder(tmp_path / "data"))


def test_images_without_class_folders_raise(tmp_path):
    (tmp_path / "data").mkdir()
    make_photo(0).save(tmp_path / "data" / "img0.jpg")
    with pytest.raises(DataError, match="contains 1 files but no class folders"):
        validate_for_training(scan_image_folder(tmp_path / "data"))


def test_class_with_one_image_raises(tmp_path):
    data = make_folder(tmp_path / "data")
    (data / "wheat").mkdir()
    make_photo(50).save(data / "wheat" / "only.jpg")
    with pytest.raises(DataError, match=r"cannot be split.*'wheat' \(1\)"):
        validate_for_training(scan_image_folder(data))


def test_single_class_raises(tmp_path):
    data = make_folder(tmp_path / "data", classes=("maize",))
    with pytest.raises(DataError, match="only one class folder \\('maize'\\)"):
        validate_for_training(scan_image_folder(data))


def test_class_of_copies_raises_when_grouped(tmp_path):
    data = make_folder(tmp_path / "data")
    (data / "wheat").mkdir()
    make_photo(60).save(data / "wheat" / "a.jpg", quality=95)
    make_photo(60).resize((60, 45)).save(data / "wheat" / "b.jpg", quality=70)
    result = scan_image_folder(data)
    validate_for_training(result)
    with pytest.raises(DataError, match="'wheat' are copies of one photo.*--no-group-duplicates"):
        validate_for_training(result, group_duplicates=True)
