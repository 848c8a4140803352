"""Tests for crop_accel.tracking against the real wandb package in offline mode.

Every run is read back from its ``.wandb`` file with tests/wandb_offline.py. The one
online test talks to a closed port on 127.0.0.1, so nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import logging
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from PIL import Image

from crop_accel import tracking
from crop_accel.analysis import analyze_predictions
from crop_accel.tracking import DisabledTracking, RunTracking
from wandb_offline import (
    find_offline_runs,
    flush_offline_runs,
    read_artifacts,
    read_config,
    read_history,
    read_media,
    read_run,
    read_table,
)

CLASSES = [f"crop_{i}" for i in range(7)]

# Variables of the developer's shell that would change what these tests start.
WANDB_VARIABLES = (
    "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_NAME",
    "WANDB_TAGS", "WANDB_RESUME", "WANDB_INIT_TIMEOUT", "WANDB_LOGIN_TIMEOUT", "WANDB_IDENTITY_TOKEN_FILE",
)


def configure_offline_wandb(patch: pytest.MonkeyPatch, root: Path) -> Path:
    """Point W&B at folders under ``root`` in offline mode and return WANDB_DIR."""
    for name in WANDB_VARIABLES:
        patch.delenv(name, raising=False)
    wandb_dir = root / "wandb_dir"
    wandb_dir.mkdir(parents=True)
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_DIR", str(wandb_dir))
    patch.setenv("WANDB_SILENT", "true")
    patch.setenv("WANDB_CONFIG_DIR", str(root / "wandb_config"))
    patch.setenv("WANDB_CACHE_DIR", str(root / "wandb_cache"))
    patch.setenv("WANDB_DATA_DIR", str(root / "wandb_data"))
    patch.setenv("NETRC", str(root / "missing_netrc"))
    return wandb_dir


def new_accelerator(log_with: str | None = "wandb") -> Accelerator:
    # accelerate keeps process-wide state, so a fresh Accelerator needs it cleared first.
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    return Accelerator(cpu=True, log_with=log_with)


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tracking.add_tracking_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    directory = configure_offline_wandb(monkeypatch, tmp_path)
    yield directory
    # wandb reads its environment once per process until teardown.
    flush_offline_runs()
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def synthetic_analysis(data_dir: Path):
    """Return an analysis of noisy predictions over generated images, one of them unreadable."""
    rng = np.random.default_rng(3)
    targets = np.repeat(np.arange(len(CLASSES)), 6)
    logits = rng.normal(size=(len(targets), len(CLASSES)))
    logits[np.arange(len(targets)), targets] += 1.2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    paths = []
    for index, target in enumerate(targets):
        relative = f"{CLASSES[target]}/img_{index}.png"
        (data_dir / CLASSES[target]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(data_dir / relative)
        paths.append(relative)
    analysis = analyze_predictions(targets, probs, CLASSES, paths, num_worst=8)
    (data_dir / analysis.worst_errors[1].path).write_bytes(b"truncated")
    return analysis


class LogRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """Run one offline W&B run through every RunTracking method and return what it made."""
    root = tmp_path_factory.mktemp("offline_run")
    recorder = LogRecorder()
    logger = logging.getLogger("crop_accel")
    logger.addHandler(recorder)
    previous_level = logger.level
    logger.setLevel(logging.DEBUG)
    with pytest.MonkeyPatch.context() as patch:
        wandb_dir = configure_offline_wandb(patch, root)
        output_dir = root / "output"
        data_dir = root / "data"
        analysis = synthetic_analysis(data_dir)
        lr_csv = root / "lr_finder.csv"
        lr_csv.write_text("lr,loss,smoothed_loss\n1e-05,2.3,2.3\n0.0001,2.1,2.2\n0.001,1.5,1.9\n0.01,nan,2.4\n")
        lr_png = root / "lr_finder.png"
        Image.new("RGB", (64, 48), "white").save(lr_png)
        model_dir = root / "best"
        model_dir.mkdir()
        (model_dir / "model.safetensors").write_bytes(b"\0" * 128)

        accelerator = new_accelerator()
        args = parse_args("--wandb-tags", "baseline, lite0", "--run-name", "trial", "--log-model")
        run = RunTracking.start(accelerator, args, {"lr": 0.01, "data_dir": data_dir}, output_dir)
        run.log_lr_finder(lr_csv, lr_png, step=0)
        for epoch in range(3):
            run.log({"epoch": epoch, "train/loss": 1.0 / (epoch + 1), "val/accuracy": np.float32(0.25 * epoch)}, step=epoch)
        run.log_analysis(analysis, step=2, data_dir=data_dir)
        run.log_model_artifact(model_dir)
        run.finish()
        accelerator.end_training()
        flush_offline_runs()
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    logger.removeHandler(recorder)
    logger.setLevel(previous_level)
    return {
        "run": run,
        "wandb_dir": wandb_dir,
        "output_dir": output_dir,
        "analysis": analysis,
        "messages": recorder.messages,
    }


def media_by_key(run_dir: Path) -> dict:
    return {entry.key: entry for entry in read_media(run_dir)}


def only_run(wandb_dir: Path) -> Path:
    runs = find_offline_runs(wandb_dir)
    assert len(runs) == 1, runs
    return runs[0]


def test_run_id_stored_in_output_dir(offline_run):
    run_dir = only_run(offline_run["wandb_dir"])
    record = read_run(run_dir)
    stored = (offline_run["output_dir"] / tracking.RUN_ID_FILE).read_text().strip()
    assert record.run_id == stored
    assert offline_run["run"].run_id == stored
    assert record.project == "crop_accel"
    assert record.display_name == "trial"
    assert list(record.tags) == ["baseline", "lite0"]


def test_config_logged(offline_run):
    config = read_config(only_run(offline_run["wandb_dir"]))
    assert config["lr"] == 0.01
    assert config["data_dir"].endswith("data")


def test_history_has_every_epoch(offline_run):
    rows = [row for row in read_history(only_run(offline_run["wandb_dir"])) if "train/loss" in row]
    assert [row["_step"] for row in rows] == [0, 1, 2]
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert [row["train/loss"] for row in rows] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [row["val/accuracy"] for row in rows] == pytest.approx([0.0, 0.25, 0.5])
    analysis = offline_run["analysis"]
    assert rows[2]["val/macro_f1"] == pytest.approx(analysis.macro_f1)
    assert rows[2]["val/top5_accuracy"] == pytest.approx(analysis.top5_accuracy)


def test_confusion_matrix_chart_logged(offline_run):
    run_dir = only_run(offline_run["wandb_dir"])
    entry = media_by_key(run_dir)["val/confusion_matrix_table"]
    assert entry.step == 2
    table = read_table(run_dir, entry)
    assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
    counts = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    for actual, predicted, count in table["data"]:
        counts[CLASSES.index(actual), CLASSES.index(predicted)] = count
    np.testing.assert_array_equal(counts, offline_run["analysis"].confusion)

    panel = read_config(run_dir)["_wandb"]["visualize"]["val/confusion_matrix"]
    assert panel["panel_config"]["panelDefId"] == "wandb/confusion_matrix/v1"


def test_per_class_and_pairs_tables(offline_run):
    run_dir = only_run(offline_run["wandb_dir"])
    media = media_by_key(run_dir)
    analysis = offline_run["analysis"]

    per_class = read_table(run_dir, media["val/per_class"])
    assert per_class["columns"] == ["class", "precision", "recall", "f1", "support"]
    assert [row[0] for row in per_class["data"]] == CLASSES
    assert [row[3] for row in per_class["data"]] == pytest.approx([s.f1 for s in analysis.per_class])
    assert [row[4] for row in per_class["data"]] == [6] * len(CLASSES)

    pairs = read_table(run_dir, media["val/confused_pairs"])
    expected = [[p.true_class, p.predicted_class, p.count] for p in analysis.confused_pairs]
    assert [row[:3] for row in pairs["data"]] == expected


def test_gallery_captions_sorted(offline_run):
    run_dir = only_run(offline_run["wandb_dir"])
    gallery = media_by_key(run_dir)["val/worst_errors"]
    errors = offline_run["analysis"].worst_errors
    readable = [error for index, error in enumerate(errors) if index != 1]
    assert gallery.type == "images/separated"
    assert gallery.captions == [error.caption() for error in readable]
    confidences = [float(re.search(r"\(p=([0-9.]+)", caption).group(1)) for caption in gallery.captions]
    assert confidences == sorted(confidences, reverse=True)
    assert len(gallery.files) == len(readable)
    for name in gallery.files:
        with Image.open(run_dir / "files" / name) as image:
            assert image.size == (48, 32)
    assert any(f"Leaving {errors[1].path} out of the W&B worst-error gallery" in m for m in offline_run["messages"])


def test_heatmap_image_logged(offline_run):
    run_dir = only_run(offline_run["wandb_dir"])
    heatmap = media_by_key(run_dir)["val/confusion_matrix_normalised"]
    assert heatmap.type == "image-file"
    with Image.open(run_dir / "files" / heatmap.files[0]) as image:
        assert image.width > 500


def test_lr_finder_logged(offline_run):
    run_dir = only_run(offline_run["wandb_dir"])
    media = media_by_key(run_dir)
    table = read_table(run_dir, media["lr_finder/table"])
    assert media["lr_finder/table"].step == 0
    assert table["columns"] == ["lr", "loss", "smoothed_loss", "log10_lr"]
    assert [row[3] for row in table["data"]] == pytest.approx([-5, -4, -3, -2])
    assert table["data"][3][1] is None
    assert media["lr_finder/plot"].type == "image-file"
    assert "lr_finder/curve" in read_config(run_dir)["_wandb"]["visualize"]


def test_model_artifact_logged(offline_run):
    run_dir = only_run(offline_run["wandb_dir"])
    run_id = read_run(run_dir).run_id
    models = [a for a in read_artifacts(run_dir) if a["type"] == "model"]
    assert len(models) == 1
    assert models[0]["name"] == f"model-{run_id}"
    assert "best" in models[0]["aliases"]
    assert models[0]["paths"] == ["model.safetensors"]


def test_offline_sync_command_logged(offline_run):
    run_dir = only_run(offline_run["wandb_dir"])
    assert any(f"`wandb sync {run_dir}`" in message for message in offline_run["messages"])
    assert not offline_run["run"].enabled


def test_resume_continues_same_run(wandb_dir, tmp_path):
    output_dir = tmp_path / "output"
    first = RunTracking.start(new_accelerator(), parse_args(), {"lr": 0.1}, output_dir)
    first.log({"train/loss": 1.0}, step=0)
    first.log_model_artifact(tmp_path)
    first.finish()

    second = RunTracking.start(new_accelerator(), parse_args(), {"lr": 0.1}, output_dir, resume=True)
    second.log({"train/loss": 0.5}, step=1)
    second.finish()
    flush_offline_runs()

    runs = find_offline_runs(wandb_dir)
    assert len(runs) == 2
    assert read_run(runs[0]).run_id == read_run(runs[1]).run_id == first.run_id
    assert second.run_id == first.run_id
    assert [row["_step"] for row in read_history(runs[1])] == [1]
    # --log-model was not given, so nothing was uploaded.
    assert [a for a in read_artifacts(runs[0]) if a["type"] == "model"] == []


def test_long_run_reads_back_fully(wandb_dir, tmp_path):
    # Over 32 KiB of records, so records span the blocks of the .wandb file.
    run = RunTracking.start(new_accelerator(), parse_args(), {"notes": "n" * 50_000}, tmp_path / "output")
    for step in range(1500):
        run.log({"train/loss": 1.0 / (step + 1), "phase": "warmup" * 10}, step=step)
    run.finish()
    flush_offline_runs()

    (run_dir,) = find_offline_runs(wandb_dir)
    assert next(run_dir.glob("*.wandb")).stat().st_size > 4 * 32 * 1024
    rows = read_history(run_dir)
    assert [row["_step"] for row in rows] == list(range(1500))
    assert rows[-1]["train/loss"] == pytest.approx(1 / 1500)
    assert read_config(run_dir)["notes"] == "n" * 50_000


def test_fresh_start_replaces_run_id(wandb_dir, tmp_path):
    output_dir = tmp_path / "output"
    output_dir.mkdir()
    (output_dir / tracking.RUN_ID_FILE).write_text("oldrun01\n")
    run = RunTracking.start(new_accelerator(), parse_args(), {}, output_dir)
    run.finish()
    assert run.run_id != "oldrun01"
    assert (output_dir / tracking.RUN_ID_FILE).read_text().strip() == run.run_id


def test_wandb_dir_unset_uses_output_dir(wandb_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_DIR")
    output_dir = tmp_path / "output"
    run = RunTracking.start(new_accelerator(), parse_args(), {}, output_dir)
    run.finish()
    flush_offline_runs()
    assert len(find_offline_runs(output_dir)) == 1
    assert find_offline_runs(wandb_dir) == []


def test_failed_start_disables_tracking(wandb_dir, tmp_path, caplog):
    # argparse rejects this project name, but a config built in code can still carry it.
    args = argparse.Namespace(**{**vars(parse_args()), "wandb_project": "crops/v1"})
    accelerator = new_accelerator()
    run = RunTracking.start(accelerator, args, {}, tmp_path / "output")

    assert isinstance(run, DisabledTracking)
    assert not run.enabled
    assert "Failed to start the W&B run" in caplog.text
    assert "crops/v1" in caplog.text
    assert "WANDB_INIT_TIMEOUT" not in caplog.text
    assert accelerator.trackers == []
    assert not (tmp_path / "output" / tracking.RUN_ID_FILE).exists()
    run.log({"train/loss": 1.0}, step=0)
    run.finish()
    accelerator.log({"train/loss": 1.0}, step=0)
    accelerator.end_training()


def test_invalid_timeout_disables_tracking(wandb_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "soon")
    accelerator = new_accelerator()
    run = RunTracking.start(accelerator, parse_args(), {}, tmp_path / "output")
    assert isinstance(run, DisabledTracking)
    assert "could not convert string to float: 'soon'" in caplog.text
    assert accelerator.trackers == []


def test_unreachable_server_disables_tracking(wandb_dir, tmp_path, monkeypatch, caplog):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")

    run = RunTracking.start(new_accelerator(), parse_args("--wandb-mode", "online"), {}, tmp_path / "output")
    assert isinstance(run, DisabledTracking)
    assert "Failed to start the W&B run in online mode" in caplog.text
    assert "Raise WANDB_INIT_TIMEOUT" in caplog.text
    run.log({"train/loss": 1.0}, step=0)


def test_unusable_wandb_dir_falls_back(wandb_dir, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    monkeypatch.setenv("WANDB_DIR", str(blocker / "wandb"))
    # wandb 0.31 falls back to the system temporary folder, which TMPDIR moves into tmp_path.
    system_temp = tmp_path / "system_temp"
    system_temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_temp))
    monkeypatch.setattr("tempfile.tempdir", None)
    caplog.set_level(logging.INFO, logger="crop_accel.tracking")

    run = RunTracking.start(new_accelerator(), parse_args(), {}, tmp_path / "output")
    run.log({"train/loss": 1.0}, step=0)
    run.finish()
    flush_offline_runs()

    (run_dir,) = find_offline_runs(system_temp)
    assert [row["train/loss"] for row in read_history(run_dir)] == [1.0]
    assert f"wandb sync {run_dir}" in caplog.text


def test_failed_log_disables_tracking(wandb_dir, tmp_path, caplog):
    run = RunTracking.start(new_accelerator(), parse_args(), {}, tmp_path / "output")
    run.log({"train/loss": 1.0}, step=0)
    run.log({"not_a_number": object()}, step=1)
    run.log({"train/loss": 0.5}, step=2)
    run.log_analysis(synthetic_analysis(tmp_path / "data"), step=2, data_dir=tmp_path / "data")
    assert not run.enabled
    run.finish()
    flush_offline_runs()

    failures = [r for r in caplog.records if "W&B failed while logging metrics" in r.getMessage()]
    assert len(failures) == 1
    (run_dir,) = find_offline_runs(wandb_dir)
    assert [row["_step"] for row in read_history(run_dir)] == [0]


def test_bad_lr_finder_csv_keeps_tracking(wandb_dir, tmp_path, caplog):
    bad_csv = tmp_path / "lr_finder.csv"
    bad_csv.write_text("learning_rate,value\n0.001,1.0\n")
    run = RunTracking.start(new_accelerator(), parse_args(), {}, tmp_path / "output")
    run.log_lr_finder(bad_csv, tmp_path / "missing.png", step=0)
    assert run.enabled
    run.log({"train/loss": 1.0}, step=0)
    run.finish()
    flush_offline_runs()

    assert "Failed to prepare the LR finder results for W&B" in caplog.text
    assert "needs the columns 'lr' and 'loss'" in caplog.text
    (run_dir,) = find_offline_runs(wandb_dir)
    assert [row["train/loss"] for row in read_history(run_dir)] == [1.0]


def test_disabled_mode_starts_nothing(wandb_dir, tmp_path):
    mode = tracking.resolve_wandb_mode("disabled")
    accelerator = new_accelerator(tracking.log_with_for(mode))
    run = RunTracking.start(accelerator, parse_args("--wandb-mode", "disabled"), {}, tmp_path / "output")
    assert isinstance(run, DisabledTracking)
    assert run.run_id is None
    run.log({"train/loss": 1.0}, step=0)
    run.log_model_artifact(tmp_path)
    run.finish()
    assert find_offline_runs(wandb_dir) == []
    assert not (tmp_path / "output").exists()


def test_accelerator_without_wandb_disables(wandb_dir, tmp_path, caplog):
    run = RunTracking.start(new_accelerator(None), parse_args(), {}, tmp_path / "output")
    assert isinstance(run, DisabledTracking)
    assert "built without log_with='wandb'" in caplog.text


@pytest.mark.parametrize(
    ("requested", "environment", "expected"),
    [
        ("disabled", {"WANDB_MODE": "online"}, "disabled"),
        (None, {"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40}, "offline"),
        (None, {"WANDB_MODE": "dryrun"}, "offline"),
        (None, {"WANDB_API_KEY": "k" * 40}, "online"),
        (None, {}, "offline"),
    ],
)
def test_resolve_mode(requested, environment, expected, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "missing_netrc"))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert tracking.resolve_wandb_mode(requested) == expected


@pytest.mark.parametrize(
    ("machine", "base_url", "expected"),
    [
        ("api.wandb.ai", None, "online"),
        ("example.com", None, "offline"),
        ("wandb.internal:8080", "http://wandb.internal:8080", "online"),
    ],
)
def test_resolve_mode_from_netrc(machine, base_url, expected, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    if base_url:
        monkeypatch.setenv("WANDB_BASE_URL", base_url)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text(f"machine {machine}\n  login user\n  password {'k' * 40}\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert tracking.resolve_wandb_mode(None) == expected


def test_resolve_mode_rejects_unknown(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "cloud")
    with pytest.raises(ValueError, match="invalid W&B mode 'cloud' from WANDB_MODE"):
        tracking.resolve_wandb_mode(None)


def test_log_with_for_modes():
    assert tracking.log_with_for("online") == "wandb"
    assert tracking.log_with_for("offline") == "wandb"
    assert tracking.log_with_for("disabled") is None


def test_tracking_arguments(monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    defaults = parse_args()
    assert defaults.wandb_mode is None
    assert defaults.wandb_project == "crop_accel"
    assert defaults.wandb_entity is None
    assert defaults.run_name is None
    assert defaults.wandb_tags == []
    assert defaults.log_model is False

    monkeypatch.setenv("WANDB_PROJECT", "crops-team")
    assert parse_args().wandb_project == "crops-team"
    args = parse_args("--wandb-mode", "offline", "--wandb-entity", "agri", "--wandb-tags", "a, b,,c", "--log-model")
    assert args.wandb_mode == "offline"
    assert args.wandb_entity == "agri"
    assert args.wandb_tags == ["a", "b", "c"]
    assert args.log_model is True


@pytest.mark.parametrize("argv", [["--wandb-tags", "x" * 65], ["--wandb-project", "crops/v1"], ["--wandb-mode", "cloud"]])
def test_tracking_arguments_rejected(argv):
    with pytest.raises(SystemExit):
        parse_args(*argv)
