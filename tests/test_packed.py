"""Packed ArrayRecord shards: packing (resume, streaming, unreadable files), reading (checks
before training, same pixels as the folder), pipelines over them (workers, hosts, resume)."""

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from helpers import make_folder

from jaxvit import pack
from jaxvit.data import packed
from jaxvit.data import pipeline as data

CLASSES = ("ant", "bee", "cat")
PRE = data.Preprocess(image_size=(8, 8), random_resized_crop=True, flip=True, randaugment_num_ops=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("src"))
    make_folder(root, classes=CLASSES, per_class=20, size=(14, 12))
    make_folder(root, classes=CLASSES, per_class=4, size=(10, 10), split="val")
    with open(os.path.join(root, "train", "bee", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    with open(os.path.join(root, "train", "cat", "notes.txt"), "w") as f:
        f.write("hello")
    return root


@pytest.fixture(scope="module")
def packed_dir(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("packed"))
    pack.pack(folder, out, shard_size=16, progress=False)
    return out


def _copy(packed_dir, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(packed_dir, out)
    return out


def test_pack_holds_every_readable_image_with_counts_and_checksums(folder, packed_dir):
    manifest = json.load(open(os.path.join(packed_dir, "manifest.json")))
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["class_names"] == val["class_names"] == list(CLASSES)
    assert train["counts"] == [20, 20, 20] and train["num_examples"] == 60
    assert sorted(train["skipped"]) == ["bee/broken.jpg", "cat/notes.txt"]
    # 62 files in sorted order, in runs of 16; bee/broken.jpg is file 40, cat/notes.txt file 61
    assert [s["num_records"] for s in train["shards"]] == [16, 16, 15, 13]
    assert [s["file"] for s in val["shards"]] == ["val-00000-of-00001.array_record"]
    for shard in train["shards"] + val["shards"]:
        path = os.path.join(packed_dir, shard["file"])
        assert packed.file_sha256(path) == shard["sha256"] and os.path.getsize(path) == shard["bytes"]
    # the same pixels and labels, in the same order, as the folder read directly
    for split in ("train", "val"):
        direct = data.ImageFolderSource(folder, split)
        source = packed.PackedSource(packed_dir, split)
        assert len(source) == len(direct) and source.class_names == direct.class_names
        for i in range(len(direct)):
            image, label = source[i]
            expected, expected_label = direct[i]
            assert label == expected_label
            np.testing.assert_array_equal(image, expected)
    assert packed.PackedSource(packed_dir, "val", channels=1)[0][0].shape == (10, 10, 1)


def test_pack_warns_about_unreadable_files_or_fails_naming_them(folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        pack.pack(folder, str(tmp_path / "a"), shard_size=64, progress=False)
    assert "skipped 2 unreadable file(s)" in caplog.text and "broken.jpg" in caplog.text
    with pytest.raises(ValueError, match=r"2 unreadable file.*broken.jpg.*notes.txt"):
        pack.pack(folder, str(tmp_path / "b"), shard_size=64, on_corrupt="error", progress=False)
    assert not os.path.exists(tmp_path / "b" / "manifest.json")


def test_interrupted_pack_resumes_to_the_same_shards(folder, packed_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    original_write, original_check = pack._write_shard, data.is_image
    written, checked = [], []

    def crash_in_third_shard(payload):
        checked.append(1)
        if len(checked) == 2 * 16 + 5:  # the middle of shard 2
            raise KeyboardInterrupt
        return original_check(payload)

    monkeypatch.setattr(data, "is_image", crash_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        pack.pack(folder, out, shard_size=16, progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert os.path.exists(os.path.join(out, "train-00002-of-00004.array_record.tmp"))
    monkeypatch.setattr(data, "is_image", original_check)
    monkeypatch.setattr(
        pack, "_write_shard", lambda out, name, *a: written.append(name) or original_write(out, name, *a)
    )
    resumed = pack.pack(folder, out, shard_size=16, progress=False)
    # only the unfinished shards were written again, and the result is the uninterrupted pack
    assert written == [
        "train-00002-of-00004.array_record",
        "train-00003-of-00004.array_record",
        "val-00000-of-00001.array_record",
    ]
    assert resumed == json.load(open(os.path.join(packed_dir, "manifest.json")))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    source = packed.PackedSource(out, "train")
    names = [source.read(i)[1] for i in range(len(source))]
    assert len(names) == len(set(names)) == 60
    # a finished pack reruns without writing anything
    written.clear()
    assert pack.pack(folder, out, shard_size=16, progress=False) == resumed and written == []


def test_resume_refuses_a_changed_folder_or_shard_size(folder, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(folder, src)
    out = str(tmp_path / "out")
    pack.pack(src, out, shard_size=16, progress=False)
    with pytest.raises(ValueError, match="another file list or shard size"):
        pack.pack(src, out, shard_size=8, progress=False)
    make_folder(
        src, classes=("ant",), per_class=1, size=(9, 9), split="val"
    )  # overwrites ant/0.jpg: same list
    shutil.copy(os.path.join(src, "val", "ant", "0.jpg"), os.path.join(src, "val", "ant", "new.jpg"))
    with pytest.raises(ValueError, match="another file list or shard size"):
        pack.pack(src, out, shard_size=16, progress=False)


def test_pack_refuses_splits_with_other_classes_and_empty_classes(tmp_path):
    root = make_folder(str(tmp_path / "src"), classes=("a", "b"))
    make_folder(root, classes=("a", "c"), split="val")
    with pytest.raises(ValueError, match=r"only in train \['b'\], only in val \['c'\]"):
        pack.pack(root, str(tmp_path / "out"), progress=False)
    os.makedirs(os.path.join(root, "val", "b"))
    shutil.rmtree(os.path.join(root, "val", "c"))
    with pytest.raises(ValueError, match="class 'b' has no readable images"):
        pack.pack(root, str(tmp_path / "out"), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pack.pack(str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)


def _peak_python_bytes(root, out):
    gc.collect()
    tracemalloc.start()
    pack.pack(root, out, shard_size=32, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def _folder_bytes(root):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def test_pack_memory_does_not_grow_with_the_number_of_images(tmp_path):
    small = make_folder(str(tmp_path / "small"), classes=("a", "b"), per_class=20, size=(64, 64))
    make_folder(small, classes=("a", "b"), per_class=2, size=(64, 64), split="val")
    large = make_folder(str(tmp_path / "large"), classes=("a", "b"), per_class=160, size=(64, 64))
    make_folder(large, classes=("a", "b"), per_class=2, size=(64, 64), split="val")
    _peak_python_bytes(small, str(tmp_path / "warm"))  # first-call imports and caches
    peak_small = _peak_python_bytes(small, str(tmp_path / "s"))
    peak_large = _peak_python_bytes(large, str(tmp_path / "l"))
    extra_bytes = _folder_bytes(large) - _folder_bytes(small)  # 280 more images, 3.4 MB
    # A pack that held the images (or their records) would peak at least extra_bytes higher;
    # what grows is one shard's entry per 32 images and one class listing.
    assert peak_large - peak_small < extra_bytes / 20, (peak_small, peak_large, extra_bytes)


def test_cli_packs_with_progress_and_a_summary(folder, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jaxvit.pack", folder, str(tmp_path / "out"), "--shard-size", "32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "train: 60 images of 3 classes in 2 shard(s), 2 unreadable file(s) skipped" in result.stdout
    assert "img/s" in result.stderr  # the progress bar
    failed = subprocess.run(
        [sys.executable, "-m", "jaxvit.pack", str(tmp_path / "nope"), str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1 and "error: image folder" in failed.stderr


# -- reading: everything is checked before use -------------------------------


def test_missing_shard_fails_naming_it(packed_dir, tmp_path):
    out = _copy(packed_dir, tmp_path)
    os.remove(os.path.join(out, "train-00001-of-00004.array_record"))
    with pytest.raises(FileNotFoundError, match=r"1 packed shard\(s\) .* missing: .*train-00001-of-00004"):
        packed.PackedSource(out, "train")


def test_damaged_shard_fails_its_checksum(packed_dir, tmp_path):
    out = _copy(packed_dir, tmp_path)
    path = os.path.join(out, "train-00002-of-00004.array_record")
    with open(path, "r+b") as f:  # same size, one byte changed
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(
        ValueError, match=r"train-00002-of-00004.array_record' has SHA-256 [0-9a-f]{64}, the manifest says"
    ):
        packed.PackedSource(out, "train")
    packed.PackedSource(out, "val")  # the other split is intact
    with open(path, "ab") as f:
        f.write(b"more")
    with pytest.raises(ValueError, match="has 131076 bytes, the manifest says 131072"):
        packed.PackedSource(out, "train", verify_checksums=False)


def _edit_manifest(out, edit):
    path = os.path.join(out, "manifest.json")
    manifest = json.load(open(path))
    edit(manifest)
    json.dump(manifest, open(path, "w"))


def test_manifest_naming_other_classes_fails(packed_dir, tmp_path):
    out = _copy(packed_dir, tmp_path)

    def rename_val_class(m):
        m["splits"]["val"]["class_names"][2] = "cow"

    _edit_manifest(out, rename_val_class)
    with pytest.raises(
        ValueError,
        match=r"other classes for 'train' than for 'val': only in train \['cat'\], only in val \['cow'\]",
    ):
        packed.PackedSource(out, "train", other_split="val")

    def two_classes(m):
        for split in m["splits"].values():
            split["class_names"] = ["ant", "bee"]
            split["counts"] = [split["counts"][0], sum(split["counts"][1:])]

    _edit_manifest(out, two_classes)
    source = packed.PackedSource(out, "train", other_split="val")
    with pytest.raises(ValueError, match=r"has label 2, but the manifest names 2 classes"):
        source[len(source) - 1]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(version=2), "expected format 'jaxvit-packed' version 1"),
        (lambda m: m["splits"]["train"]["shards"][0].update(file="../x.array_record"), "shard entry"),
        (lambda m: m["splits"]["train"]["shards"][0].update(sha256="abc"), "shard entry"),
        (lambda m: m["splits"]["train"].update(num_examples=61), "num_examples 61, the shards' records"),
        (lambda m: m["splits"]["train"].update(counts=[20, 20]), "one count per class"),
        (lambda m: m["splits"]["train"].update(class_names=["a", "a", "b"]), "duplicates"),
    ],
)
def test_bad_manifest_fields_fail_naming_the_field(packed_dir, tmp_path, edit, message):
    out = _copy(packed_dir, tmp_path)
    _edit_manifest(out, edit)
    with pytest.raises(ValueError, match=message):
        packed.PackedSource(out, "train")


def test_no_manifest_or_unknown_split(packed_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no packed manifest"):
        packed.PackedSource(str(tmp_path), "train")
    with pytest.raises(ValueError, match=r"split 'test' is not in the packed folder .* \['train', 'val'\]"):
        packed.PackedSource(packed_dir, "test")


# -- pipelines over packed shards --------------------------------------------


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_packed_batches_match_the_folder_with_workers_and_resume(folder, packed_dir):
    source = packed.PackedSource(packed_dir, "train")
    layout = data.BatchLayout(12)
    direct = _take(
        data.train_batches(data.ImageFolderSource(folder, "train"), layout, PRE, seed=1, num_steps=6), 6
    )
    workers = data.train_batches(source, layout, PRE, seed=1, num_steps=6, workers=2)
    first = _take(workers, 2)
    state = workers.get_state()
    rest = _take(workers, 4)
    for a, b in zip(direct, first + rest, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    resumed = data.train_batches(source, layout, PRE, seed=1, num_steps=6, workers=2)
    resumed.set_state(state)
    for a, b in zip(rest, _take(resumed, 4), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


class _Recorder:
    """A packed source that records which record names it was asked for (in this process)."""

    def __init__(self, source):
        self.source, self.class_names, self.names = source, source.class_names, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.names.append(self.source.read(index)[1])
        return self.source[index]


def test_two_hosts_read_each_example_of_an_epoch_once(packed_dir):
    source = packed.PackedSource(packed_dir, "train")
    whole = _take(
        data.train_batches(source, data.BatchLayout(12), PRE, seed=2, num_steps=5), 5
    )  # 60: one epoch
    hosts = [_Recorder(source) for _ in range(2)]
    parts = [
        _take(data.train_batches(h, data.BatchLayout(12, i, 2), PRE, seed=2, num_steps=5), 5)
        for i, h in enumerate(hosts)
    ]
    for step in range(5):
        np.testing.assert_array_equal(np.concatenate([p[step]["image"] for p in parts]), whole[step]["image"])
    assert len(hosts[0].names) == len(hosts[1].names) == 30
    assert not set(hosts[0].names) & set(hosts[1].names)
    assert sorted(hosts[0].names + hosts[1].names) == sorted(source.read(i)[1] for i in range(60))
