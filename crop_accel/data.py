"""Train/validation split, the image dataset and timm's transforms for the chosen model."""

from __future__ import annotations

import csv
import logging
import multiprocessing
import random
import signal
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import timm.data
import torch
from torch.utils.data import DataLoader, Dataset

from crop_accel.image_cache import DecodedImageCache, cache_min_side, check_cache_fits, estimate_cache_bytes
from crop_accel.images import load_rgb
from crop_accel.runtime import local_process_count, usable_cpu_cores
from crop_accel.scan import ScanResult

logger = logging.getLogger(__name__)


@dataclass
class Split:
    """Indices into the scanned samples, and each sample's duplicate group."""

    train: list[int]
    val: list[int]
    groups: list[str]


def split_train_val(
    labels: list[int],
    val_fraction: float,
    seed: int,
    groups: list[str] | None = None,
) -> Split:
    """Split samples per class into train and validation, keeping each group on one side.

    Per class, the groups are shuffled with ``seed`` and moved to validation until it
    contains round(class size x val_fraction) images, at least one. A group never
    straddles the split, so copies of one photo cannot leak into validation. The last
    group of a class always stays in train. A class that is a single group therefore
    has no validation images, and a warning names it. A group whose images carry
    several labels is assigned by its first sample's class.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if groups is None:
        groups = [str(i) for i in range(len(labels))]

    members: dict[str, list[int]] = defaultdict(list)
    group_label: dict[str, int] = {}
    for index, (label, group) in enumerate(zip(labels, groups)):
        members[group].append(index)
        group_label.setdefault(group, label)

    groups_by_class: dict[int, list[str]] = defaultdict(list)
    for group in sorted(members):
        groups_by_class[group_label[group]].append(group)

    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(groups_by_class):
        class_groups = groups_by_class[label]
        rng.shuffle(class_groups)
        class_size = sum(len(members[g]) for g in class_groups)
        target = max(1, round(class_size * val_fraction))

        taken = 0
        for position, group in enumerate(class_groups):
            is_last = position == len(class_groups) - 1
            if taken < target and not is_last:
                val.extend(members[group])
                taken += len(members[group])
            else:
                train.extend(members[group])
        if taken == 0:
            logger.warning("Class %d has a single duplicate group; all its images are in train", label)

    return Split(train=sorted(train), val=sorted(val), groups=list(groups))


def write_split_csv(path: Path, samples: list[tuple[str, int]], classes: list[str], split: Split) -> None:
    """Write one row per image: path, class, subset and duplicate group."""
    subset = {index: "train" for index in split.train}
    subset.update({index: "val" for index in split.val})
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "class", "label", "subset", "group"])
        for index, (relative, label) in enumerate(samples):
            writer.writerow([relative, classes[label], label, subset.get(index, "unused"), split.groups[index]])


class ImageFolderDataset(Dataset):
    """Images listed as (path relative to root, label); items are (tensor, label, index).

    The index lets evaluation map gathered predictions back to file paths. With
    ``seed``, the random augmentation of an image depends only on (seed, epoch, index),
    not on which worker loads it or when. A resumed run therefore gets the same
    augmented batches as an uninterrupted one, whatever the number of workers.
    """

    def __init__(self, root: str | Path, samples: list[tuple[str, int]], transform, seed: int | None = None):
        self.root = Path(root)
        self.samples = samples
        self.transform = transform
        self.seed = seed
        # Optional: decode at this short side (as the cache does), or read from a filled cache.
        self.min_side: int | None = None
        self.cache: DecodedImageCache | None = None
        # Shared memory, so persistent worker processes see the epoch set by the main process.
        self._epoch = multiprocessing.Value("l", 0, lock=False)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used for augmentation seeds; accelerate's loader calls this."""
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        relative, label = self.samples[index]
        if self.cache is not None:
            image = self.cache.get(relative)
        else:
            image = load_rgb(self.root / relative, min_side=self.min_side)
        if self.seed is None:
            return self.transform(image), label, index
        return self._seeded_transform(image, index), label, index

    def _seeded_transform(self, image, index: int):
        # timm's transforms draw from Python's random module and torchvision's from torch.
        # Both are reseeded for this sample, then restored so the caller's streams go on.
        sample_seed = (self.seed * 1_000_003 + self._epoch.value * 100_003 + index) % (2**63)
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            torch.manual_seed(sample_seed)
            tensor = self.transform(image)
        random.setstate(python_state)
        return tensor


def resolve_data_config(model: torch.nn.Module, image_size: int | None) -> dict:
    """Return timm's data config for ``model``, with ``image_size`` overriding its input size."""
    config = timm.data.resolve_model_data_config(model)
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    return config


def build_transforms(data_config: dict):
    """Return (train, eval) transforms from timm's factory.

    Train: random resized crop and horizontal flip, with timm's colour jitter off.
    Eval: resize by crop_pct, then center crop.
    """
    train = timm.data.create_transform(**data_config, is_training=True, color_jitter=None)
    evaluation = timm.data.create_transform(**data_config, is_training=False)
    return train, evaluation


def resolve_num_workers(requested: int | None, device: torch.device) -> int:
    """Return ``requested``, else a worker count from this process's share of the usable CPU cores.

    The node's training processes share the cores. With a GPU, the workers get all of a
    process's cores but the one that runs the training loop, up to 8. On the CPU, the
    model's own threads already use every core, and decoding and augmentation cost only a
    few percent of a training step. The workers then get one core in eight, so below 8
    cores the training process loads its batches itself.
    """
    if requested is not None:
        return requested
    cores_per_process = usable_cpu_cores() // local_process_count()
    if device.type == "cpu":
        # NOTE: one core in eight rests on measurements on 2 cores only, where loading took
        # 1.5-5% of the CPU time of a tf_efficientnet_lite0 training step (docs/benchmarks.md).
        return min(8, cores_per_process // 8)
    return max(0, min(8, cores_per_process - 1))


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int) -> DataLoader:
    """Build a DataLoader; training drops the last partial batch to keep BatchNorm stable.

    The shuffled order comes from accelerate's seedable sampler after ``prepare``, which
    reseeds this generator every epoch. The loader's own random draws (worker base seeds)
    then come from it too, not from the global torch RNG, so starting a loader in the
    middle of an epoch on resume does not shift the dropout masks of later steps.
    """
    generator = torch.Generator()
    generator.manual_seed(0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=generator,
        worker_init_fn=ignore_stop_signals,
    )


def ignore_stop_signals(worker_id: int) -> None:
    """Make a loader worker ignore SIGTERM and SIGINT.

    Schedulers signal the whole process group. The training process then finishes its
    step and checkpoints, which needs its workers alive. They end with it.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class TrainingData:
    """The scanned folder, its split and the two datasets built from it."""

    scan: ScanResult
    split: Split
    train_set: ImageFolderDataset
    val_set: ImageFolderDataset


def build_training_data(scan: ScanResult, data_config: dict, val_fraction: float, seed: int, group_duplicates: bool) -> TrainingData:
    """Split the scanned images, keeping duplicate groups together, and build both datasets."""
    labels = [label for _, label in scan.samples]
    groups = None
    if group_duplicates and getattr(scan, "groups", None):
        groups = [scan.groups[path] for path, _ in scan.samples]
    split = split_train_val(labels, val_fraction, seed, groups)

    train_transform, eval_transform = build_transforms(data_config)
    train_set = ImageFolderDataset(scan.data_dir, [scan.samples[i] for i in split.train], train_transform, seed)
    val_set = ImageFolderDataset(scan.data_dir, [scan.samples[i] for i in split.val], eval_transform)
    return TrainingData(scan=scan, split=split, train_set=train_set, val_set=val_set)


def attach_image_cache(data: TrainingData, data_config: dict, on_image=None) -> DecodedImageCache:
    """Decode every train and validation image once into a shared in-memory cache.

    Raises DataError before decoding anything when the caches of this node's processes
    would not fit in memory.
    """
    min_side = cache_min_side(data_config)
    paths = [path for path, _ in data.train_set.samples + data.val_set.samples]
    stored_sizes = [(data.scan.files[path].width, data.scan.files[path].height) for path in paths if path in data.scan.files]
    check_cache_fits(estimate_cache_bytes(stored_sizes, min_side), local_process_count())
    cache = DecodedImageCache(data.scan.data_dir, min_side)
    cache.fill(paths, on_image)
    for dataset in (data.train_set, data.val_set):
        dataset.cache = cache
        dataset.min_side = cache.min_side
    return cache
