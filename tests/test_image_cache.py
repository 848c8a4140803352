import numpy as np
import pytest
import torch

from conftest import make_image_folder
from crop_accel.data import ImageFolderDataset, build_transforms
from crop_accel.image_cache import DecodedImageCache, cache_min_side

DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


@pytest.fixture
def samples(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4, size=80)
    paths = sorted(path.relative_to(root).as_posix() for path in root.rglob("img_*"))
    return root, [(path, 0) for path in paths]


def dataset_pair(root, samples, transform, seed=None):
    uncached = ImageFolderDataset(root, samples, transform, seed)
    uncached.min_side = cache_min_side(DATA_CONFIG)
    cached = ImageFolderDataset(root, samples, transform, seed)
    cache = DecodedImageCache(root, cache_min_side(DATA_CONFIG))
    cache.fill([path for path, _ in samples])
    cached.cache = cache
    return uncached, cached


def test_cache_min_side_follows_crop_pct():
    assert cache_min_side({"input_size": (3, 224, 224), "crop_pct": 0.875}) == 256
    assert cache_min_side({"input_size": (3, 224, 224), "crop_pct": 1.0}) == 224


def test_cached_equals_uncached_without_augmentation(samples):
    root, items = samples
    _, eval_transform = build_transforms(DATA_CONFIG)
    uncached, cached = dataset_pair(root, items, eval_transform)
    for index in range(len(items)):
        assert torch.equal(uncached[index][0], cached[index][0])


def test_cached_equals_uncached_with_seeded_augmentation(samples):
    root, items = samples
    train_transform, _ = build_transforms(DATA_CONFIG)
    uncached, cached = dataset_pair(root, items, train_transform, seed=3)
    for dataset in (uncached, cached):
        dataset.set_epoch(2)
    for index in range(len(items)):
        assert torch.equal(uncached[index][0], cached[index][0])


def test_seeded_augmentation_changes_with_epoch(samples):
    root, items = samples
    train_transform, _ = build_transforms(DATA_CONFIG)
    dataset = ImageFolderDataset(root, items, train_transform, seed=3)
    dataset.set_epoch(1)
    first = dataset[0][0]
    assert torch.equal(first, dataset[0][0])
    dataset.set_epoch(2)
    assert not torch.equal(first, dataset[0][0])


def test_cache_stores_downscaled_uint8(samples):
    root, items = samples
    cache = DecodedImageCache(root, 40)
    cache.fill([path for path, _ in items])
    image = cache.get(items[0][0])
    assert min(image.size) == 40
    assert np.asarray(image).dtype == np.uint8
    assert cache.nbytes == len(items) * 40 * 40 * 3


def test_cache_decodes_missing_entry(samples):
    root, items = samples
    cache = DecodedImageCache(root, 40)
    assert items[0][0] not in cache
    cache.get(items[0][0])
    assert items[0][0] in cache
