"""A training run reports to files and to an offline W&B run, read back after it ends."""

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, make_image_folder, run_accelerate, tiny_train_args
from test_train_e2e import TRAIN_SCRIPT
from wandb_offline import find_offline_runs, read_config, read_history, read_media, read_table


def run_with_wandb(args, wandb_env):
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(wandb_env)
    return subprocess.run(
        [sys.executable, TRAIN_SCRIPT, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb")
    # Four classes with few epochs leave some validation errors for the gallery.
    data_dir = make_image_folder(root / "data", num_classes=4, per_class=10)
    output_dir = root / "run"
    wandb_dir = root / "wandb_dir"
    wandb_dir.mkdir()
    args = tiny_train_args(data_dir, output_dir, "--epochs", "2", "--lr", "1e-4", "--log-model")
    result = run_with_wandb(args, {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)})
    assert result.returncode == 0, result.stdout + result.stderr
    runs = find_offline_runs(wandb_dir)
    assert len(runs) == 1
    return output_dir, runs[0], result


def test_history_has_epoch_metrics(offline_run):
    _, run_dir, _ = offline_run
    rows = [row for row in read_history(run_dir) if "epoch/val_acc" in row]
    assert [row["epoch/epoch"] for row in rows] == [1, 2]
    for row in rows:
        for key in ("epoch/train_loss", "epoch/train_acc", "epoch/val_loss", "epoch/val_acc"):
            assert key in row, key


def test_history_has_step_loss_and_group_lrs(offline_run):
    output_dir, run_dir, _ = offline_run
    config = json.loads((output_dir / "config.json").read_text())
    steps = [row for row in read_history(run_dir) if "train/loss_step" in row]
    assert len(steps) == 2 * (config["train_images"] // 4)
    lr_keys = [key for key in steps[0] if key.startswith("lr/")]
    assert len(lr_keys) == 6
    assert "lr/5:fc" in lr_keys


def test_confusion_matrix_table_matches_csv(offline_run):
    output_dir, run_dir, _ = offline_run
    entries = [entry for entry in read_media(run_dir) if entry.key == "val/confusion_matrix_table"]
    assert entries
    table = read_table(run_dir, entries[-1])
    assert table["columns"][:2] == ["Actual", "Predicted"]

    with open(output_dir / "confusion_matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    counts = np.array([[int(value) for value in row[1:]] for row in rows[1:]])
    logged_total = sum(row[2] for row in table["data"])
    assert logged_total == counts.sum()


def test_gallery_images_have_captions(offline_run):
    output_dir, run_dir, _ = offline_run
    galleries = [entry for entry in read_media(run_dir) if entry.key == "val/worst_errors"]
    with open(output_dir / "worst_errors.csv", newline="") as handle:
        errors = list(csv.DictReader(handle))
    if not errors:
        pytest.fail("the run made no validation errors, so the gallery test checks nothing; lower --lr")
    assert galleries
    captions = galleries[-1].captions
    assert len(captions) == len(errors)
    assert all(caption.startswith("true: ") and " / pred: " in caption for caption in captions)


def test_config_is_logged(offline_run):
    _, run_dir, _ = offline_run
    config = read_config(run_dir)
    assert config["model"] == "resnet18"
    assert config["global_batch_size"] == 4


def test_analysis_files_agree_with_metrics(offline_run):
    output_dir, _, _ = offline_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    with open(output_dir / "confusion_matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    counts = np.array([[int(value) for value in row[1:]] for row in rows[1:]])
    assert np.trace(counts) / counts.sum() == pytest.approx(metrics["best"]["val_acc"])
    with open(output_dir / "per_class.csv", newline="") as handle:
        per_class = list(csv.DictReader(handle))
    assert [row["class"] for row in per_class] == rows[0][1:]
    for name in ("confusion_matrix.png", "training_curves.png"):
        assert (output_dir / name).stat().st_size > 0


def test_console_prints_per_class_table(offline_run):
    _, _, result = offline_run
    assert "Per-class scores" in result.stdout
    assert "wandb sync" in result.stdout


def test_wandb_start_failure_still_trains(tmp_path, image_folder):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    env = {
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port}",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_INIT_TIMEOUT": "3",
        "WANDB_DIR": str(tmp_path),
    }
    output_dir = tmp_path / "run"
    result = run_with_wandb(tiny_train_args(image_folder, output_dir, "--epochs", "1"), env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Failed to start the W&B run" in result.stdout
    assert json.loads((output_dir / "metrics.json").read_text())["best"]["epoch"] == 1


@pytest.mark.ddp
def test_two_process_run_creates_one_wandb_run(tmp_path, image_folder):
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    args = [TRAIN_SCRIPT, *tiny_train_args(image_folder, tmp_path / "run", "--epochs", "1")]
    result = run_accelerate(args, extra_env={"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(find_offline_runs(wandb_dir)) == 1
