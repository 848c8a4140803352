"""evaluate and predict on a trained model dir agree with training's validation."""

import csv
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, make_image_folder, run_accelerate, tiny_train_args
from test_train_e2e import run_script


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crop_accel", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained run and a labelled folder holding exactly its validation images."""
    root = tmp_path_factory.mktemp("inference")
    data_dir = make_image_folder(root / "data", per_class=15)
    output_dir = root / "run"
    result = run_script(tiny_train_args(data_dir, output_dir, "--epochs", "1"))
    assert result.returncode == 0, result.stdout + result.stderr

    val_dir = root / "val"
    with open(output_dir / "split.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["subset"] == "val":
                target = val_dir / row["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(data_dir / row["path"], target)
    return output_dir, val_dir


def read_predictions(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_matches_training_validation(trained, tmp_path):
    output_dir, val_dir = trained
    result = run_cli("evaluate", "--model-dir", str(output_dir), "--data-dir", str(val_dir), "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr

    training = json.loads((output_dir / "metrics.json").read_text())["epochs"][0]
    evaluation = json.loads((tmp_path / "metrics.json").read_text())
    assert evaluation["num_samples"] == training["val_images"]
    assert evaluation["accuracy"] == pytest.approx(training["val_acc"])
    assert evaluation["loss"] == pytest.approx(training["val_loss"], rel=1e-4)
    for name in ("confusion_matrix.csv", "per_class.csv", "worst_errors.csv", "confusion_matrix.png"):
        assert (tmp_path / name).is_file(), name


def test_predict_matches_training_validation(trained, tmp_path):
    output_dir, val_dir = trained
    predictions_csv = tmp_path / "preds.csv"
    result = run_cli("predict", "--model-dir", str(output_dir), "--output", str(predictions_csv), str(val_dir))
    assert result.returncode == 0, result.stdout + result.stderr

    rows = read_predictions(predictions_csv)
    training = json.loads((output_dir / "metrics.json").read_text())["epochs"][0]
    assert len(rows) == training["val_images"]
    correct = sum(row["class_1"] == row["path"].split("/")[-2] for row in rows)
    assert correct / len(rows) == pytest.approx(training["val_acc"])
    for row in rows:
        probs = [float(row[f"prob_{rank}"]) for rank in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True)


def test_predict_skips_unreadable_files(trained, tmp_path):
    output_dir, val_dir = trained
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = next(val_dir.rglob("*.jpg"))
    predictions_csv = tmp_path / "preds.csv"
    result = run_cli("predict", "--model-dir", str(output_dir), "--output", str(predictions_csv), str(good), str(broken))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Skipping" in result.stdout
    assert [row["path"] for row in read_predictions(predictions_csv)] == [str(good)]


def test_evaluate_with_other_classes_is_clear_error(trained, tmp_path):
    output_dir, _ = trained
    other = make_image_folder(tmp_path / "other", num_classes=2, per_class=3)
    result = run_cli("evaluate", "--model-dir", str(output_dir), "--data-dir", str(other))
    assert result.returncode == 2
    assert "trained on" in result.stdout


def test_evaluate_without_model_is_clear_error(tmp_path, image_folder):
    result = run_cli("evaluate", "--model-dir", str(tmp_path), "--data-dir", str(image_folder))
    assert result.returncode == 2
    assert "model.json not found" in result.stdout


@pytest.mark.ddp
def test_predict_two_processes_lists_each_image_once(trained, tmp_path):
    output_dir, val_dir = trained
    predictions_csv = tmp_path / "preds.csv"
    result = run_accelerate(
        ["-m", "crop_accel", "predict", "--model-dir", str(output_dir), "--output", str(predictions_csv),
         "--batch-size", "4", "--num-workers", "0", str(val_dir)]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    paths = [row["path"] for row in read_predictions(predictions_csv)]
    assert len(paths) == len(set(paths))
    assert len(paths) == len(list(val_dir.rglob("*.*")))


def test_evaluate_accepts_single_image_classes(trained, tmp_path):
    output_dir, val_dir = trained
    small = tmp_path / "small"
    for class_dir in sorted(val_dir.iterdir()):
        (small / class_dir.name).mkdir(parents=True)
        first = sorted(class_dir.iterdir())[0]
        shutil.copy(first, small / class_dir.name / first.name)
    result = run_cli("evaluate", "--model-dir", str(output_dir), "--data-dir", str(small), "--output-dir", str(tmp_path / "e"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["num_samples"] == 3


def test_predict_rejects_zero_top_k(trained, tmp_path):
    output_dir, val_dir = trained
    result = run_cli("predict", "--model-dir", str(output_dir), "--output", str(tmp_path / "p.csv"), "--top-k", "0", str(val_dir))
    assert result.returncode == 2
    assert "expected at least 1" in result.stderr
