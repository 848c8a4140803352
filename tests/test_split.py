from collections import Counter

import pytest

from crop_accel.data import split_train_val


def _labels(counts: list[int]) -> list[int]:
    return [label for label, count in enumerate(counts) for _ in range(count)]


def test_split_is_stratified():
    labels = _labels([30, 20, 10])
    split = split_train_val(labels, val_fraction=0.2, seed=0)
    val_counts = Counter(labels[i] for i in split.val)
    assert val_counts == {0: 6, 1: 4, 2: 2}


def test_split_covers_every_sample_once():
    labels = _labels([7, 5, 3])
    split = split_train_val(labels, val_fraction=0.2, seed=1)
    assert sorted(split.train + split.val) == list(range(len(labels)))
    assert not set(split.train) & set(split.val)


def test_split_every_class_in_both_subsets():
    labels = _labels([2, 3, 40])
    split = split_train_val(labels, val_fraction=0.2, seed=2)
    assert {labels[i] for i in split.train} == {0, 1, 2}
    assert {labels[i] for i in split.val} == {0, 1, 2}


def test_split_same_seed_same_result():
    labels = _labels([25, 25])
    first = split_train_val(labels, 0.2, seed=7)
    second = split_train_val(labels, 0.2, seed=7)
    other = split_train_val(labels, 0.2, seed=8)
    assert first.val == second.val
    assert first.val != other.val


def test_split_keeps_groups_together():
    labels = _labels([20, 20])
    # Pairs of copies: samples 2k and 2k+1 are one photo saved twice.
    groups = [f"g{i // 2}" for i in range(len(labels))]
    for seed in range(10):
        split = split_train_val(labels, 0.2, seed=seed, groups=groups)
        val_groups = {groups[i] for i in split.val}
        train_groups = {groups[i] for i in split.train}
        assert not val_groups & train_groups


def test_split_single_group_class_stays_in_train():
    labels = _labels([2, 10])
    groups = ["copy", "copy"] + [str(i) for i in range(10)]
    split = split_train_val(labels, 0.2, seed=0, groups=groups)
    assert {0, 1} <= set(split.train)
    assert {labels[i] for i in split.val} == {1}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_invalid_fraction(fraction):
    with pytest.raises(ValueError, match="--val-fraction"):
        split_train_val([0, 0, 1, 1], fraction, seed=0)
