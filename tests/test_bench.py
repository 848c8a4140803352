"""Tests of bench/throughput.py: a short run on generated images and its measurement windows."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import throughput
import timed_windows

from conftest import REPO_ROOT, make_image_folder

BENCH_SCRIPT = REPO_ROOT / "bench" / "throughput.py"
MEASUREMENTS = ("model_only", "train_loop", "evaluate", "lr_range_test", "loader_only")


def run_bench(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, str(BENCH_SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data_dir = make_image_folder(root / "data", num_classes=3, per_class=10, size=40)
    report_path = root / "out" / "report.json"
    result = run_bench([
        "--data-dir", str(data_dir),
        "--model", "mobilenetv3_small_050",
        "--no-pretrained",
        "--image-size", "32",
        "--batch-size", "4",
        "--cache-images",
        "--num-workers", "1",
        "--threads", "1",
        "--short",
        "--output", str(report_path),
    ])
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(report_path.read_text()), result.stdout


def test_report_records_machine(short_run):
    report, _ = short_run
    machine = report["machine"]
    for key in ("cpu_model", "cpu_cores", "torch_threads", "torch_version", "load_average_before"):
        assert key in machine
    assert machine["cpu_model"]
    assert machine["cpu_cores"] >= 1
    assert machine["torch_threads"] == 1
    assert machine["device"] == "cpu"


def test_report_records_settings(short_run):
    report, _ = short_run
    settings = report["settings"]
    assert settings["model"] == "mobilenetv3_small_050"
    assert settings["image_size"] == 32
    assert settings["batch_size"] == 4
    assert settings["cache_images"] is True
    assert settings["num_workers"] == 1
    assert settings["torch_threads"] == 1
    assert (settings["steps"], settings["repeats"], settings["warmup"]) == (4, 3, 1)
    assert report["data"]["train_images"] > 0
    assert report["data"]["cache_fill_seconds"] is not None


def test_every_measurement_positive(short_run):
    report, _ = short_run
    assert set(report["measurements"]) == set(MEASUREMENTS)
    for name in MEASUREMENTS:
        measurement = report["measurements"][name]
        repeats = measurement["repeats_images_per_second"]
        assert len(repeats) == 3, name
        assert all(value > 0 for value in repeats), name
        assert measurement["images_per_second"] == pytest.approx(statistics.median(repeats)), name


def test_ratio_within_bounds(short_run):
    report, _ = short_run
    assert [key for key in report if "ratio" in key] == ["ratio_train_loop_to_model_only"]
    ratio = report["ratio_train_loop_to_model_only"]
    measurements = report["measurements"]
    pairs = zip(measurements["train_loop"]["repeats_images_per_second"], measurements["model_only"]["repeats_images_per_second"])
    expected = [loop / model for loop, model in pairs]
    assert measurements["train_loop"]["repeats_ratio_to_model_only"] == pytest.approx(expected)
    assert ratio == pytest.approx(statistics.median(expected))
    assert 0 < ratio < 1.5


def test_table_printed(short_run):
    _, stdout = short_run
    assert "images/s (median)" in stdout
    assert "training loop / model only:" in stdout
    assert "LR range test" in stdout
    assert "data loader alone" in stdout


def test_missing_data_dir_rejected(tmp_path):
    missing = tmp_path / "missing"
    result = run_bench(["--data-dir", str(missing), "--model", "resnet18", "--no-pretrained", "--short"])
    assert result.returncode == 2
    assert f"--data-dir {missing} is not a folder" in result.stdout


def test_window_rates_skip_warmup():
    sizes = timed_windows.Sizes(steps=2, repeats=2, warmup=1)
    # Batch end times in seconds, 4 images each: the warm-up batch ends at 10.0, so the
    # first window lasts 10.0 -> 11.0 and the second 11.0 -> 13.0.
    stamps = [(10.0, 4), (10.5, 4), (11.0, 4), (12.0, 4), (13.0, 4)]
    assert timed_windows.window_rates(stamps, timed_windows.sequential_windows(sizes)) == [8.0, 4.0]


def test_window_rates_reject_short_run():
    windows = timed_windows.sequential_windows(timed_windows.Sizes(steps=2, repeats=2, warmup=1))
    with pytest.raises(RuntimeError, match="only 4 of the 5 batches"):
        timed_windows.window_rates([(1.0, 4)] * 4, windows)


def test_interleaved_schedule_alternates_order():
    sources, windows = timed_windows.interleaved_schedule(timed_windows.Sizes(steps=2, repeats=3, warmup=3), switch_batches=1)
    expected = (
        ["model_only"] * 5 + ["train_loop"] * 5  # first repeat: 3 warm-up batches, then 2 timed
        + ["train_loop"] * 3 + ["model_only"] * 3  # later repeats: 1 switch batch, then 2 timed
        + ["model_only"] * 3 + ["train_loop"] * 3
    )
    assert sources == expected
    assert windows["model_only"] == [range(3, 5), range(14, 16), range(17, 19)]
    assert windows["train_loop"] == [range(8, 10), range(11, 13), range(20, 22)]
    for name, name_windows in windows.items():
        for window in name_windows:
            assert all(sources[index] == name for index in window), (name, window)


def test_interleaved_schedule_without_workers():
    sources, windows = timed_windows.interleaved_schedule(timed_windows.Sizes(steps=2, repeats=2, warmup=1), switch_batches=0)
    assert len(sources) == 2 * 1 + 4 * 2
    assert windows["model_only"] == [range(1, 3), range(8, 10)]
    assert windows["train_loop"] == [range(4, 6), range(6, 8)]


def test_short_mode_sizes():
    parser = throughput.build_parser()
    short = throughput.resolve_sizes(parser.parse_args(["--data-dir", "x", "--short"]))
    assert (short.steps, short.repeats, short.warmup) == throughput.SHORT_SIZES
    explicit = throughput.resolve_sizes(parser.parse_args(["--data-dir", "x", "--short", "--repeats", "5"]))
    assert explicit.repeats == 5
    assert explicit.steps == throughput.SHORT_SIZES[0]
    default = throughput.resolve_sizes(parser.parse_args(["--data-dir", "x"]))
    assert (default.steps, default.repeats, default.warmup) == throughput.DEFAULT_SIZES
