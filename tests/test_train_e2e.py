"""End-to-end training runs started the way users start them, as subprocesses."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from conftest import REPO_ROOT, make_image_folder, run_accelerate, tiny_train_args

TRAIN_SCRIPT = str(REPO_ROOT / "launch" / "train.py")


def run_script(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, TRAIN_SCRIPT, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    data_dir = make_image_folder(root / "data")
    output_dir = root / "out"
    result = run_script(tiny_train_args(data_dir, output_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return data_dir, output_dir, result


def test_training_beats_chance(trained_run):
    _, output_dir, _ = trained_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2
    assert metrics["best"]["val_acc"] >= 0.8  # three classes: chance is 0.33


def test_metrics_json_has_documented_keys(trained_run):
    _, output_dir, _ = trained_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    expected = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "train_images_per_second"}
    for row in metrics["epochs"]:
        assert expected <= set(row)
        assert row["train_images_per_second"] > 0
    assert set(metrics["best"]) >= {"epoch", "val_acc"}


def test_config_json_records_resolved_settings(trained_run):
    _, output_dir, _ = trained_run
    config = json.loads((output_dir / "config.json").read_text())
    assert config["num_processes"] == 1
    assert config["mixed_precision"] == "no"
    assert config["global_batch_size"] == 4
    assert config["data_config"]["input_size"] == [3, 32, 32]
    assert [group["divisor"] for group in config["param_groups"]] == [10, 8, 6, 4, 2, 1]
    assert config["param_groups"][-1]["lr"] == pytest.approx(3e-3)
    assert config["classes"] == ["blue_sky", "green_leaf", "red_soil"]
    assert config["channels_last"] is True
    assert config["num_workers"] == 0
    assert config["num_workers_requested"] == 0


def test_split_csv_lists_every_image(trained_run):
    _, output_dir, _ = trained_run
    with open(output_dir / "split.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 36
    assert {row["subset"] for row in rows} == {"train", "val"}
    for name in ("blue_sky", "green_leaf", "red_soil"):
        subsets = {row["subset"] for row in rows if row["class"] == name}
        assert subsets == {"train", "val"}


def test_saved_model_loads_with_plain_timm(trained_run):
    data_dir, output_dir, _ = trained_run
    meta = json.loads((output_dir / "model.json").read_text())
    assert meta["architecture"] == "resnet18"
    assert meta["class_names"] == ["blue_sky", "green_leaf", "red_soil"]
    model = timm.create_model(meta["architecture"], num_classes=len(meta["class_names"]))
    model.load_state_dict(safetensors.torch.load_file(output_dir / "model.safetensors"))
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_job_log_has_plain_progress_lines(trained_run):
    _, _, result = trained_run
    # stdout is a pipe here, as in a cluster job, so progress comes as log lines.
    assert "epoch 1/2 step" in result.stdout
    assert "\x1b[" not in result.stdout


def test_console_script_runs_train(tmp_path):
    script = Path(sys.executable).with_name("crop-accel")
    if not script.exists():
        pytest.skip(f"crop-accel console script not installed next to {sys.executable}")
    result = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--lr-divisors" in result.stdout


def test_missing_data_dir_is_clear_error(tmp_path):
    result = run_script(["--data-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out"), "--no-pretrained"])
    assert result.returncode == 2
    assert "nope not found" in result.stdout


def test_long_error_stays_on_one_line(tmp_path):
    # Job logs are not terminals: a message wider than the console must not be wrapped.
    missing = tmp_path / ("very_long_folder_name_" * 8) / "nope"
    result = run_script(["--data-dir", str(missing), "--output-dir", str(tmp_path / "out"), "--no-pretrained"])
    assert result.returncode == 2
    error_lines = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert f"{missing} not found" in error_lines[0]


def test_class_with_one_image_is_clear_error(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", num_classes=2, per_class=4)
    lonely = data_dir / "lonely"
    lonely.mkdir()
    (data_dir / "red_soil").mkdir(exist_ok=True)
    next((data_dir / "blue_sky").iterdir()).rename(lonely / "only.jpg")
    result = run_script(tiny_train_args(data_dir, tmp_path / "out"))
    assert result.returncode == 2
    assert "'lonely' (1)" in result.stdout
    assert "cannot be split" in result.stdout


@pytest.mark.ddp
def test_two_process_ddp_counts_each_val_image_once(tmp_path):
    # 3 classes x 13 images: 9 validation images do not fill equal batches on 2
    # processes, so accelerate pads, and gather_for_metrics must drop the padding.
    data_dir = make_image_folder(tmp_path / "data", per_class=13)
    output_dir = tmp_path / "out"
    result = run_accelerate([TRAIN_SCRIPT, *tiny_train_args(data_dir, output_dir, "--epochs", "1")])
    assert result.returncode == 0, result.stdout + result.stderr

    config = json.loads((output_dir / "config.json").read_text())
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert config["num_processes"] == 2
    assert config["global_batch_size"] == 8
    assert config["val_images"] == 9
    assert metrics["epochs"][0]["val_images"] == 9
    # Only the main process logs and prints the summary.
    assert result.stdout.count("Training resnet18 on 2 process(es) with 0 loader worker(s) each") == 1
    assert result.stdout.count("Training summary") == 1


def test_lr_auto_trains_with_suggestion(tmp_path, image_folder):
    output_dir = tmp_path / "out"
    args = tiny_train_args(image_folder, output_dir, "--epochs", "1", "--lr-find-steps", "12")
    args[args.index("--lr") + 1] = "auto"
    result = run_script(args)
    assert result.returncode == 0, result.stdout + result.stderr

    config = json.loads((output_dir / "config.json").read_text())
    assert config["lr_requested"] == "auto"
    assert config["lr"] == config["lr_finder"]["suggestion"]
    assert config["param_groups"][-1]["lr"] == pytest.approx(config["lr"])
    assert config["lr_finder"]["epoch_seconds"] > 0
    assert config["lr_finder"]["seconds"] > 0
    assert (output_dir / "lr_finder.png").stat().st_size > 0
    with open(output_dir / "lr_finder.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == config["lr_finder"]["num_steps_run"]
    assert "LR range test took" in result.stdout


@pytest.mark.ddp
def test_two_process_lr_auto_shares_suggestion(tmp_path, image_folder):
    output_dir = tmp_path / "out"
    args = tiny_train_args(image_folder, output_dir, "--epochs", "1", "--lr-find-steps", "10")
    args[args.index("--lr") + 1] = "auto"
    result = run_accelerate([TRAIN_SCRIPT, *args])
    assert result.returncode == 0, result.stdout + result.stderr

    config = json.loads((output_dir / "config.json").read_text())
    assert config["num_processes"] == 2
    # Training checks that every process holds the same lr before building the optimizer.
    assert config["lr"] == config["lr_finder"]["suggestion"]
    assert result.stdout.count("LR range test: head lr") == 1
    assert "suggested lr is not rescaled" in result.stdout
