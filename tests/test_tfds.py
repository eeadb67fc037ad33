"""``dataset="tfds:<name>"``: a small TFDS dataset prepared here in ArrayRecord format (TFDS
writes it without TensorFlow when given encoded images), read through ``tfds.data_source``."""

import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxvit.data import pipeline as data
from jaxvit.training import trainer
from jaxvit.training.configs import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "jaxvit_test_images"
CLASSES = ["ant", "bee", "cat"]
SIZES = {"train": 24, "validation": 6}


def _image(split, index):
    rng = np.random.default_rng([len(split), index])
    return rng.integers(0, 256, (14 + index % 3, 12, 3), dtype=np.uint8)


class JaxvitTestImages(tfds.core.GeneratorBasedBuilder):
    """Random RGB images of three classes, label ``index % 3``."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=CLASSES),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SIZES}

    def _generate_examples(self, split):
        for i in range(SIZES[split]):
            png = io.BytesIO()
            Image.fromarray(_image(split, i)).save(png, format="PNG")  # encoded: no TensorFlow needed
            yield i, {"image": png.getvalue(), "label": i % 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    JaxvitTestImages(data_dir=directory, file_format="array_record").download_and_prepare()
    return directory


def test_tfds_source_reads_every_example_with_its_label(data_dir):
    source = data.TfdsSource(NAME, "train", data_dir)
    assert len(source) == 24 and source.class_names == CLASSES
    # TFDS shuffles examples on write; every generated image comes back once, with its label
    expected = {_image("train", i).tobytes(): i % 3 for i in range(24)}
    seen = {}
    for i in range(len(source)):
        image, label = source[i]
        assert image.dtype == np.uint8 and image.shape[1:] == (12, 3)
        seen[image.tobytes()] = label
    assert seen == expected
    assert data.TfdsSource(NAME, "validation", data_dir, channels=1)[0][0].shape[-1] == 1


def test_tfds_batches_are_the_same_with_worker_processes(data_dir):
    source = data.TfdsSource(NAME, "train", data_dir)
    layout, pre = data.BatchLayout(8), data.Preprocess((8, 8), random_resized_crop=True, flip=True)
    inline = data.train_batches(source, layout, pre, seed=0, num_steps=3)
    workers = data.train_batches(source, layout, pre, seed=0, num_steps=3, workers=2)
    for _ in range(3):
        a, b = next(inline), next(workers)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_tfds_errors_name_the_split_or_the_dataset(data_dir):
    with pytest.raises(ValueError, match=r"has no split 'val': it has \['train', 'validation'\]"):
        data.TfdsSource(NAME, "val", data_dir)
    with pytest.raises(FileNotFoundError, match="'no_such_dataset' is not prepared under"):
        data.TfdsSource("no_such_dataset", "train", data_dir)


def test_training_on_tfds(data_dir, tmp_path):
    config = load_config_file(os.path.join(ROOT, "tests", "configs", "tiny.py"))
    with config.unlocked():
        config.dataset = f"tfds:{NAME}"
        config.data.tfds_data_dir = data_dir
        config.data.val_split = "validation"
        config.num_classes, config.num_channels = 3, 3
        config.batch_size, config.total_steps, config.eval_every = 8, 4, 0
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= metrics["eval/top1"] <= 1.0
    assert open(tmp_path / "labels.txt").read().split() == CLASSES


def test_naflex_training_on_tfds_with_worker_processes(data_dir, tmp_path):
    """NaFlex batches from a TFDS source, loaded by two grain workers: the same as loaded inline."""
    from jaxvit.data import naflex

    source = data.TfdsSource(NAME, "train", data_dir)
    budget = naflex.TokenBudget((4, 9), 36, seed=0)
    common = dict(flip=True, mean=(0.5,), std=(0.5,), num_steps=3)
    inline = naflex.train_batches(source, data.BatchLayout(1), budget, 4, **common)
    workers = naflex.train_batches(source, data.BatchLayout(1), budget, 4, workers=2, **common)
    for step in range(3):
        a, b = next(inline), next(workers)
        assert a["image"].shape == (budget.batch(step), budget.length(step), 4 * 4 * 3)
        for key in ("image", "grids", "patch_mask", "label"):
            np.testing.assert_array_equal(a[key], b[key])
    config = load_config_file(os.path.join(ROOT, "tests", "configs", "tiny_naflex.py"))
    with config.unlocked():
        config.dataset = f"tfds:{NAME}"
        config.data.tfds_data_dir = data_dir
        config.data.val_split = "validation"
        config.num_classes, config.num_channels = 3, 3
        config.total_steps, config.eval_every, config.naflex.batch_multiple = 4, 0, 0
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= metrics["eval/top1"] <= 1.0
