"""Loader and memory-format defaults: worker count from the usable cores, persistent workers, channels_last."""

import os

import pytest
import timm
import torch
from accelerate import Accelerator

from crop_accel.cli import build_parser
from crop_accel.data import build_loader, resolve_num_workers
from crop_accel.train import prepare_model


@pytest.fixture
def cores(monkeypatch):
    """Clear LOCAL_WORLD_SIZE and return a function that sets the cores this process may use."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_cores(count: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)

    return set_cores


CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


def test_requested_workers_win(cores):
    cores(16)
    assert resolve_num_workers(0, GPU) == 0
    assert resolve_num_workers(3, CPU) == 3


@pytest.mark.parametrize(("count", "expected"), [(1, 0), (2, 1), (4, 3), (16, 8)])
def test_gpu_default_keeps_one_core_for_the_loop(cores, count, expected):
    cores(count)
    assert resolve_num_workers(None, GPU) == expected


@pytest.mark.parametrize(("count", "expected"), [(2, 0), (7, 0), (8, 1), (32, 4), (128, 8)])
def test_cpu_default_gives_workers_one_core_in_eight(cores, count, expected):
    cores(count)
    assert resolve_num_workers(None, CPU) == expected


@pytest.mark.parametrize(
    ("device", "count", "local_processes", "expected"),
    [(GPU, 16, 4, 3), (GPU, 32, 8, 3), (GPU, 2, 2, 0), (CPU, 32, 2, 2), (CPU, 8, 2, 0)],
)
def test_default_shares_cores_among_local_processes(cores, monkeypatch, device, count, local_processes, expected):
    cores(count)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    assert resolve_num_workers(None, device) == expected


def test_negative_workers_rejected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data-dir", "x", "--num-workers", "-1"])
    assert "invalid value '-1'; expected at least 0" in capsys.readouterr().err


def test_loader_keeps_workers_between_epochs():
    dataset = torch.utils.data.TensorDataset(torch.arange(8.0))
    with_workers = build_loader(dataset, batch_size=4, train=True, num_workers=1)
    assert with_workers.persistent_workers
    assert not build_loader(dataset, batch_size=4, train=True, num_workers=0).persistent_workers


@pytest.mark.parametrize("command", [["train", "--data-dir", "x"], ["lr-find", "--data-dir", "x"],
                                     ["evaluate", "--model-dir", "m", "--data-dir", "x"],
                                     ["predict", "--model-dir", "m", "--output", "p.csv", "image.jpg"]])
def test_channels_last_on_by_default(command):
    parser = build_parser()
    assert parser.parse_args(command).channels_last is True
    assert parser.parse_args([*command, "--no-channels-last"]).channels_last is False


def test_prepare_model_converts_to_channels_last():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    options = build_parser().parse_args(["train", "--data-dir", "x"])
    prepared = prepare_model(model, options, Accelerator(cpu=True))
    assert prepared.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not prepared.conv1.weight.is_contiguous()
