"""NaFlex training: batches filled to a token budget with a few sequence lengths (one compile each),
resumed bit-exactly, the same parameters on 1 and 8 devices and on 2 processes, evaluation at a
budget, on the digits and on a folder of images of mixed aspect ratios."""

import json
import os
import shutil

import chex
import helpers
import pytest
from helpers import make_folder, max_abs_diff, params_of, run_two_processes

from jaxvit.data import naflex
from jaxvit.training import configs, train_lib, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "configs", "tiny_naflex.py")
SGD = ["--config.optimizer.name=sgd", "--config.optimizer.lr=0.1"]


def test_each_step_takes_a_length_from_the_list_and_fills_the_token_budget():
    budget = naflex.TokenBudget((4, 9, 16), 256, seed=3, multiple_of=8)
    lengths = [budget.length(s) for s in range(60)]
    assert set(lengths) == {4, 9, 16}
    assert [budget.batch(s) for s in range(60)] == [{4: 64, 9: 24, 16: 16}[n] for n in lengths]
    assert lengths == [
        naflex.TokenBudget((4, 9, 16), 256, seed=3, multiple_of=8).length(s) for s in range(60)
    ]
    assert lengths != [naflex.TokenBudget((4, 9, 16), 256, seed=4).length(s) for s in range(60)]
    with pytest.raises(ValueError, match="fewer than 8 .the batch multiple. sequences of 64"):
        naflex.TokenBudget((64,), 256, seed=0, multiple_of=8)


def run_train(workdir, *args, env=None):
    return helpers.run_train(CONFIG, workdir, *args, env=env)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("naflex_one")
    result = run_train(workdir, *SGD)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_eight_devices_give_the_same_parameters(one_device, tmp_path):
    result = run_train(tmp_path, *SGD, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_abs_diff(params_of(one_device), params_of(tmp_path)) < 1e-5


def test_two_processes_give_the_same_parameters(one_device, tmp_path):
    run_two_processes(CONFIG, tmp_path, *SGD)
    assert max_abs_diff(params_of(one_device), params_of(tmp_path)) < 1e-5


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Three classes of wide and tall images, and square ones to evaluate."""
    root = str(tmp_path_factory.mktemp("mixed"))
    make_folder(root, classes=("ant", "bee", "cat"), per_class=3, size=(14, 40))
    for name in ("ant", "bee", "cat"):  # tall ones beside the wide ones
        make_folder(os.path.join(root, "tall"), classes=(name,), per_class=2, size=(36, 10))
        for f in os.listdir(os.path.join(root, "tall", "train", name)):
            shutil.move(
                os.path.join(root, "tall", "train", name, f), os.path.join(root, "train", name, "t" + f)
            )
    shutil.rmtree(os.path.join(root, "tall"))
    make_folder(root, classes=("ant", "bee", "cat"), per_class=2, size=(20, 20), split="val")
    return root


def folder_config(root, steps=8):
    config = configs.load_config_file(CONFIG)
    config.dataset, config.data.root, config.num_classes, config.num_channels = "imagefolder", root, 3, 3
    config.image_size, config.batch_size, config.total_steps = 8, 4, steps
    config.naflex.max_tokens, config.naflex.eval_max_patches, config.naflex.batch_multiple = 4 * 16, 12, 0
    config.async_checkpointing = False
    return config


def test_a_folder_of_mixed_aspect_ratios_trains_with_one_compile_per_length_and_resumes_bit_exactly(
    mixed_folder, tmp_path, monkeypatch
):
    config = folder_config(mixed_folder)
    traced = chex.assert_max_traces(train_lib.train_step, n=len(config.naflex.seq_lens))
    monkeypatch.setattr(train_lib, "train_step", traced)
    trainer.train_and_evaluate(config, str(tmp_path / "straight"))
    lines = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    padding = [m["train/padding"] for m in lines if "train/padding" in m]
    assert padding and max(padding) > 0.05  # wide and tall images leave slots of a square budget empty
    chex.clear_trace_counter()
    # a copy stopped at step 4: its newest checkpoint is step 4's, and the rerun goes on from there
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "8")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints_best", ignore_errors=True)
    trainer.train_and_evaluate(folder_config(mixed_folder), str(tmp_path / "resumed"))
    straight, resumed = params_of(tmp_path / "straight"), params_of(tmp_path / "resumed")
    assert max_abs_diff(straight, resumed) == 0.0


def test_naflex_refuses_what_it_cannot_do_by_name(mixed_folder):
    config = folder_config(mixed_folder)
    config.augment.mixup_alpha = 0.2
    with pytest.raises(ValueError, match=r"refused: \{'augment.mixup_alpha': 0.2\}"):
        trainer.validate_config(config, 1)
    config = folder_config(mixed_folder)
    config.model.posemb_grid = None
    with pytest.raises(ValueError, match="needs a model with a learned table of its own grid"):
        trainer.validate_config(config, 1)


def test_naflex_training_on_packed_shards(mixed_folder, tmp_path):
    from jaxvit import pack

    pack.pack(mixed_folder, str(tmp_path / "packed"), shard_size=4, progress=False)
    config = folder_config(str(tmp_path / "packed"), steps=4)
    config.dataset = "arrayrecord"
    metrics = trainer.train_and_evaluate(config, str(tmp_path / "work"))
    assert 0.0 <= metrics["eval/top1"] <= 1.0
    lines = [json.loads(line) for line in open(tmp_path / "work" / "metrics.jsonl")]
    assert any(m.get("train/padding", 0) > 0.05 for m in lines)
