"""Exact and near-duplicate detection: hashes of generated photos and transitive grouping."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from conftest import make_photo
from crop_accel.duplicates import (
    DEFAULT_NEAR_DUPLICATE_THRESHOLD,
    difference_hash,
    find_duplicates,
    find_near_pairs,
    hash_distance,
)



def reencode(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_difference_hash_is_64_bits_hex():
    value = difference_hash(make_photo(0))
    assert len(value) == 16
    assert int(value, 16) >= 0


def test_hash_distance_counts_bits():
    assert hash_distance("0000000000000000", "0000000000000000") == 0
    assert hash_distance("0000000000000000", "ffffffffffffffff") == 64
    assert hash_distance("00000000000000f0", "000000000000000f") == 8


@pytest.mark.parametrize("seed", range(5))
def test_reencoded_copy_matches(seed):
    photo = make_photo(seed)
    distance = hash_distance(difference_hash(reencode(photo, 95)), difference_hash(reencode(photo, 40)))
    assert distance <= DEFAULT_NEAR_DUPLICATE_THRESHOLD


@pytest.mark.parametrize("seed", range(5))
def test_half_size_copy_matches(seed):
    photo = make_photo(seed)
    half = reencode(photo.resize((photo.width // 2, photo.height // 2), Image.Resampling.BILINEAR), 80)
    distance = hash_distance(difference_hash(photo), difference_hash(half))
    assert distance <= DEFAULT_NEAR_DUPLICATE_THRESHOLD


def test_different_photos_of_same_colour_do_not_match():
    hashes = [difference_hash(make_photo(seed)) for seed in range(100, 112)]
    closest = min(hash_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :])
    assert closest > DEFAULT_NEAR_DUPLICATE_THRESHOLD


def test_find_near_pairs_matches_brute_force():
    # More hashes than one block of rows, so pairs across block edges are covered.
    rng = random.Random(3)
    hashes = [f"{rng.getrandbits(64):016x}" for _ in range(1100)]
    for source in range(0, 1100, 50):
        near = int(hashes[source], 16) ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64))
        hashes[(source + 525) % 1100] = f"{near:016x}"
    threshold = 12

    expected = [
        (i, j, hash_distance(hashes[i], hashes[j]))
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if hash_distance(hashes[i], hashes[j]) <= threshold
    ]
    found = find_near_pairs(hashes, threshold)
    assert sorted(found) == expected
    assert len(expected) >= 22


def test_exact_copies_pair_as_exact():
    report = find_duplicates(
        ["a/1.jpg", "a/2.jpg", "a/3.jpg"],
        [0, 0, 0],
        ["same", "same", "other"],
        ["0000000000000000", "0000000000000000", "ffffffffffffffff"],
    )
    assert [(p.first, p.second, p.kind, p.distance) for p in report.pairs] == [("a/1.jpg", "a/2.jpg", "exact", 0)]
    assert report.groups["a/2.jpg"] == "a/1.jpg"
    assert report.groups["a/3.jpg"] == "a/3.jpg"


def test_groups_join_transitively():
    # 1 is 8 bits from 2 and 2 is 8 bits from 3, but 1 and 3 are 16 bits apart.
    report = find_duplicates(
        ["c/1.jpg", "c/2.jpg", "c/3.jpg", "c/4.jpg"],
        [0, 0, 0, 0],
        ["d1", "d2", "d3", "d4"],
        ["0000000000000000", "00000000000000ff", "000000000000ffff", "ffffffffffff0000"],
        threshold=8,
    )
    assert {(p.first, p.second) for p in report.pairs} == {("c/1.jpg", "c/2.jpg"), ("c/2.jpg", "c/3.jpg")}
    assert {report.groups[path] for path in ("c/1.jpg", "c/2.jpg", "c/3.jpg")} == {"c/1.jpg"}
    assert report.groups["c/4.jpg"] == "c/4.jpg"
    assert report.group_members() == {"c/1.jpg": ["c/1.jpg", "c/2.jpg", "c/3.jpg"]}
    assert report.conflicts == []


def test_group_across_classes_is_conflict():
    report = find_duplicates(
        ["maize/a.jpg", "rice/b.jpg", "rice/c.jpg"],
        [0, 1, 1],
        ["d1", "d2", "d3"],
        ["0000000000000000", "0000000000000003", "ffffffffffffffff"],
    )
    assert report.conflicts == [["maize/a.jpg", "rice/b.jpg"]]
    assert report.pairs[0].kind == "near"
    assert report.pairs[0].distance == 2


def test_negative_threshold_finds_exact_only():
    report = find_duplicates(
        ["a/1.jpg", "a/2.jpg", "a/3.jpg"],
        [0, 0, 0],
        ["x", "x", "y"],
        ["0000000000000000", "0000000000000000", "0000000000000000"],
        threshold=-1,
    )
    assert [pair.kind for pair in report.pairs] == ["exact"]
    assert report.groups["a/3.jpg"] == "a/3.jpg"


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="same length"):
        find_duplicates(["a"], [0, 1], ["x"], ["0" * 16])
