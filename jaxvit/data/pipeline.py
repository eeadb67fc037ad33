"""Data: random-access sources and deterministic grain pipelines.

A source is any object with ``__len__``, ``__getitem__(i) -> (uint8 (H, W, C), int label)``
and ``class_names``. ``train_batches`` turns one into an endless stream of
*global* batches in an order fixed by the seed alone: global batch ``j`` holds
the examples at positions ``j*B ... (j+1)*B - 1`` of a per-epoch permutation,
and each process loads and augments only its own slice of it. So the global
batch sequence does not depend on how many hosts or devices run it, each
example's augmentation depends only on ``(seed, position)``, and the iterator
state (the next batch index) is all a checkpoint needs to resume exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np
from absl import flags

from jaxvit.data import augment
from jaxvit.data.images import decode_image, is_image
from jaxvit.data.packed import PackedSource
from jaxvit.sizes import to_pair

log = logging.getLogger(__name__)


class Source(Protocol):
    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


class DigitsSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as uint8 ``(8, 8, 1)``.

    The train/test split is stratified and fixed by ``split_seed``; the two
    splits never share an image.
    """

    def __init__(self, split: str, test_fraction: float = 0.2, split_seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "test"):
            raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        indices = np.arange(len(images))
        train_idx, test_idx = train_test_split(
            indices, test_size=test_fraction, random_state=split_seed, stratify=digits.target
        )
        chosen = np.sort(train_idx if split == "train" else test_idx)
        self.indices = chosen
        self.images = images[chosen]
        self.labels = digits.target[chosen].astype(np.int32)
        self.class_names = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


class SyntheticSource:
    """Random uint8 images of any shape, label ``i % num_classes``: for benchmarks and smoke runs."""

    def __init__(
        self, num_examples: int, image_size: tuple[int, int], channels: int, num_classes: int, seed: int = 0
    ):
        self.num_examples = num_examples
        self.shape = (*image_size, channels)
        self.seed = seed
        self.class_names = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, index])
        return rng.integers(0, 256, self.shape, dtype=np.uint8), index % len(self.class_names)


@dataclasses.dataclass(frozen=True)
class FolderScan:
    files: list[str]
    labels: list[int]
    class_names: list[str]
    skipped: list[str]


def list_classes(directory: str) -> list[str]:
    """The sorted sub-directory names of ``directory`` (hidden ones left out).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the path for a missing
    directory or one without class sub-directories.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"image folder {directory!r} does not exist or is not a directory")
    class_names = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not class_names:
        raise ValueError(
            f"image folder {directory!r} has no class sub-directories (expected {directory}/<class>/*)"
        )
    return class_names


def list_class_files(class_dir: str) -> list[str]:
    """The paths of the files in ``class_dir``, sorted by name (hidden files left out)."""
    entries = sorted(os.scandir(class_dir), key=lambda e: e.name)
    return [e.path for e in entries if e.is_file() and not e.name.startswith(".")]


def scan_image_folder(directory: str, check_images: bool = True) -> FolderScan:
    """Lists ``directory/<class>/<file>``; classes are the sorted sub-directory names.

    Files Pillow cannot identify (corrupt, or not images) are returned in
    ``skipped``. Raises ``FileNotFoundError`` / ``ValueError`` naming the path
    for a missing or empty directory or a class without images.
    """
    class_names = list_classes(directory)
    files, labels, skipped = [], [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(directory, name)
        count = 0
        for path in list_class_files(class_dir):
            if check_images and not is_image(path):
                skipped.append(path)
                continue
            files.append(path)
            labels.append(label)
            count += 1
        if count == 0:
            raise ValueError(f"class {name!r} has no readable images in {class_dir!r}")
    return FolderScan(files, labels, class_names, skipped)


def report_skipped(skipped: Sequence[str], where: str, on_corrupt: str) -> None:
    """Unreadable files: one warning that counts them (``on_corrupt="skip"``), or a ``ValueError``
    naming them (``"error"``)."""
    if on_corrupt not in ("skip", "error"):
        raise ValueError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
    if not skipped:
        return
    shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
    if on_corrupt == "error":
        raise ValueError(f"{len(skipped)} unreadable file(s) in {where}: {shown}")
    log.warning("skipped %d unreadable file(s) in %s: %s", len(skipped), where, shown)


class ImageFolderSource:
    """``root/<split>/<class>/*`` images decoded with Pillow to uint8 ``(H, W, channels)``.

    ``on_corrupt="skip"`` drops unreadable files with one warning that counts
    them; ``"error"`` raises naming them. A file that passes the scan but fails
    to decode later raises an error naming it (never a silent substitute).
    16-bit grayscale files are scaled to 8 bits; 32-bit integer and float
    files raise, as their range is unknown.
    """

    def __init__(self, root: str, split: str, channels: int = 3, on_corrupt: str = "skip"):
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        scan = scan_image_folder(os.path.join(root, split))
        report_skipped(scan.skipped, f"{root}/{split}", on_corrupt)
        self.files, self.labels, self.class_names = scan.files, scan.labels, scan.class_names
        self.skipped = scan.skipped
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path = self.files[index]
        return decode_image(path, self.channels, path), self.labels[index]


def check_same_classes(train: Source, val: Source, root: str) -> None:
    """Raises ``ValueError`` naming both lists when train and val classes differ."""
    if list(train.class_names) != list(val.class_names):
        only_train = sorted(set(train.class_names) - set(val.class_names))
        only_val = sorted(set(val.class_names) - set(train.class_names))
        raise ValueError(
            f"train and val classes differ in {root!r}: only in train {only_train}, only in val {only_val}"
        )


class TfdsSource:
    """A TFDS dataset prepared on disk in ArrayRecord format, read with random access
    (``tfds.data_source``; TensorFlow is not needed to read it).

    ``name`` may carry a version (``"imagenet2012:5.1.0"``). Raises naming what
    is wrong when the dataset is not prepared under ``data_dir``, the split does
    not exist (listing the splits), the files are not ArrayRecord, or the
    features are not an ``image`` and a ``label`` with class names.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, channels: int = 3):
        try:
            import tensorflow_datasets as tfds
        except ImportError as err:
            raise ImportError(
                "dataset 'tfds:...' needs tensorflow_datasets (pip install tensorflow-datasets)"
            ) from err
        where = f"under {data_dir!r}" if data_dir else "in the default TFDS data_dir"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as err:
            builder, reason = None, str(err).splitlines()[0]
        if builder is None or not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared {where} (set config.data.tfds_data_dir)"
                + (f": {reason}" if builder is None else "")
            )
        info = builder.info
        if split not in info.splits:
            raise ValueError(
                f"TFDS dataset {name!r} has no split {split!r}: it has {sorted(info.splits)}"
                " (set config.data.train_split / config.data.val_split)"
            )
        file_format = getattr(info.file_format, "value", info.file_format)
        if file_format != "array_record":
            raise ValueError(
                f"TFDS dataset {name!r} {where} is stored as {file_format!r}, which has no random access;"
                " prepare it with file_format='array_record' (tfds build --file_format=array_record)"
            )
        features = info.features
        if "image" not in features or "label" not in features or not hasattr(features["label"], "names"):
            raise ValueError(
                f"TFDS dataset {name!r} needs an 'image' feature and a 'label' ClassLabel feature;"
                f" it has {sorted(features.keys())}"
            )
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        self.class_names = list(features["label"].names)
        self.channels = channels

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        record = self._source[index]
        image = np.asarray(record["image"], np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[-1] != self.channels:
            image = augment.from_pil(augment.to_pil(image), self.channels)
        return image, int(record["label"])


DATASETS = ("digits", "synthetic", "imagefolder", "arrayrecord", "tfds:<name>")


def make_source(config: Any, split: str) -> Source:
    """The source named by ``config.dataset`` for ``split`` ("train" or "test").

    ``arrayrecord`` checks its shards (presence, size, record count, SHA-256
    unless ``data.verify_checksums`` is off) and that train and val name the
    same classes here, before anything trains.
    """
    name = config.dataset
    data = config.data
    if name == "digits":
        return DigitsSource(split, data.test_fraction, data.split_seed)
    if name == "synthetic":
        size = to_pair(config.image_size)
        count = data.synthetic_examples if split == "train" else max(1, data.synthetic_examples // 10)
        return SyntheticSource(
            count, size, config.num_channels, config.num_classes, seed=0 if split == "train" else 1
        )
    folder, other = (
        (data.train_split, data.val_split) if split == "train" else (data.val_split, data.train_split)
    )
    if name == "imagefolder":
        if not data.root:
            raise ValueError("dataset='imagefolder' needs config.data.root (a folder with train/ and val/)")
        return ImageFolderSource(data.root, folder, config.num_channels, data.on_corrupt)
    if name == "arrayrecord":
        if not data.root:
            raise ValueError(
                "dataset='arrayrecord' needs config.data.root (a folder written by 'python -m jaxvit.pack')"
            )

        return PackedSource(
            data.root,
            folder,
            config.num_channels,
            other_split=other,
            verify_checksums=data.verify_checksums,
        )
    if name.startswith("tfds:"):
        return TfdsSource(name[5:], folder, data.tfds_data_dir or None, config.num_channels)
    raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(repr(d) for d in DATASETS)}")


# ---------------------------------------------------------------------------
# Per-example transforms
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How one example becomes a float32 ``(H, W, C)`` model input."""

    image_size: tuple[int, int]
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    crop_fraction: float = 1.0  # eval: central fraction of the shorter side kept
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_padding: int = 0
    flip: bool = False
    randaugment_num_ops: int = 0
    randaugment_magnitude: float = 10.0
    randaugment_prob: float = 0.5

    def train(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.random_resized_crop:
            image = augment.random_resized_crop(image, rng, self.image_size, self.crop_scale)
        else:
            image = augment.center_crop(image, self.image_size, self.crop_fraction)
        image = augment.pad_and_random_crop(image, rng, self.crop_padding)
        if self.flip:
            image = augment.random_flip(image, rng)
        image = augment.randaugment(
            image, rng, self.randaugment_num_ops, self.randaugment_magnitude, self.randaugment_prob
        )
        return augment.normalize(image, self.mean, self.std)

    def eval(self, image: np.ndarray) -> np.ndarray:
        image = augment.center_crop(image, self.image_size, self.crop_fraction)
        return augment.normalize(image, self.mean, self.std)


def preprocess_from_config(config: Any) -> Preprocess:
    aug = config.augment
    return Preprocess(
        image_size=to_pair(config.image_size),
        mean=tuple(config.data.mean),
        std=tuple(config.data.std),
        crop_fraction=config.data.crop_fraction,
        random_resized_crop=aug.random_resized_crop,
        crop_scale=tuple(aug.crop_scale),
        crop_padding=aug.crop_padding,
        flip=aug.flip,
        randaugment_num_ops=aug.randaugment_num_ops,
        randaugment_magnitude=aug.randaugment_magnitude,
        randaugment_prob=aug.randaugment_prob,
    )


# ---------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Which slice of every global batch this process loads."""

    global_batch: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.global_batch % self.process_count:
            raise ValueError(
                f"the global batch size {self.global_batch} is not divisible by the number of"
                f" processes {self.process_count}"
            )

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    def global_position(self, local_index: int) -> int:
        """The position in the global example stream of this process's ``local_index``-th example."""
        batch, offset = divmod(local_index, self.local_batch)
        return batch * self.global_batch + self.process_index * self.local_batch + offset


class _TrainExample(grain.transforms.Map):
    """Local example index -> augmented example (picklable, for worker processes)."""

    def __init__(self, source: Source, layout: BatchLayout, preprocess: Preprocess, seed: int):
        self.source, self.layout, self.preprocess, self.seed = source, layout, preprocess, seed
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        return self._perms[epoch]

    def map(self, local_index: int) -> dict[str, np.ndarray]:
        position = self.layout.global_position(int(local_index))
        epoch, offset = divmod(position, len(self.source))
        image, label = self.source[int(self._permutation(epoch)[offset])]
        rng = np.random.default_rng([self.seed, 1, position])
        return {"image": self.preprocess.train(image, rng), "label": np.int32(label)}


def train_batches(
    source: Source,
    layout: BatchLayout,
    preprocess: Preprocess,
    *,
    seed: int,
    num_steps: int,
    workers: int = 0,
) -> grain.DatasetIterator:
    """Iterator of this process's slices of ``num_steps`` global batches:
    ``{"image": (L, H, W, C) float32, "label": (L,) int32}`` with ``L = layout.local_batch``.

    ``iterator.get_state()`` / ``set_state()`` save and restore its position.
    """
    if len(source) == 0:
        raise ValueError("the training source is empty")
    dataset = grain.MapDataset.range(num_steps * layout.local_batch)
    dataset = dataset.map(_TrainExample(source, layout, preprocess, seed))
    dataset = dataset.batch(layout.local_batch, drop_remainder=True)
    iter_dataset = dataset.to_iter_dataset()
    return iter(with_workers(iter_dataset, workers) if workers > 0 else iter_dataset)


def with_workers(dataset: grain.IterDataset, workers: int) -> grain.IterDataset:
    """``dataset`` loaded by ``workers`` grain worker processes, which exit with this one."""
    # grain's worker set-up reads its absl flags; outside an absl app (a notebook,
    # pytest) they were never parsed, and defaults are what we want.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_exit_with_parent
    )


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Runs in each grain worker: exit once the training process is gone.

    A trainer killed with SIGKILL cannot stop its workers, and a worker blocked
    on a full queue would otherwise wait forever.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


class _EvalExample(grain.transforms.Map):
    def __init__(self, source: Source, layout: BatchLayout, preprocess: Preprocess):
        self.source, self.layout, self.preprocess = source, layout, preprocess

    def map(self, local_index: int) -> dict[str, np.ndarray]:
        position = self.layout.global_position(int(local_index))
        if position >= len(self.source):  # padding of the last batch: weight 0
            image, _ = self.source[0]
            return {"image": self.preprocess.eval(image), "label": np.int32(0), "mask": np.float32(0.0)}
        image, label = self.source[position]
        return {"image": self.preprocess.eval(image), "label": np.int32(label), "mask": np.float32(1.0)}


def eval_batches(
    source: Source, layout: BatchLayout, preprocess: Preprocess
) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, in global batches padded at the end (``mask`` 0 marks padding)."""
    num_batches = math.ceil(len(source) / layout.global_batch)
    dataset = grain.MapDataset.range(num_batches * layout.local_batch)
    dataset = dataset.map(_EvalExample(source, layout, preprocess))
    return iter(dataset.batch(layout.local_batch, drop_remainder=True))
