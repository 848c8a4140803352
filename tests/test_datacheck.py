"""The check-data command on a generated messy folder and, when present, on real crop photos."""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from crop_accel.datacheck import REPORT_FILE_NAME, add_check_data_arguments, print_scan_summary, run_check_data
from crop_accel.scan import scan_image_folder

REAL_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "agricultural_crops"


def make_photo(seed: int, colour=(60, 140, 50), size=(240, 180)) -> Image.Image:
    """Return a smooth random image around ``colour``."""
    rng = np.random.default_rng(seed)
    coarse = np.clip(np.array(colour) + rng.normal(0, 50, (6, 9, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def make_messy_folder(root: Path) -> Path:
    """Create three classes with the problems check-data reports, one of each kind."""
    for index, name in enumerate(("maize", "rice", "wheat")):
        (root / name).mkdir(parents=True)
        for number in range(4):
            make_photo(index * 10 + number).save(root / name / f"img{number}.jpg", quality=90)

    maize = root / "maize"
    (maize / "img0_copy.jpg").write_bytes((maize / "img0.jpg").read_bytes())
    make_photo(1).save(maize / "img1_q40.jpeg", quality=40)
    make_photo(2).resize((120, 90)).save(maize / "img2_half.jpg", quality=85)
    make_photo(3).save(root / "rice" / "from_maize.jpg", quality=70)
    make_photo(78).save(root / "rice" / "webp.jpg", format="WEBP")
    make_photo(77, size=(100, 60)).save(root / "wheat" / "tiny.png")
    (root / "wheat" / "notes.txt").write_text("harvest 2023\n")
    content = (root / "wheat" / "img0.jpg").read_bytes()
    (root / "wheat" / "cut.jpg").write_bytes(content[: len(content) // 2])
    (root / "wheat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    descriptor = os.open(os.path.join(os.fsencode(root / "wheat"), b"caf\xe9.jpg"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(descriptor, (root / "wheat" / "img1.jpg").read_bytes())
    os.close(descriptor)
    return root


def check_data(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_check_data_arguments(parser)
    args = parser.parse_args(list(argv))
    stream = io.StringIO()
    code = run_check_data(args, Console(file=stream, width=220))
    return code, stream.getvalue()


@pytest.fixture
def messy_report(tmp_path):
    data = make_messy_folder(tmp_path / "data")
    code, output = check_data(str(data), "--output-dir", str(tmp_path / "out"), "--min-image-size", "120")
    report_bytes = (tmp_path / "out" / REPORT_FILE_NAME).read_bytes()
    return code, output, json.loads(report_bytes.decode("utf-8")), report_bytes


def test_defaults_parse():
    parser = argparse.ArgumentParser()
    add_check_data_arguments(parser)
    args = parser.parse_args(["photos"])
    assert args.output_dir == "data_check"
    assert args.min_image_size == 224
    assert args.near_duplicate_threshold == 10


def test_messy_folder_is_still_trainable(messy_report):
    code, output, report, _ = messy_report
    assert code == 0
    assert report["ready_for_training"] is True
    assert "Ready for training." in output
    assert report["counts"]["images"] == 19
    assert report["counts"]["hidden_files_ignored"] == 1
    assert report["classes"] == [
        {"name": "maize", "images": 7}, {"name": "rice", "images": 6}, {"name": "wheat", "images": 6},
    ]


def test_report_lists_skipped_files(messy_report):
    _, output, report, _ = messy_report
    skipped = {entry["path"]: entry for entry in report["skipped"]}
    assert set(skipped) == {"wheat/cut.jpg", "wheat/notes.txt"}
    assert skipped["wheat/notes.txt"]["kind"] == "non-image"
    assert skipped["wheat/cut.jpg"]["kind"] == "unreadable"
    assert skipped["wheat/cut.jpg"]["reason"] in output
    assert "Non-image files (skipped)" in output


def test_report_lists_mismatch_and_small(messy_report):
    _, output, report, _ = messy_report
    assert report["extension_mismatches"] == [{"path": "rice/webp.jpg", "extension": ".jpg", "format": "WEBP"}]
    assert report["small_images"] == [
        {"path": "maize/img2_half.jpg", "width": 120, "height": 90},
        {"path": "wheat/tiny.png", "width": 100, "height": 60},
    ]
    assert report["shorter_side"] == {"min": 60, "median": 180, "max": 180}
    assert "Shorter side: min 60 px, median 180 px, max 180 px." in output


def test_report_lists_duplicates(messy_report):
    _, output, report, _ = messy_report
    pairs = {(pair["first"], pair["second"]): pair for pair in report["duplicate_pairs"]}
    assert pairs[("maize/img0.jpg", "maize/img0_copy.jpg")]["kind"] == "exact"
    assert pairs[("maize/img1.jpg", "maize/img1_q40.jpeg")]["kind"] == "near"
    assert pairs[("maize/img2.jpg", "maize/img2_half.jpg")]["kind"] == "near"
    assert pairs[("maize/img3.jpg", "rice/from_maize.jpg")]["same_class"] is False
    groups = {image["path"]: image["group"] for image in report["images"]}
    assert groups["maize/img1_q40.jpeg"] == groups["maize/img1.jpg"]
    assert groups["maize/img2.jpg"] != groups["maize/img1.jpg"]
    assert "maize/img1_q40.jpeg" in output


def test_report_lists_conflicts(messy_report):
    _, output, report, _ = messy_report
    assert report["conflicts"] == [
        [{"path": "maize/img3.jpg", "class": "maize"}, {"path": "rice/from_maize.jpg", "class": "rice"}],
    ]
    assert "maize/img3.jpg (maize), rice/from_maize.jpg (rice)" in output


def test_undecodable_name_in_report(messy_report):
    _, output, report, report_bytes = messy_report
    report_bytes.decode("utf-8", errors="strict")
    paths = [image["path"] for image in report["images"]]
    assert "wheat/caf\\xe9.jpg" in paths
    assert "wheat/caf\\xe9.jpg" in output


def test_one_image_class_exits_1(tmp_path):
    data = make_messy_folder(tmp_path / "data")
    (data / "tea").mkdir()
    make_photo(99).save(data / "tea" / "only.jpg")
    code, output = check_data(str(data), "--output-dir", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / REPORT_FILE_NAME).read_text())
    assert code == 1
    assert report["ready_for_training"] is False
    assert "'tea' (1)" in report["problem"]
    assert "Not ready for training" in output


def test_missing_folder_exits_2(tmp_path):
    code, output = check_data(str(tmp_path / "absent"), "--output-dir", str(tmp_path / "out"))
    assert code == 2
    assert "not found" in output


def test_invalid_threshold_raises(tmp_path):
    with pytest.raises(ValueError, match="--near-duplicate-threshold must be between -1 and 64, got 65"):
        check_data(str(tmp_path), "--near-duplicate-threshold", "65")


def test_max_rows_caps_tables(tmp_path):
    data = make_messy_folder(tmp_path / "data")
    code, output = check_data(str(data), "--output-dir", str(tmp_path / "out"), "--max-rows", "1")
    report = json.loads((tmp_path / "out" / REPORT_FILE_NAME).read_text())
    assert code == 0
    assert "1 of 4 rows shown; data_report.json lists all" in output
    assert len(report["duplicate_pairs"]) == 5


def test_scan_summary_is_short(tmp_path):
    data = make_messy_folder(tmp_path / "data")
    stream = io.StringIO()
    print_scan_summary(scan_image_folder(data), Console(file=stream, width=400))
    lines = stream.getvalue().splitlines()
    assert 3 <= len(lines) <= 6
    assert lines[0].startswith("Data: 19 images in 3 classes (6 to 7 per class)")
    assert lines[1].startswith("Skipped files (2): wheat/cut.jpg (")
    assert "wheat/notes.txt" in lines[1]
    assert lines[2].startswith("Duplicate groups: 5 (10 images, 5 pairs)")
    assert lines[3] == (
        "Label conflicts (duplicate groups that span classes): 1, e.g. maize/img3.jpg, rice/from_maize.jpg."
    )


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA_DIR.is_dir(), reason=f"real crop photos not found at {REAL_DATA_DIR}")
def test_real_crop_photos(tmp_path):
    code, _ = check_data(str(REAL_DATA_DIR), "--output-dir", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / REPORT_FILE_NAME).read_text())

    assert code == 0
    assert report["counts"]["images"] == 829
    assert report["counts"]["classes"] == 30
    mismatches = [(entry["extension"], entry["format"]) for entry in report["extension_mismatches"]]
    assert mismatches.count((".jpg", "WEBP")) == 8
    assert mismatches.count((".png", "JPEG")) == 2
    assert len(mismatches) == 10
    assert [image["format"] for image in report["images"]].count("MPO") == 1
    within_class = [pair for pair in report["duplicate_pairs"] if pair["same_class"]]
    assert len(within_class) >= 50
    assert report["conflicts"] == []
    assert report["files_outside_class_folders"] == ["SOURCE.md"]

    cached = scan_image_folder(REAL_DATA_DIR, cache_dir=tmp_path / "out")
    assert cached.decoded_count == 0
