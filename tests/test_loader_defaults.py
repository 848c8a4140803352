"""Data loader defaults: worker count from the usable cores, persistent workers, --num-workers parsing."""

import os

import pytest
import torch

from crop_accel.cli import build_parser
from crop_accel.data import build_loader, resolve_num_workers


@pytest.fixture
def cores(monkeypatch):
    """Set the cores this process may use and clear LOCAL_WORLD_SIZE; return a setter."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_cores(count: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)

    return set_cores


def test_requested_workers_win(cores):
    cores(16)
    assert resolve_num_workers(0) == 0
    assert resolve_num_workers(3) == 3


@pytest.mark.parametrize(("count", "expected"), [(1, 0), (2, 1), (4, 3), (16, 8)])
def test_default_keeps_one_core_for_the_loop(cores, count, expected):
    cores(count)
    assert resolve_num_workers(None) == expected


@pytest.mark.parametrize(("count", "local_processes", "expected"), [(16, 4, 3), (32, 8, 3), (2, 2, 0), (8, 2, 3)])
def test_default_shares_cores_among_local_processes(cores, monkeypatch, count, local_processes, expected):
    cores(count)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    assert resolve_num_workers(None) == expected


def test_negative_workers_rejected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data-dir", "x", "--num-workers", "-1"])
    assert "invalid value '-1'; expected at least 0" in capsys.readouterr().err


def test_loader_keeps_workers_between_epochs():
    dataset = torch.utils.data.TensorDataset(torch.arange(8.0))
    with_workers = build_loader(dataset, batch_size=4, train=True, num_workers=1)
    assert with_workers.persistent_workers
    assert not build_loader(dataset, batch_size=4, train=True, num_workers=0).persistent_workers
