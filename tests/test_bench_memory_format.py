"""Tests of bench/memory_format.py: a short interleaved comparison and its report."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "memory_format.py"


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def short_report(tmp_path_factory):
    output = tmp_path_factory.mktemp("memory_format") / "report.json"
    result = run_script([
        "--model", "resnet18", "--image-size", "32", "--batch-size", "4",
        "--rounds", "3", "--steps", "1", "--threads", "1", "--output", str(output),
    ])
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(output.read_text()), result.stdout


def test_every_round_measured(short_report):
    report, _ = short_report
    for name in ("contiguous", "channels_last"):
        rounds = report["repeats_images_per_second"][name]
        assert len(rounds) == 3, name
        assert all(value > 0 for value in rounds), name
        assert report["images_per_second"][name] == pytest.approx(statistics.median(rounds)), name


def test_ratio_per_round(short_report):
    report, _ = short_report
    rates = report["repeats_images_per_second"]
    expected = [last / contiguous for last, contiguous in zip(rates["channels_last"], rates["contiguous"])]
    assert report["repeats_ratio_channels_last_to_contiguous"] == pytest.approx(expected)
    assert report["ratio_channels_last_to_contiguous"] == pytest.approx(statistics.median(expected))


def test_settings_recorded(short_report):
    report, stdout = short_report
    assert report["settings"]["model"] == "resnet18"
    assert report["settings"]["torch_threads"] == 1
    assert report["machine"]["cpu_cores"] >= 1
    assert "channels_last / contiguous:" in stdout


def test_unknown_model_rejected():
    result = run_script(["--model", "resnet_does_not_exist", "--rounds", "1", "--steps", "1"])
    assert result.returncode == 2
    assert "resnet_does_not_exist" in result.stdout
