"""Data sources, pipelines and augmentations: determinism, layouts, bad folders."""

import logging
import os

import numpy as np
import pytest
from helpers import make_folder

from jaxvit.data import augment
from jaxvit.data import pipeline as data

PRE = data.Preprocess(image_size=(8, 8), crop_padding=1)


@pytest.fixture(scope="module")
def digits_train():
    return data.DigitsSource("train")


def test_digits_split_is_fixed_disjoint_and_stratified(digits_train):
    test = data.DigitsSource("test")
    assert (len(digits_train), len(test)) == (1437, 360)
    assert not set(digits_train.indices) & set(test.indices)
    np.testing.assert_array_equal(data.DigitsSource("test").indices, test.indices)
    assert sorted(np.bincount(test.labels)) == [35, 35, 36, 36, 36, 36, 36, 36, 37, 37]
    image, label = digits_train[0]
    assert image.shape == (8, 8, 1) and image.dtype == np.uint8
    assert digits_train.images.max() == 255  # 16 grey levels mapped onto 0..255
    assert data.DigitsSource("test", split_seed=1).indices.tolist() != test.indices.tolist()


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_global_batches_do_not_depend_on_the_number_of_processes(digits_train):
    single = _take(data.train_batches(digits_train, data.BatchLayout(12), PRE, seed=3, num_steps=5), 5)
    for count in (2, 4):
        parts = [
            _take(
                data.train_batches(digits_train, data.BatchLayout(12, i, count), PRE, seed=3, num_steps=5), 5
            )
            for i in range(count)
        ]
        for step in range(5):
            joined = np.concatenate([p[step]["image"] for p in parts])
            np.testing.assert_array_equal(joined, single[step]["image"])
            np.testing.assert_array_equal(
                np.concatenate([p[step]["label"] for p in parts]), single[step]["label"]
            )
    assert single[0]["image"].shape == (12, 8, 8, 1) and single[0]["image"].dtype == np.float32
    assert single[0]["label"].dtype == np.int32


def test_batches_are_fixed_by_the_seed_and_differ_across_seeds(digits_train):
    def first(seed):
        return next(data.train_batches(digits_train, data.BatchLayout(16), PRE, seed=seed, num_steps=2))

    np.testing.assert_array_equal(first(0)["image"], first(0)["image"])
    assert not np.array_equal(first(0)["label"], first(1)["label"])


def test_epochs_visit_every_example_once(digits_train):
    source = data.SyntheticSource(10, (2, 2), 1, 10)
    layout = data.BatchLayout(5)
    batches = _take(data.train_batches(source, layout, data.Preprocess((2, 2)), seed=0, num_steps=4), 4)
    labels = [b["label"] for b in batches]
    assert sorted(np.concatenate(labels[:2])) == list(range(10))  # epoch 0
    assert sorted(np.concatenate(labels[2:])) == list(range(10))  # epoch 1
    assert not np.array_equal(np.concatenate(labels[:2]), np.concatenate(labels[2:]))  # reshuffled


def test_iterator_state_resumes_exactly(digits_train):
    layout = data.BatchLayout(8)
    it = data.train_batches(digits_train, layout, PRE, seed=0, num_steps=10)
    _take(it, 3)
    state = it.get_state()
    rest = _take(it, 4)
    resumed = data.train_batches(digits_train, layout, PRE, seed=0, num_steps=10)
    resumed.set_state(state)
    for a, b in zip(rest, _take(resumed, 4), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_worker_processes_give_the_same_batches(digits_train):
    layout = data.BatchLayout(8)
    inline = _take(data.train_batches(digits_train, layout, PRE, seed=0, num_steps=4), 4)
    workers = data.train_batches(digits_train, layout, PRE, seed=0, num_steps=4, workers=2)
    for a, b in zip(inline, _take(workers, 4), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_batches_cover_every_example_once_with_padding_masked():
    source = data.SyntheticSource(11, (4, 4), 3, 5)
    for count in (1, 2):
        seen = []
        for i in range(count):
            for batch in data.eval_batches(source, data.BatchLayout(4, i, count), data.Preprocess((4, 4))):
                assert batch["image"].shape == (4 // count, 4, 4, 3)
                seen.extend(batch["label"][batch["mask"] > 0].tolist())
        assert sorted(seen) == sorted(i % 5 for i in range(11))


def test_batch_layout_rejects_uneven_split():
    with pytest.raises(
        ValueError, match="global batch size 10 is not divisible by the number of processes 4"
    ):
        data.BatchLayout(10, 0, 4)


# -- ImageFolder -----------------------------------------------------------


def test_image_folder_reads_classes_in_sorted_order(tmp_path):
    root = make_folder(str(tmp_path), classes=("zebra", "ant"))
    source = data.ImageFolderSource(root, "train")
    assert source.class_names == ["ant", "zebra"] and len(source) == 6
    image, label = source[5]
    assert image.shape == (12, 10, 3) and label == 1
    gray = data.ImageFolderSource(root, "train", channels=1)[0][0]
    assert gray.shape == (12, 10, 1)


def test_corrupt_and_non_image_files_are_skipped_and_counted(tmp_path, caplog):
    root = make_folder(str(tmp_path))
    with open(os.path.join(root, "train", "cat", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    with open(os.path.join(root, "train", "dog", "notes.txt"), "w") as f:
        f.write("hello")
    with caplog.at_level(logging.WARNING):
        source = data.ImageFolderSource(root, "train")
    assert len(source) == 6
    assert "skipped 2 unreadable file(s)" in caplog.text and "broken.jpg" in caplog.text
    with pytest.raises(ValueError, match="2 unreadable file.*broken.jpg"):
        data.ImageFolderSource(root, "train", on_corrupt="error")


def test_bad_folders_fail_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolderSource(str(tmp_path / "nope"), "train")
    os.makedirs(tmp_path / "empty" / "train")
    with pytest.raises(ValueError, match="no class sub-directories"):
        data.ImageFolderSource(str(tmp_path / "empty"), "train")
    root = make_folder(str(tmp_path / "one"))
    os.makedirs(os.path.join(root, "train", "emu"))
    with pytest.raises(ValueError, match="class 'emu' has no readable images in .*emu"):
        data.ImageFolderSource(root, "train")


def test_mismatched_train_and_val_classes(tmp_path):
    root = make_folder(str(tmp_path), classes=("a", "b"))
    make_folder(root, classes=("a", "c"), split="val")
    train, val = data.ImageFolderSource(root, "train"), data.ImageFolderSource(root, "val")
    with pytest.raises(ValueError, match=r"only in train \['b'\], only in val \['c'\]"):
        data.check_same_classes(train, val, root)


# -- augmentations ---------------------------------------------------------


def test_augmentations_keep_shape_and_are_seeded():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = augment.random_resized_crop(image, np.random.default_rng(1), (16, 16))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    shifted = augment.pad_and_random_crop(image, np.random.default_rng(1), 2)
    assert shifted.shape == image.shape
    flipped = [augment.random_flip(image, np.random.default_rng(s)) for s in range(8)]
    assert any(np.array_equal(f, image[:, ::-1]) for f in flipped) and any(
        np.array_equal(f, image) for f in flipped
    )
    for name, op in augment.RANDAUGMENT_OPS.items():
        for channels in (1, 3):
            img = augment.to_pil(image[..., :channels])
            result = augment.from_pil(op(img, 9.0, np.random.default_rng(0)), channels)
            assert result.shape == (20, 30, channels), name
    a = augment.randaugment(image, np.random.default_rng(5), 2, 9)
    np.testing.assert_array_equal(a, augment.randaugment(image, np.random.default_rng(5), 2, 9))
    with pytest.raises(ValueError, match="magnitude must be in"):
        augment.randaugment(image, np.random.default_rng(0), 2, 11)
    with pytest.raises(ValueError, match="prob must be in"):
        augment.randaugment(image, np.random.default_rng(0), 2, 9, prob=1.5)


def test_randaugment_applies_each_op_with_its_probability():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)

    def changed(prob: float, seed: int) -> bool:
        out = augment.randaugment(image, np.random.default_rng(seed), 1, 9, prob=prob)
        return not np.array_equal(out, image)

    assert not any(changed(0.0, seed) for seed in range(50))
    always = sum(changed(1.0, seed) for seed in range(200))
    half = sum(changed(0.5, seed) for seed in range(200))
    # Identity (1 of 15 ops) never changes the image; the rest nearly always do.
    assert always >= 150
    assert 0.35 * always <= half <= 0.65 * always


def test_normalize_maps_to_minus_one_one_and_center_crop():
    image = np.array([[[0], [255]]], np.uint8)
    np.testing.assert_allclose(augment.normalize(image)[..., 0], [[-1.0, 1.0]])
    big = np.zeros((100, 80, 3), np.uint8)
    big[40:60, 30:50] = 255
    cropped = augment.center_crop(big, (10, 10), crop_fraction=0.25)
    assert cropped.shape == (10, 10, 3) and cropped.min() == 255


def test_pad_crop_is_a_shift():
    image = np.arange(25, dtype=np.uint8).reshape(5, 5, 1)
    for seed in range(5):
        out = augment.pad_and_random_crop(image, np.random.default_rng(seed), 1)
        # some shift of the original lands inside the output
        assert any(
            np.array_equal(
                out[max(0, dy) : 5 + min(0, dy), max(0, dx) : 5 + min(0, dx)],
                image[max(0, -dy) : 5 + min(0, -dy), max(0, -dx) : 5 + min(0, -dx)],
            )
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )
