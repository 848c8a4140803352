"""Tests for crop_accel.analysis and crop_accel.plots on hand-built predictions."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from crop_accel import plots
from crop_accel.analysis import analyze_predictions, print_analysis, write_analysis

CLASSES = ["maize", "rice", "wheat"]

# Eight samples of three classes. Each row is (true class, predicted class, probability of
# the prediction, probability of the true class when it differs from the prediction).
SAMPLES = [
    (0, 0, 0.90, None),
    (0, 0, 0.60, None),
    (0, 1, 0.70, 0.20),
    (1, 1, 0.80, None),
    (1, 0, 0.95, 0.03),
    (2, 2, 0.50, None),
    (2, 2, 0.85, None),
    (2, 1, 0.55, 0.40),
]


def build_probs(samples, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Spread the probability mass left over evenly across the other classes."""
    targets = np.array([true for true, _, _, _ in samples])
    probs = np.zeros((len(samples), num_classes))
    for row, (true, predicted, confidence, true_probability) in enumerate(samples):
        probs[row, predicted] = confidence
        if true != predicted:
            probs[row, true] = true_probability
        rest = [k for k in range(num_classes) if probs[row, k] == 0]
        probs[row, rest] = (1.0 - probs[row].sum()) / len(rest)
    return targets, probs


def sample_paths(targets) -> list[str]:
    return [f"{CLASSES[t]}/img_{i}.png" for i, t in enumerate(targets)]


@pytest.fixture
def hand_built():
    targets, probs = build_probs(SAMPLES, 3)
    return analyze_predictions(targets, probs, CLASSES, sample_paths(targets))


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for index, (true, _, _, _) in enumerate(SAMPLES):
        folder = tmp_path / "data" / CLASSES[true]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (40 + index, 60, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{index}.png")
    return tmp_path / "data"


def test_confusion_matrix_hand_built(hand_built):
    expected = np.array([[2, 1, 0], [1, 1, 0], [0, 1, 2]])
    np.testing.assert_array_equal(hand_built.confusion, expected)
    assert hand_built.accuracy == pytest.approx(5 / 8)
    assert hand_built.num_samples == 8


def test_per_class_scores_hand_built(hand_built):
    # Predicted maize: samples 0, 1, 4 (2 right). Predicted rice: 2, 3, 7 (1 right).
    # Predicted wheat: 5, 6 (both right).
    expected = {
        "maize": (2 / 3, 2 / 3, 2 / 3, 3),
        "rice": (1 / 3, 1 / 2, 0.4, 2),
        "wheat": (1.0, 2 / 3, 0.8, 3),
    }
    for score in hand_built.per_class:
        precision, recall, f1, support = expected[score.name]
        assert score.precision == pytest.approx(precision), score.name
        assert score.recall == pytest.approx(recall), score.name
        assert score.f1 == pytest.approx(f1), score.name
        assert score.support == support, score.name
    assert hand_built.macro_f1 == pytest.approx((2 / 3 + 0.4 + 0.8) / 3)


def test_loss_is_mean_cross_entropy(hand_built):
    true_probabilities = [0.90, 0.60, 0.20, 0.80, 0.03, 0.50, 0.85, 0.40]
    expected = -sum(math.log(p) for p in true_probabilities) / len(true_probabilities)
    assert hand_built.loss == pytest.approx(expected)


def test_loss_clips_zero_probability():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    analysis = analyze_predictions(np.array([1, 0]), probs, ["a", "b"], ["a/1.png", "a/2.png"])
    assert math.isfinite(analysis.loss)
    assert analysis.loss == pytest.approx((-math.log(1e-12) - math.log(0.5)) / 2)


def test_top5_only_above_five_classes(hand_built):
    assert hand_built.top5_accuracy is None
    assert "top5_accuracy" not in hand_built.scalar_metrics()


def test_top5_accuracy_seven_classes():
    # The true class ranks 1st, 5th and 6th in the three rows.
    probs = np.array([
        [0.40, 0.10, 0.10, 0.10, 0.10, 0.10, 0.10],
        [0.30, 0.25, 0.20, 0.15, 0.06, 0.04, 0.00],
        [0.30, 0.25, 0.20, 0.15, 0.06, 0.04, 0.00],
    ])
    targets = np.array([0, 4, 5])
    names = [f"c{i}" for i in range(7)]
    analysis = analyze_predictions(targets, probs, names, ["x"] * 3)
    assert analysis.top5_accuracy == pytest.approx(2 / 3)
    assert analysis.accuracy == pytest.approx(1 / 3)


def test_absent_class_still_listed():
    names = ["maize", "rice", "wheat", "millet"]
    targets, probs = build_probs(SAMPLES, 4)
    analysis = analyze_predictions(targets, probs, names, ["x"] * len(SAMPLES))
    assert analysis.confusion.shape == (4, 4)
    assert analysis.confusion[3].sum() == 0
    assert analysis.confusion[:, 3].sum() == 0
    millet = analysis.per_class[3]
    assert (millet.name, millet.precision, millet.recall, millet.f1, millet.support) == ("millet", 0, 0, 0, 0)
    # The absent class does not drag the macro average down.
    assert analysis.macro_f1 == pytest.approx((2 / 3 + 0.4 + 0.8) / 3)


def test_confused_pairs_sorted_by_count():
    matrix = np.array([[5, 3, 1], [0, 4, 6], [2, 0, 7]])
    from crop_accel.analysis import most_confused_pairs

    pairs = most_confused_pairs(matrix, CLASSES)
    summary = [(p.true_class, p.predicted_class, p.count) for p in pairs]
    assert summary == [("rice", "wheat", 6), ("maize", "rice", 3), ("wheat", "maize", 2), ("maize", "wheat", 1)]
    assert pairs[0].share == pytest.approx(6 / 10)
    assert pairs[1].share == pytest.approx(3 / 9)
    assert len(most_confused_pairs(matrix, CLASSES, limit=2)) == 2


def test_worst_errors_order_and_captions(hand_built):
    errors = hand_built.worst_errors
    assert [e.path for e in errors] == ["rice/img_4.png", "maize/img_2.png", "wheat/img_7.png"]
    assert [e.confidence for e in errors] == pytest.approx([0.95, 0.70, 0.55])
    assert [e.true_probability for e in errors] == pytest.approx([0.03, 0.20, 0.40])
    assert errors[0].true_class == "rice"
    assert errors[0].predicted_class == "maize"
    assert errors[0].caption() == "true: rice / pred: maize (p=0.95, p_true=0.03)"


def test_worst_errors_limited_by_num_worst():
    targets, probs = build_probs(SAMPLES, 3)
    analysis = analyze_predictions(targets, probs, CLASSES, sample_paths(targets), num_worst=2)
    assert [e.confidence for e in analysis.worst_errors] == pytest.approx([0.95, 0.70])
    none = analyze_predictions(targets, probs, CLASSES, sample_paths(targets), num_worst=0)
    assert none.worst_errors == []


@pytest.mark.parametrize(
    ("targets", "probs", "paths", "message"),
    [
        ([0, 1], [[2.0, -1.0], [0.5, 3.0]], ["a", "b"], "apply softmax"),
        ([0, 1], [[0.5, 0.5]], ["a", "b"], "shape"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a"], "one path per sample"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], "targets must lie in"),
        ([0.0, 1.0], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], "integer class indices"),
        ([], np.zeros((0, 2)), [], "non-empty"),
    ],
)
def test_invalid_inputs_rejected(targets, probs, paths, message):
    with pytest.raises(ValueError, match=message):
        analyze_predictions(np.asarray(targets), np.asarray(probs), ["a", "b"], paths)


def test_to_dict_is_json(hand_built):
    summary = json.loads(json.dumps(hand_built.to_dict()))
    assert summary["accuracy"] == pytest.approx(5 / 8)
    assert summary["top5_accuracy"] is None
    assert summary["per_class"]["rice"]["support"] == 2
    assert summary["confusion_matrix"]["counts"] == hand_built.confusion.tolist()
    assert summary["worst_errors"][0]["path"] == "rice/img_4.png"
    assert summary["confused_pairs"][0]["count"] == 1


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_write_analysis_files_consistent(hand_built, image_dir, tmp_path):
    output = tmp_path / "out"
    written = write_analysis(hand_built, output, image_dir)
    expected_files = ["confusion_matrix.csv", "per_class.csv", "worst_errors.csv", "confusion_matrix.png", "worst_errors.png"]
    assert sorted(written) == sorted(expected_files)
    assert sorted(p.name for p in output.iterdir()) == sorted(expected_files)

    matrix_rows = read_csv(output / "confusion_matrix.csv")
    assert matrix_rows[0][1:] == CLASSES
    assert [row[0] for row in matrix_rows[1:]] == CLASSES
    counts = np.array([[int(v) for v in row[1:]] for row in matrix_rows[1:]])
    assert np.trace(counts) / counts.sum() == pytest.approx(hand_built.accuracy)

    per_class = read_csv(output / "per_class.csv")
    assert per_class[0] == ["class", "precision", "recall", "f1", "support"]
    assert per_class[2][0] == "rice"
    assert float(per_class[2][3]) == pytest.approx(0.4)
    assert int(per_class[2][4]) == 2

    worst = read_csv(output / "worst_errors.csv")
    assert worst[0] == ["rank", "path", "true_class", "predicted_class", "confidence", "true_probability"]
    assert [row[1] for row in worst[1:]] == ["rice/img_4.png", "maize/img_2.png", "wheat/img_7.png"]

    with Image.open(output / "worst_errors.png") as grid:
        assert grid.format == "PNG"
        assert grid.width > 300
    with Image.open(output / "confusion_matrix.png") as heatmap:
        assert heatmap.format == "PNG"


def test_no_errors_writes_no_grid(tmp_path, caplog):
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    analysis = analyze_predictions(np.array([0, 1]), probs, ["a", "b"], ["a/1.png", "b/1.png"])
    caplog.set_level(logging.INFO, logger="crop_accel.analysis")
    written = write_analysis(analysis, tmp_path / "out", tmp_path)
    assert "worst_errors.png" not in written
    assert not (tmp_path / "out" / "worst_errors.png").exists()
    assert read_csv(tmp_path / "out" / "worst_errors.csv") == [["rank", "path", "true_class", "predicted_class", "confidence", "true_probability"]]
    assert "classified all 2 samples correctly" in caplog.text


def test_failed_plot_keeps_other_files(hand_built, image_dir, tmp_path, caplog):
    output = tmp_path / "out"
    # A folder where the PNG should go makes the final rename fail.
    (output / "confusion_matrix.png").mkdir(parents=True)
    written = write_analysis(hand_built, output, image_dir)
    assert "confusion_matrix.png" not in written
    for name in ("confusion_matrix.csv", "per_class.csv", "worst_errors.csv", "worst_errors.png"):
        assert (output / name).is_file(), name
    assert "Failed to write" in caplog.text
    assert not list(output.glob(".*.tmp"))


def test_grid_survives_unreadable_image(hand_built, image_dir, tmp_path, caplog):
    (image_dir / "rice" / "img_4.png").write_bytes(b"not an image")
    figure = plots.worst_errors_figure(hand_built.worst_errors, image_dir)
    titles = [axes.get_title().replace("\n", " ") for axes in figure.axes]
    assert titles == [e.caption() for e in hand_built.worst_errors]
    assert "Showing a blank tile for rice/img_4.png" in caplog.text
    assert "cannot load image" in figure.axes[0].texts[0].get_text().replace("\n", " ")


def test_heatmap_row_normalised_and_annotated():
    matrix = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    np.testing.assert_allclose(plots.row_normalise(matrix), [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])
    figure = plots.confusion_matrix_figure(matrix, CLASSES)
    axes = figure.axes[0]
    np.testing.assert_allclose(axes.images[0].get_array(), plots.row_normalise(matrix))
    assert sorted(text.get_text() for text in axes.texts) == ["1", "2", "2", "3", "4"]
    assert [label.get_text() for label in axes.get_yticklabels()] == CLASSES


def test_plots_show_dollar_names_literally(image_dir, tmp_path):
    # Read as mathtext, "bean$_$" is a subscript without a base and fails to render.
    names = ["bean$_$", "rice", "wheat"]
    path = plots.plot_confusion_matrix(np.eye(3, dtype=int), names, tmp_path / "matrix.png")
    assert path.is_file()

    targets, probs = build_probs(SAMPLES, 3)
    analysis = analyze_predictions(targets, probs, names, sample_paths(targets))
    grid = plots.plot_worst_errors(analysis.worst_errors, image_dir, tmp_path / "grid.png")
    assert grid.is_file()


def test_heatmap_unannotated_above_30_classes():
    matrix = np.eye(31, dtype=int) * 2
    figure = plots.confusion_matrix_figure(matrix, [f"class_{i}" for i in range(31)])
    assert len(figure.axes[0].texts) == 0


def test_training_curves_two_panels(tmp_path):
    history = [
        {"epoch": 0, "train_loss": 1.0, "train_acc": 0.4, "val_loss": 1.1, "val_acc": 0.35},
        {"epoch": 1, "train_loss": 0.6, "train_acc": 0.7, "val_loss": None, "val_acc": None},
        {"epoch": 2, "train_loss": 0.4, "train_acc": 0.8, "val_loss": 0.5, "val_acc": 0.75},
    ]
    figure = plots.training_curves_figure(history)
    loss_axes, accuracy_axes = figure.axes
    assert loss_axes.get_title() == "Loss"
    assert accuracy_axes.get_title() == "Accuracy"
    train_line, val_line = accuracy_axes.get_lines()
    np.testing.assert_allclose(train_line.get_ydata(), [0.4, 0.7, 0.8])
    np.testing.assert_allclose(val_line.get_ydata(), [0.35, np.nan, 0.75])

    path = plots.plot_training_curves(history, tmp_path / "curves.png")
    with Image.open(path) as image:
        assert image.size == (1100, 450)
    with pytest.raises(ValueError, match="history is empty"):
        plots.plot_training_curves([], tmp_path / "empty.png")


def test_atomic_output_keeps_old_file(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with plots.atomic_output(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_print_analysis_tables(hand_built):
    console = Console(record=True, width=120)
    print_analysis(hand_built, console)
    text = console.export_text()
    assert "accuracy 0.625" in text
    assert "Per-class scores" in text
    assert "Most-confused class pairs" in text
    rice_row = next(line for line in text.splitlines() if "rice" in line and "0.400" in line)
    assert "0.333" in rice_row
    assert "rice" in text.split("Most-confused class pairs")[1]


def test_print_analysis_literal_class_names():
    targets, probs = build_probs(SAMPLES, 3)
    names = ["maize", "rice [red]", "wheat"]
    analysis = analyze_predictions(targets, probs, names, ["x"] * len(SAMPLES))
    console = Console(record=True, width=120)
    print_analysis(analysis, console)
    per_class, pairs = console.export_text().split("Most-confused class pairs")
    assert "rice [red]" in per_class
    true_columns = [line.split("│")[1].strip() for line in pairs.splitlines() if line.startswith("│")]
    predicted_columns = [line.split("│")[2].strip() for line in pairs.splitlines() if line.startswith("│")]
    assert "rice [red]" in true_columns
    assert "rice [red]" in predicted_columns
