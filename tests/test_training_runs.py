"""Whole training runs: the default config's accuracy, the same parameters on 1 device,
8 devices (with fsdp) and 2 processes, every shipped config, fine-tuning and the workdir."""

import json
import os
import shutil
import subprocess
import sys

import helpers
import jax
import numpy as np
import portpicker
import pytest
from helpers import make_folder, max_abs_diff, params_of, run_two_processes

import jaxvit
from jaxvit import pack
from jaxvit.checkpoints import workdir as workdir_lib
from jaxvit.training import checkpointing, trainer
from jaxvit.training.configs import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.py")
# SGD for the cross-topology comparison: Adam divides by the root of tiny second
# moments, so parameters whose gradient is exactly zero (the key bias of
# attention) move by the sign of rounding noise, which differs with reduction order.
SGD = ["--config.optimizer.name=sgd", "--config.optimizer.lr=0.1"]


def run_train(workdir, *args, env=None):
    return helpers.run_train(TINY, workdir, *args, env=env)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    result = run_train(workdir, *SGD)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_workdir_holds_config_labels_metrics_tensorboard_and_checkpoints(one_device):
    workdir, result = one_device
    assert result.stdout.strip().splitlines()[-1].startswith("final test accuracy: ")
    config = json.load(open(workdir / "config.json"))
    assert config["total_steps"] == 12 and config["optimizer"]["name"] == "sgd"
    assert open(workdir / "labels.txt").read().split() == [str(i) for i in range(10)]
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [m for m in lines if "train/loss" in m]
    evals = [m for m in lines if "eval/top1" in m]
    assert [m["step"] for m in train] == [2, 4, 6, 8, 10, 12]
    assert {"train/accuracy", "learning_rate", "images_per_sec", "train/grad_norm"} <= set(train[0])
    assert [m["step"] for m in evals] == [6, 12]
    assert {"eval/loss", "eval/top5"} <= set(evals[0])
    assert os.listdir(workdir / "tensorboard")
    assert (workdir / "curves.png").stat().st_size > 1000
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == [8, 12]  # max_to_keep=2
    best_step = max(evals, key=lambda m: m["eval/top1"])["step"]
    assert os.listdir(workdir / "checkpoints_best") == [str(best_step)]
    final = f"final test accuracy: {evals[-1]['eval/top1']:.4f}"
    assert final in result.stdout


def test_train_lines_log_the_share_of_time_spent_waiting_for_data(one_device):
    workdir, _ = one_device
    train = [m for m in map(json.loads, open(workdir / "metrics.jsonl")) if "train/loss" in m]
    assert train and all(0.0 <= m["train/data_wait"] <= 1.0 for m in train)


def test_eight_devices_with_fsdp_give_the_same_parameters(one_device, tmp_path):
    result = run_train(
        tmp_path, *SGD, "--config.mesh.fsdp=2", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_abs_diff(params_of(one_device[0]), params_of(tmp_path)) < 1e-5


def test_two_processes_give_the_same_parameters(one_device, tmp_path):
    run_two_processes(TINY, tmp_path, *SGD)
    assert max_abs_diff(params_of(one_device[0]), params_of(tmp_path)) < 1e-5


@pytest.fixture(scope="module")
def packed_folder(tmp_path_factory):
    """60 train and 9 val images of 3 classes, packed into shards of 16."""
    root = str(tmp_path_factory.mktemp("src"))
    make_folder(root, classes=("ant", "bee", "cat"), per_class=20, size=(14, 12))
    make_folder(root, classes=("ant", "bee", "cat"), per_class=3, size=(10, 10), split="val")
    out = str(tmp_path_factory.mktemp("packed"))
    pack.pack(root, out, shard_size=16, progress=False)
    return out


def test_two_processes_on_packed_shards_read_each_example_of_the_epoch_once(packed_folder, tmp_path):
    """One epoch (5 steps of 12 from 60 images) on 1 process and on 2: the same parameters,
    and the 2 processes' reads of the train split together are every image exactly once."""
    recorder = os.path.join(ROOT, "tests", "_recording_train.py")
    args = [
        f"--config={TINY}",
        *SGD,
        "--config.dataset=arrayrecord",
        f"--config.data.root={packed_folder}",
        "--config.num_classes=3",
        "--config.batch_size=12",
        "--config.total_steps=5",
        "--config.eval_every=0",
    ]
    one = subprocess.run(
        [sys.executable, recorder, str(tmp_path / "one_reads"), f"--workdir={tmp_path / 'one'}", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    port = portpicker.pick_unused_port()
    cmd = [
        sys.executable,
        recorder,
        str(tmp_path / "reads"),
        f"--workdir={tmp_path / 'two'}",
        *args,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, f"--process_id={i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    reads = [open(tmp_path / f"reads.{i}").read().split() for i in range(2)]
    everything = sorted(
        f"{c}/{i}.{'png' if i % 2 else 'jpg'}" for c in ("ant", "bee", "cat") for i in range(20)
    )
    assert len(reads[0]) == len(reads[1]) == 30
    assert sorted(reads[0] + reads[1]) == everything
    assert sorted(open(tmp_path / "one_reads.0").read().split()) == everything
    assert max_abs_diff(params_of(tmp_path / "one"), params_of(tmp_path / "two")) < 1e-5


def test_a_damaged_shard_stops_training_before_it_starts(packed_folder, tmp_path):
    out = str(tmp_path / "packed")
    shutil.copytree(packed_folder, out)
    with open(os.path.join(out, "train-00001-of-00004.array_record"), "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    config = load_config_file(TINY)
    with config.unlocked():
        config.dataset, config.data.root, config.num_classes = "arrayrecord", out, 3
    with pytest.raises(ValueError, match="train-00001-of-00004.array_record' has SHA-256"):
        trainer.train_and_evaluate(config, str(tmp_path / "work"))
    assert os.listdir(tmp_path / "work") == []


def test_rerun_of_a_finished_run_changes_nothing(one_device):
    workdir, result = one_device
    before = params_of(workdir)
    again = run_train(workdir, *SGD)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[-1] == result.stdout.splitlines()[-1]
    assert max_abs_diff(before, params_of(workdir)) == 0.0
    keys = [(m["step"], "eval/loss" in m) for m in map(json.loads, open(workdir / "metrics.jsonl"))]
    assert len(keys) == len(set(keys)) == 8  # 6 train and 2 eval lines, none logged twice


def test_batch_not_divisible_by_devices_fails_before_training(tmp_path):
    result = run_train(
        tmp_path, "--config.batch_size=12", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    )
    assert result.returncode != 0
    assert "batch_size=12 (the global batch) must be a positive multiple of the 8 devices" in result.stderr


def test_unknown_config_key_lists_valid_keys(tmp_path):
    result = run_train(tmp_path, "--config.optimizer.learning_rate=0.1")
    assert result.returncode != 0
    assert "unknown config key(s) ['optimizer.learning_rate']" in result.stderr
    assert "optimizer.lr" in result.stderr and "augment.mixup_alpha" in result.stderr


# -- every shipped config builds and runs a few steps -------------------------


def short(config, steps=2, **overrides):
    config.unlock()
    config.total_steps = steps
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint_every = 0
    config.progress_bar = False
    config.async_checkpointing = False
    config.data.workers = 0
    config.optimizer.warmup_steps = 0
    config.update_from_flattened_dict(overrides)
    config.lock()
    return config


@pytest.mark.parametrize("name", ["default", "imagefolder", "cifar_like", "vit_s16_i1k", "finetune"])
def test_every_config_file_builds_its_model(name):
    config = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
    model = workdir_lib.model_from_config(config.to_dict())
    assert jaxvit.count_params(model, config.image_size) > 0


def test_model_from_config_under_its_old_name_warns_and_still_works():
    config = load_config_file(TINY).to_dict()
    with pytest.warns(DeprecationWarning, match="use jaxvit.checkpoints.workdir.model_from_config"):
        old = checkpointing.model_from_config
    assert old(config) == workdir_lib.model_from_config(config)


def test_vit_s16_i1k_runs_on_synthetic_data_of_its_shape(tmp_path):
    config = short(
        load_config_file(os.path.join(ROOT, "configs", "vit_s16_i1k.py")),
        **{
            "dataset": "synthetic",
            "batch_size": 4,
            "data.synthetic_examples": 16,
        },
    )
    assert (config.image_size, config.num_classes, config.model.variant) == (224, 1000, "S/16")
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= metrics["eval/top1"] <= 1.0
    train = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "train/loss" in line]
    assert len(train) == 2 and all(np.isfinite(m["train/loss"]) for m in train)
    # mixup + RandAugment + Inception crop were on
    assert config.augment.mixup_alpha == 0.2 and config.augment.randaugment_num_ops == 2


def test_cifar_like_runs(tmp_path):
    config = short(
        load_config_file(os.path.join(ROOT, "configs", "cifar_like.py")),
        **{
            "batch_size": 8,
            "data.synthetic_examples": 32,
            "model.depth": 2,
        },
    )
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    assert set(metrics) == {"eval/loss", "eval/top1", "eval/top5"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("folder"))
    make_folder(root, classes=("ant", "bee", "cat"), per_class=4, size=(40, 36))
    make_folder(root, classes=("ant", "bee", "cat"), per_class=2, size=(30, 30), split="val")
    return root


def folder_config(root, **overrides):
    """configs/imagefolder.py, shrunk to a 32 px mu/8 model for a couple of steps."""
    settings = {"data.root": root, "num_classes": 3, "image_size": 32, "model.variant": "mu/8", **overrides}
    return short(load_config_file(os.path.join(ROOT, "configs", "imagefolder.py")), **settings)


def test_imagefolder_config_trains_on_a_folder(tmp_path, image_folder):
    config = folder_config(image_folder, batch_size=4, ema_decay=0.9)
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= metrics["eval/top1"] <= 1.0
    assert open(tmp_path / "labels.txt").read().split() == ["ant", "bee", "cat"]
    model, params, _ = checkpointing.restore_params(str(tmp_path))  # the EMA weights
    _, raw, _ = checkpointing.restore_params(str(tmp_path), use_ema=False)
    assert max_abs_diff(params, raw) > 0
    assert model.apply({"params": params}, np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 3)


def test_num_classes_must_match_the_folder(tmp_path, image_folder):
    config = folder_config(image_folder, num_classes=5)
    with pytest.raises(ValueError, match="num_classes=5 but the dataset has 3 classes"):
        trainer.train_and_evaluate(config, str(tmp_path))


def test_finetune_from_an_exported_checkpoint_at_a_new_resolution(tmp_path, image_folder):
    source_model = jaxvit.create_model("mu/8", num_classes=7)
    params = source_model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.1, params)
    path = str(tmp_path / "pretrained.npz")
    jaxvit.export(params, path, format="npz", model=source_model)
    config = short(
        load_config_file(os.path.join(ROOT, "configs", "finetune.py")),
        steps=1,
        **{
            "init_from": path,
            "data.root": image_folder,
            "num_classes": 3,
            "image_size": 32,
            "model.variant": "mu/8",
            "batch_size": 4,
        },
    )
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(config, str(workdir))
    assert config.model.scan  # the config scans its blocks; the export is unrolled
    tuned = jaxvit.scan_to_unrolled(params_of(workdir))
    # trained for one SGD step from the pretrained weights: close to them, not to a fresh init
    assert (
        np.abs(
            tuned["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
            - params["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
        ).max()
        < 0.05
    )
    assert tuned["pos_embed"]["embedding"].shape == (1, 1 + 16, 32)  # resampled from 2x2 to 4x4
    assert tuned["head"]["classifier"]["kernel"].shape == (32, 3)  # a new head for 3 classes


def test_predict_reads_a_training_workdir(one_device, tmp_path):
    from PIL import Image

    from jaxvit import predict

    workdir = one_device[0]
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    out = tmp_path / "out.json"
    with open(out, "w") as f:
        sys_stdout, sys.stdout = sys.stdout, f
        try:
            assert predict.main(["--checkpoint", str(workdir), "--json", str(image)]) == 0
        finally:
            sys.stdout = sys_stdout
    result = json.load(open(out))
    model, params, _ = checkpointing.restore_params(str(workdir))
    probs = np.asarray(jax.nn.softmax(model.apply({"params": params}, -np.ones((1, 8, 8, 1), np.float32))))[0]
    top = result[0]["top_k"]
    assert top[0]["label"] == str(int(np.argmax(probs)))
    np.testing.assert_allclose(top[0]["probability"], probs.max(), rtol=1e-5)


def test_load_for_inference_of_a_workdir_takes_model_overrides(one_device):
    workdir = one_device[0]
    plain = jaxvit.load_for_inference(workdir)
    flipped = jaxvit.load_for_inference(workdir, scan=not plain.model.scan)
    assert flipped.model.scan != plain.model.scan
    x = np.linspace(-1, 1, 2 * 8 * 8).reshape(2, 8, 8, 1).astype(np.float32)
    np.testing.assert_allclose(
        flipped.model.apply({"params": flipped.params}, x),
        plain.model.apply({"params": plain.params}, x),
        rtol=1e-5,
        atol=1e-6,
    )
    assert jaxvit.load_for_inference(workdir, dtype="bfloat16").model.dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"unknown model field\(s\) \['widht'\]"):
        jaxvit.load_for_inference(workdir, widht=3)


def test_default_config_reaches_97_percent(tmp_path):
    """The README's promise: python train.py reaches >= 97% test accuracy on the digits."""
    config = load_config_file(os.path.join(ROOT, "configs", "default.py"))
    config.unlock()
    config.progress_bar = False
    # the same run without the evaluations and saves along the way, which change no parameter
    config.eval_every = config.checkpoint_every = 0
    config.lock()
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    assert metrics["eval/top1"] >= 0.97, metrics


def test_bf16_compute_trains_with_fp32_parameters(tmp_path):
    config = short(load_config_file(TINY), steps=3, **{"model.dtype": "bfloat16"})
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(metrics["eval/loss"])
    model, params, _ = checkpointing.restore_params(str(tmp_path))
    assert model.dtype == np.dtype("bfloat16")
    assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {np.dtype("float32")}
    train = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "train/loss" in line]
    assert len(train) == 3 and all(np.isfinite(m["train/loss"]) for m in train)
