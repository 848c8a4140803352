"""Tests of the LR range test on a tiny BatchNorm CNN and separable synthetic images."""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import run_accelerate
from crop_accel.lr_finder import (
    DEFAULT_DIVERGE_FACTOR,
    DEFAULT_END_LR,
    DEFAULT_NUM_STEPS,
    DEFAULT_START_LR,
    LRFinderError,
    LRFinderResult,
    lr_range_test,
    suggest_learning_rate,
)
from crop_accel.lr_finder_plot import save_lr_finder_outputs
from crop_accel.runtime import share_from_main

NUM_CLASSES = 3
# Group lrs relative to the head: stem conv /10, BatchNorm /4, head x1.
GROUP_RATIOS = (0.1, 0.25, 1.0)


def make_model(num_classes=NUM_CLASSES):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def make_optimizer(model, ratios=GROUP_RATIOS):
    groups = [model[0].parameters(), model[1].parameters(), model[6].parameters()]
    return torch.optim.Adam([{"params": list(params), "lr": ratio} for params, ratio in zip(groups, ratios)])


def make_loader(num_samples=256, batch_size=32, num_classes=NUM_CLASSES, seed=0):
    # Each class is a fixed random 3x8x8 pattern plus noise, so a small CNN separates them.
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, 3, 8, 8, generator=generator)
    targets = torch.randint(0, num_classes, (num_samples,), generator=generator)
    images = patterns[targets] + 0.5 * torch.randn(num_samples, 3, 8, 8, generator=generator)
    dataset = TensorDataset(images, targets, torch.arange(num_samples))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


# The subprocess scripts below cannot import this test module, so they get the helpers' source.
PROBLEM_SOURCE = "\n".join(
    [
        "import torch",
        "from torch import nn",
        "from torch.utils.data import DataLoader, TensorDataset",
        f"NUM_CLASSES = {NUM_CLASSES}",
        f"GROUP_RATIOS = {GROUP_RATIOS}",
        *(inspect.getsource(helper) for helper in (make_model, make_optimizer, make_loader)),
    ]
)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = make_model(NUM_CLASSES)
    return model, make_optimizer(model, ratios=GROUP_RATIOS), make_loader(num_classes=NUM_CLASSES)


def capture_state(model, optimizer):
    return {
        "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
        "gradients": {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
        "modes": {name: module.training for name, module in model.named_modules()},
        "optimizer_state": {
            index: {key: value.clone() for key, value in state.items()}
            for index, state in optimizer.state_dict()["state"].items()
        },
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "torch_rng": torch.get_rng_state(),
    }


def assert_same_state(before, after):
    for name, value in before["parameters"].items():
        assert torch.equal(value, after["parameters"][name]), f"parameter {name} changed"
    for name, value in before["gradients"].items():
        if value is None:
            assert after["gradients"][name] is None, f"gradient of {name} was None before"
        else:
            assert torch.equal(value, after["gradients"][name]), f"gradient of {name} changed"
    for name, value in before["buffers"].items():
        assert torch.equal(value, after["buffers"][name]), f"buffer {name} changed"
    assert before["modes"] == after["modes"]
    assert before["optimizer_state"].keys() == after["optimizer_state"].keys()
    for index, state in before["optimizer_state"].items():
        for key, value in state.items():
            assert torch.equal(value, after["optimizer_state"][index][key]), f"optimizer state {index}.{key} changed"
    assert before["param_groups"] == after["param_groups"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])


def train_two_steps(model, optimizer, loader):
    # Real steps first, so that Adam moments, step counts and BatchNorm statistics exist.
    model.train()
    for step, (images, targets, _) in enumerate(loader):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
        if step == 1:
            return


def test_defaults_used_when_omitted(problem, accelerator):
    model, optimizer, loader = problem
    planned = []

    def record(step, num_steps, lr, smoothed_loss):
        planned.append(num_steps)

    result = lr_range_test(model, optimizer, loader, nn.functional.cross_entropy, accelerator, progress=record)

    assert set(planned) == {DEFAULT_NUM_STEPS}
    assert result.lrs[0] == pytest.approx(DEFAULT_START_LR, rel=1e-12)
    assert max(result.lrs) <= DEFAULT_END_LR * (1 + 1e-12)


def test_suggestion_inside_loss_descent(problem, accelerator):
    model, optimizer, loader = problem

    result = lr_range_test(
        model, optimizer, loader, nn.functional.cross_entropy, accelerator,
        start_lr=1e-5, end_lr=10.0, num_steps=60,
    )

    assert result.rule == "steepest"
    assert result.suggestion == result.steepest_lr
    assert result.suggestion < result.min_loss_lr
    suggestion_index = result.lrs.index(result.suggestion)
    assert result.smoothed_losses[suggestion_index] < result.smoothed_losses[0]
    assert result.smoothed_losses[suggestion_index] > min(result.smoothed_losses)
    assert result.batch_size == 32
    assert result.lrs[0] == pytest.approx(1e-5)


def test_sweep_restores_state_bit_for_bit(problem, accelerator):
    model, optimizer, loader = problem
    train_two_steps(model, optimizer, loader)
    model.eval()
    model[3].train()  # a mixed train/eval tree must come back module by module
    before = capture_state(model, optimizer)
    assert before["optimizer_state"], "Adam state should exist before the sweep"
    assert int(before["buffers"]["1.num_batches_tracked"]) == 2

    result = lr_range_test(model, optimizer, loader, nn.functional.cross_entropy, accelerator, num_steps=20)

    assert result.num_steps_run > 2
    assert_same_state(before, capture_state(model, optimizer))


def test_fresh_optimizer_stays_empty(problem, accelerator):
    model, optimizer, loader = problem
    before = capture_state(model, optimizer)

    lr_range_test(model, optimizer, loader, nn.functional.cross_entropy, accelerator, num_steps=10)

    assert optimizer.state_dict()["state"] == {}
    assert all(p.grad is None for p in model.parameters())
    assert_same_state(before, capture_state(model, optimizer))


def test_sweep_restores_state_after_error(problem, accelerator):
    model, optimizer, loader = problem
    train_two_steps(model, optimizer, loader)
    before = capture_state(model, optimizer)
    calls = []

    def failing_loss(outputs, targets):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("loss failed on purpose")
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(RuntimeError, match="on purpose"):
        lr_range_test(model, optimizer, loader, failing_loss, accelerator, num_steps=20)

    assert_same_state(before, capture_state(model, optimizer))


def test_divergence_stops_sweep_early(problem, accelerator):
    model, optimizer, loader = problem

    result = lr_range_test(
        model, optimizer, loader, nn.functional.cross_entropy, accelerator,
        start_lr=1e-3, end_lr=1e6, num_steps=60,
    )

    assert result.stopped_early is not None
    assert "exceeds" in result.stopped_early
    assert result.num_steps_run < 60
    assert result.smoothed_losses[-1] > DEFAULT_DIVERGE_FACTOR * min(result.smoothed_losses)


def test_nan_loss_stops_sweep(problem, accelerator):
    model, optimizer, loader = problem
    before = capture_state(model, optimizer)
    calls = []

    def loss_with_nan(outputs, targets):
        calls.append(1)
        loss = nn.functional.cross_entropy(outputs, targets)
        return loss * float("nan") if len(calls) == 10 else loss

    optimizer_steps = []
    optimizer.register_step_post_hook(lambda *arguments: optimizer_steps.append(1))
    result = lr_range_test(model, optimizer, loader, loss_with_nan, accelerator, num_steps=30)

    assert result.stopped_early.startswith("loss is nan at step 10")
    assert result.num_steps_run == 9
    assert len(optimizer_steps) == 9, "the NaN loss must not reach optimizer.step"
    assert all(math.isfinite(loss) for loss in result.losses)
    assert math.isfinite(result.suggestion)
    assert_same_state(before, capture_state(model, optimizer))


def test_nan_at_first_step_raises(problem, accelerator):
    model, optimizer, loader = problem
    before = capture_state(model, optimizer)

    def nan_loss(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets) * float("nan")

    with pytest.raises(LRFinderError, match="no finite loss"):
        lr_range_test(model, optimizer, loader, nan_loss, accelerator, num_steps=10)

    assert_same_state(before, capture_state(model, optimizer))


def test_group_ratios_kept_every_step(problem, accelerator):
    model, optimizer, loader = problem
    seen = []

    def record(step, num_steps, lr, smoothed_loss):
        seen.append((step, num_steps, lr, [group["lr"] for group in optimizer.param_groups]))

    result = lr_range_test(
        model, optimizer, loader, nn.functional.cross_entropy, accelerator,
        start_lr=1e-5, end_lr=1e-2, num_steps=25, diverge_factor=100.0, progress=record,
    )

    assert result.num_steps_run == 25
    assert [step for step, *_ in seen] == list(range(1, 26))
    for step, num_steps, lr, group_lrs in seen:
        assert num_steps == 25
        assert max(group_lrs) == lr
        for group_lr, ratio in zip(group_lrs, GROUP_RATIOS):
            assert group_lr / lr == pytest.approx(ratio, rel=1e-12), f"step {step}"
    assert result.lrs == [lr for _, _, lr, _ in seen]
    assert result.lrs[0] == pytest.approx(1e-5, rel=1e-12)
    assert result.lrs[-1] == pytest.approx(1e-2, rel=1e-12)
    assert np.allclose(np.diff(np.log(result.lrs)), math.log(1e3) / 24)
    assert [group["lr"] for group in optimizer.param_groups] == list(GROUP_RATIOS)


def test_short_loader_is_cycled(accelerator):
    torch.manual_seed(0)
    model = make_model(NUM_CLASSES)
    optimizer = make_optimizer(model)
    loader = make_loader(num_samples=32, batch_size=16)

    result = lr_range_test(
        model, optimizer, loader, nn.functional.cross_entropy, accelerator,
        start_lr=1e-6, end_lr=1e-4, num_steps=10, diverge_factor=100.0,
    )

    assert result.num_steps_run == 10
    assert result.stopped_early is None
    assert result.batch_size == 16


def test_empty_loader_raises(accelerator):
    model = make_model(NUM_CLASSES)
    optimizer = make_optimizer(model)
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)

    with pytest.raises(LRFinderError, match="no batches"):
        lr_range_test(model, optimizer, empty, nn.functional.cross_entropy, accelerator, num_steps=10)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(start_lr=1e-2, end_lr=1e-3), "0 < start_lr < end_lr"),
        (dict(start_lr=0.0), "0 < start_lr < end_lr"),
        (dict(num_steps=3), "num_steps=3"),
        (dict(diverge_factor=1.0), "diverge_factor=1"),
        (dict(smoothing=1.0), "smoothing=1"),
    ],
)
def test_invalid_arguments_raise(problem, accelerator, arguments, message):
    model, optimizer, loader = problem
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        lr_range_test(model, optimizer, loader, nn.functional.cross_entropy, accelerator, **arguments)


def test_suggest_rule_picks_steepest_point():
    log_lrs = np.linspace(-6, 0, 61)
    # The loss falls fastest at lr 1e-3 and rises again after its minimum near 1e-2.
    losses = 2.0 - np.tanh(2 * (log_lrs + 3)) + np.exp(3 * (log_lrs + 1))

    suggestion, steepest_lr, min_loss_lr, rule = suggest_learning_rate(list(10**log_lrs), list(losses))

    assert rule == "steepest"
    assert suggestion == steepest_lr
    assert steepest_lr == pytest.approx(1e-3, rel=0.03)
    assert min_loss_lr == pytest.approx(10 ** log_lrs[np.argmin(losses)])


@pytest.mark.parametrize(
    "losses",
    [
        [1.0] * 30,  # flat: no descent at all
        [1.0, 0.5, 0.4] + [0.4 + 0.1 * i for i in range(1, 28)],  # minimum inside the warm-up
        [1.0, 0.9, 0.8, 0.7, 0.8, 0.9],  # too few points before the minimum
    ],
)
def test_suggest_rule_falls_back(losses):
    lrs = list(np.geomspace(1e-6, 1, len(losses)))

    suggestion, steepest_lr, min_loss_lr, rule = suggest_learning_rate(lrs, losses)

    assert rule == "min_loss/10"
    assert steepest_lr is None
    assert min_loss_lr == lrs[int(np.argmin(losses))]
    assert suggestion == pytest.approx(min_loss_lr / 10)


def make_result():
    return LRFinderResult(
        lrs=[1e-4, 1e-3, 1e-2, 1e-1],
        losses=[1.1, 0.9, 0.5, 3.0],
        smoothed_losses=[1.1, 1.0, 0.8, 1.5],
        suggestion=1e-3,
        steepest_lr=1e-3,
        min_loss_lr=1e-2,
        rule="steepest",
        stopped_early="smoothed loss diverged",
        num_steps_run=4,
        batch_size=8,
        seconds=0.5,
    )


def test_to_dict_drops_arrays():
    summary = make_result().to_dict()

    assert "lrs" not in summary
    assert "losses" not in summary
    assert "smoothed_losses" not in summary
    assert summary["suggestion"] == 1e-3
    assert summary["min_loss_lr"] == 1e-2
    assert summary["rule"] == "steepest"
    assert summary["num_steps_run"] == 4
    assert json.loads(json.dumps(summary)) == summary


def test_save_outputs_writes_csv_and_png(tmp_path):
    result = make_result()

    csv_path, png_path = save_lr_finder_outputs(result, tmp_path / "run")

    with csv_path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert csv_path.name == "lr_finder.csv"
    assert rows[0] == ["lr", "loss", "smoothed_loss"]
    assert [[float(value) for value in row] for row in rows[1:]] == [
        list(point) for point in zip(result.lrs, result.losses, result.smoothed_losses)
    ]
    assert png_path.name == "lr_finder.png"
    with Image.open(png_path) as image:
        assert image.format == "PNG"
        assert image.width > 300


def test_share_single_process(accelerator):
    assert share_from_main(accelerator, lambda: 3.5e-4) == 3.5e-4


def write_script(tmp_path, source):
    script = tmp_path / "script.py"
    script.write_text(PROBLEM_SOURCE + textwrap.dedent(source))
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    return script, output_dir


def check_completed(completed):
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"


def test_bf16_sweep_runs_under_autocast(tmp_path):
    # A fresh process, because one process cannot hold two accelerate mixed-precision settings.
    script, output_dir = write_script(tmp_path, """
        import json, sys
        from accelerate import Accelerator
        from crop_accel.lr_finder import lr_range_test

        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        torch.manual_seed(0)
        model = make_model()
        dtypes = []
        model[6].register_forward_hook(lambda module, inputs, output: dtypes.append(str(output.dtype)))
        result = lr_range_test(model, make_optimizer(model), make_loader(), nn.functional.cross_entropy,
                               accelerator, start_lr=1e-5, end_lr=10.0, num_steps=30)
        summary = dict(result.to_dict(), head_dtypes=sorted(set(dtypes)))
        open(f"{sys.argv[1]}/summary.json", "w").write(json.dumps(summary))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    check_completed(subprocess.run(
        [sys.executable, str(script), str(output_dir)], env=env, capture_output=True, text=True, timeout=300,
    ))

    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["head_dtypes"] == ["torch.bfloat16"]
    assert summary["num_steps_run"] > 10
    assert math.isfinite(summary["suggestion"])


@pytest.mark.ddp
def test_suggestion_broadcast_to_two_processes(tmp_path):
    script, output_dir = write_script(tmp_path, """
        import sys
        from datetime import timedelta
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs
        from crop_accel.lr_finder import lr_range_test
        from crop_accel.runtime import share_from_main

        accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=5))])
        output_dir = sys.argv[1]
        lr = None
        if accelerator.is_main_process:
            torch.manual_seed(0)
            model = make_model()
            result = lr_range_test(model, make_optimizer(model), make_loader(), nn.functional.cross_entropy,
                                   accelerator, start_lr=1e-5, end_lr=10.0, num_steps=30)
            lr = result.suggestion
            open(f"{output_dir}/suggestion.txt", "w").write(repr(lr))
        lr = share_from_main(accelerator, lambda: lr)
        index = accelerator.process_index
        open(f"{output_dir}/lr_{index}.txt", "w").write(f"{accelerator.num_processes} {lr!r}")
        accelerator.wait_for_everyone()
        accelerator.end_training()
    """)
    # In accelerate 1.16 `--cpu --num_processes 2` starts one process, so run_accelerate uses torchrun.
    check_completed(run_accelerate([str(script), str(output_dir)], num_processes=2))

    suggestion = float((output_dir / "suggestion.txt").read_text())
    received = [(output_dir / f"lr_{index}.txt").read_text().split() for index in range(2)]
    for num_processes, lr in received:
        assert num_processes == "2"
        assert float(lr) == suggestion
    assert suggestion > 0
