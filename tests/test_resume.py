"""Checkpoints and resume: a resumed run must end exactly where an uninterrupted one does."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from conftest import REPO_ROOT, make_image_folder, run_accelerate, tiny_train_args
from test_train_e2e import TRAIN_SCRIPT, run_script


def final_weights(output_dir, step):
    return safetensors.torch.load_file(output_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors")


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def val_metrics(output_dir):
    metrics = json.loads((output_dir / "metrics.json").read_text())
    return [(row["epoch"], row["val_loss"], row["val_acc"]) for row in metrics["epochs"]]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two uninterrupted epochs of 7 steps, with a checkpoint every 3 steps kept.

    tf_efficientnet_lite0 has dropout before its head, so an exact match after resume
    also shows that the global RNG continues where the checkpoint left it.
    """
    root = tmp_path_factory.mktemp("resume")
    data_dir = make_image_folder(root / "data")
    output_dir = root / "straight"
    args = tiny_train_args(
        data_dir, output_dir, "--model", "tf_efficientnet_lite0", "--checkpoint-every", "3", "--keep-checkpoints", "10"
    )
    result = run_script(args)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, data_dir, output_dir


def resume_copy(root, straight_dir, data_dir, step, name):
    """Resume a copy of the straight run from its checkpoint at ``step``."""
    output_dir = root / name
    output_dir.mkdir()
    shutil.copytree(straight_dir / "checkpoints" / f"step-{step:06d}", output_dir / "checkpoints" / f"step-{step:06d}")
    result = run_script(tiny_train_args(data_dir, output_dir, "--model", "tf_efficientnet_lite0", "--resume"))
    assert result.returncode == 0, result.stdout + result.stderr
    return output_dir, result


def test_straight_run_keeps_step_checkpoints(straight_run):
    _, _, output_dir = straight_run
    names = sorted(path.name for path in (output_dir / "checkpoints").iterdir())
    assert names == ["step-000003", "step-000006", "step-000007", "step-000009", "step-000012", "step-000014"]


def test_resume_after_epoch_matches_straight_run(straight_run):
    root, data_dir, straight_dir = straight_run
    resumed_dir, result = resume_copy(root, straight_dir, data_dir, 7, "after_epoch")
    assert "Resumed from" in result.stdout
    assert_same_weights(final_weights(straight_dir, 14), final_weights(resumed_dir, 14))
    assert val_metrics(resumed_dir) == val_metrics(straight_dir)


def test_resume_mid_epoch_matches_straight_run(straight_run):
    root, data_dir, straight_dir = straight_run
    resumed_dir, _ = resume_copy(root, straight_dir, data_dir, 3, "mid_epoch")
    assert_same_weights(final_weights(straight_dir, 14), final_weights(resumed_dir, 14))
    assert val_metrics(resumed_dir) == val_metrics(straight_dir)


def test_unfinished_checkpoint_write_is_ignored(straight_run):
    root, data_dir, straight_dir = straight_run
    output_dir = root / "killed_write"
    output_dir.mkdir()
    shutil.copytree(straight_dir / "checkpoints" / "step-000007", output_dir / "checkpoints" / "step-000007")
    # What a kill during save_state leaves: a temporary folder with a truncated file.
    partial = output_dir / "checkpoints" / ".tmp-step-000009"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)

    result = run_script(tiny_train_args(data_dir, output_dir, "--model", "tf_efficientnet_lite0", "--resume"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step-000007" in result.stdout
    assert_same_weights(final_weights(straight_dir, 14), final_weights(output_dir, 14))


def test_resume_with_other_epochs_is_clear_error(straight_run):
    root, data_dir, straight_dir = straight_run
    checkpoint = straight_dir / "checkpoints" / "step-000007"
    args = tiny_train_args(data_dir, root / "other", "--model", "tf_efficientnet_lite0", "--resume", str(checkpoint))
    args[args.index("--epochs") + 1] = "3"
    result = run_script(args)
    assert result.returncode == 2
    assert "planned for 2 epochs" in result.stdout


def test_resume_without_checkpoint_is_clear_error(tmp_path, image_folder):
    result = run_script(tiny_train_args(image_folder, tmp_path / "empty", "--resume"))
    assert result.returncode == 2
    assert "found no checkpoint" in result.stdout


def test_sigterm_mid_epoch_checkpoints_and_resumes(tmp_path):
    data_dir = make_image_folder(tmp_path / "data", per_class=40)
    output_dir = tmp_path / "run"
    command = [sys.executable, TRAIN_SCRIPT, *tiny_train_args(data_dir, output_dir)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Wait for the first progress line of epoch 1, then ask the run to stop.
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "epoch 1/2 step" in line:
            break
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + process.stdout.read()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, output
    assert "--resume" in output

    checkpoints = list((output_dir / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "training_state.json").read_text())
    assert state["epoch"] == 1
    assert state["batches_done"] > 0

    result = run_script(tiny_train_args(data_dir, output_dir, "--resume"))
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]


@pytest.mark.ddp
def test_two_process_checkpoint_resumes_in_two_processes(tmp_path):
    data_dir = make_image_folder(tmp_path / "data")
    straight_dir = tmp_path / "straight"
    args = tiny_train_args(data_dir, straight_dir, "--keep-checkpoints", "5")
    result = run_accelerate([TRAIN_SCRIPT, *args])
    assert result.returncode == 0, result.stdout + result.stderr
    steps = sorted(path.name for path in (straight_dir / "checkpoints").iterdir())
    assert len(steps) == 2
    assert (straight_dir / "checkpoints" / steps[0] / "random_states_1.pkl").is_file()

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight_dir / "checkpoints" / steps[0], resumed_dir / "checkpoints" / steps[0])
    result = run_accelerate([TRAIN_SCRIPT, *tiny_train_args(data_dir, resumed_dir, "--resume")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_weights(final_weights(straight_dir, int(steps[1][5:])), final_weights(resumed_dir, int(steps[1][5:])))
    assert val_metrics(resumed_dir) == val_metrics(straight_dir)


def test_sigterm_to_process_group_with_workers(tmp_path):
    # Schedulers signal every process of the job, loader workers included.
    data_dir = make_image_folder(tmp_path / "data", per_class=40)
    output_dir = tmp_path / "run"
    command = [sys.executable, TRAIN_SCRIPT, *tiny_train_args(data_dir, output_dir, "--num-workers", "1")]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "epoch 1/2 step" in line:
            break
    os.killpg(process.pid, signal.SIGTERM)
    output = "".join(lines) + process.stdout.read()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, output
    assert "Traceback" not in output
    assert output.count("Received SIGTERM") == 1
    assert len(list((output_dir / "checkpoints").glob("step-*"))) == 1
