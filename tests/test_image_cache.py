import numpy as np
import pytest
import torch

from conftest import make_image_folder, make_photo
from crop_accel import image_cache
from crop_accel.data import ImageFolderDataset, attach_image_cache, build_training_data, build_transforms
from crop_accel.image_cache import DecodedImageCache, cache_min_side, check_cache_fits, estimate_cache_bytes
from crop_accel.scan import DataError, scan_image_folder

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


def test_estimate_matches_filled_cache(tmp_path):
    sizes = [(300, 200), (97, 301), (40, 30), (1000, 999)]
    folder = tmp_path / "data" / "wheat"
    folder.mkdir(parents=True)
    paths = []
    for index, size in enumerate(sizes):
        make_photo(index, size=size).save(folder / f"photo_{index}.jpg")
        paths.append(f"wheat/photo_{index}.jpg")
    cache = DecodedImageCache(tmp_path / "data", 64)
    cache.fill(paths)
    assert estimate_cache_bytes(sizes, 64) == cache.nbytes


def test_estimate_keeps_small_images():
    assert estimate_cache_bytes([(1000, 500)], 256) == 512 * 256 * 3
    assert estimate_cache_bytes([(100, 80)], 256) == 100 * 80 * 3


def test_cache_fit_accepts_half_of_memory():
    check_cache_fits(2 * 2**30, processes=2, available=8 * 2**30)


def test_cache_fit_rejects_too_large():
    with pytest.raises(DataError) as raised:
        check_cache_fits(3 * 2**30, processes=2, available=8 * 2**30)
    message = str(raised.value)
    assert "--cache-images needs about 6.0 GiB" in message
    assert "2 process(es) on this node, 3.0 GiB each" in message
    assert "8.0 GiB of memory available" in message
    assert "train without --cache-images or with a smaller --image-size" in message


def test_attach_cache_checks_memory_first(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "data", per_class=4, size=80)
    scan = scan_image_folder(root)
    data = build_training_data(scan, DATA_CONFIG, val_fraction=0.25, seed=0, group_duplicates=True)
    # Each process caches 12 images at 37 x 37 pixels; eight of them need all the memory.
    per_process = 12 * 37 * 37 * 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(image_cache, "available_memory_bytes", lambda: 8 * per_process)
    with pytest.raises(DataError, match="8 process"):
        attach_image_cache(data, DATA_CONFIG)
    assert data.train_set.cache is None
