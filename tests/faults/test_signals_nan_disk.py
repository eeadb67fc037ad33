"""Preemption (SIGTERM), unreadable checkpoints, non-finite losses and disk failures,
each on a real ``train.py`` process; every recovery must end bit-identical to the
uninterrupted run."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from faultkit import (
    EVAL_KEYS,
    TOTAL_STEPS,
    assert_metrics_match,
    assert_params_identical,
    final_params,
    finalized_steps,
    metrics_lines,
    tmp_dirs,
)

from jaxvit.training import checkpointing, configs
from jaxvit.training import trainer as trainer_lib

PREEMPTED = re.compile(r"preempted: saved at step (\d+)")


def _copy_of(reference, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(reference.workdir, workdir)
    return workdir


def _step_dir(workdir, step: int) -> str:
    return os.path.join(workdir, checkpointing.LATEST_DIR, str(step))


def _all_finite(params) -> bool:
    return all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(params))


# -- SIGTERM ------------------------------------------------------------------


def test_sigterm_saves_the_current_step_exits_0_and_the_rerun_continues(trainer, reference, tmp_path):
    workdir = tmp_path / "w"
    rng = random.Random(7)
    latest = os.path.join(workdir, checkpointing.LATEST_DIR)

    def saving():
        return os.path.isdir(latest) and any("tmp" in n for n in os.listdir(latest))

    def training():
        before = len(metrics_lines(workdir))  # a line this run appends
        return lambda: any("train/loss" in m for m in metrics_lines(workdir)[before:])

    # First while a periodic checkpoint is being written (the preemption save falls on
    # a step that was just saved), then at a random moment of the resumed run.
    saved = []
    for moment in ("saving", "training"):
        event, delay = (saving, 0.0) if moment == "saving" else (training(), rng.uniform(0.0, 0.2))
        proc = trainer.start(workdir)
        assert trainer.kill_when(proc, event, delay, sig=signal.SIGTERM)
        run = trainer.finish(proc)
        assert run.returncode == 0, run.describe()
        step = int(PREEMPTED.search(run.stdout).group(1))
        assert 1 <= step <= TOTAL_STEPS
        assert finalized_steps(workdir)[-1] == step, "the preemption save is the newest checkpoint"
        assert tmp_dirs(workdir) == [], "the preempted run waited for its saves"
        if saved:
            assert run.resumed_from == saved[-1]
        saved.append(step)
    assert saved[1] > saved[0]

    last = trainer.run(workdir)
    assert last.returncode == 0, last.describe()
    assert last.resumed_from == saved[-1]
    assert_params_identical(final_params(workdir), reference.params)
    # Train lines average the steps since the last flush, which a resume at an odd
    # step splits; the learning rate and the evaluations must match exactly.
    assert_metrics_match(workdir, reference.metrics, keys=("learning_rate", *EVAL_KEYS))


# -- unreadable newest checkpoint -----------------------------------------------


def _truncate_arrays(step_dir: str) -> None:
    data = os.path.join(step_dir, "state", "d")
    for name in os.listdir(data):
        path = os.path.join(data, name)
        os.truncate(path, os.path.getsize(path) // 2)


def _delete_metadata(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


@pytest.mark.parametrize("damage", [_truncate_arrays, _delete_metadata], ids=["truncated", "deleted"])
def test_unreadable_newest_checkpoint_falls_back_and_ends_identical(trainer, reference, tmp_path, damage):
    workdir = _copy_of(reference, tmp_path)
    assert finalized_steps(workdir) == [8, TOTAL_STEPS]
    damage(_step_dir(workdir, TOTAL_STEPS))

    run = trainer.run(workdir)
    assert run.returncode == 0, run.describe()
    assert f"checkpoint at step {TOTAL_STEPS} cannot be restored" in run.stderr
    assert run.resumed_from == 8
    aside = os.listdir(os.path.join(workdir, checkpointing.UNREADABLE_DIR))
    assert [name.split(".")[0] for name in aside] == [str(TOTAL_STEPS)]
    assert finalized_steps(workdir) == [8, TOTAL_STEPS]
    assert_params_identical(final_params(workdir), reference.params)
    assert_metrics_match(workdir, reference.metrics)


# -- non-finite loss --------------------------------------------------------------


def test_nan_from_the_data_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    trainer, reference, tmp_path
):
    workdir = _copy_of(reference, tmp_path)
    shutil.rmtree(_step_dir(workdir, TOTAL_STEPS))  # newest is now step 8
    good = final_params(workdir)

    # std 0: every image is +-inf, so step 9, the first of this run, has a NaN loss.
    run = trainer.run(workdir, "--config.data.std=(0.0,)")
    assert run.returncode != 0, run.describe()
    assert "NonFiniteLossError: non-finite loss, gradient or update at step 9 " in run.stderr, run.describe()
    assert finalized_steps(workdir) == [8]
    newest = final_params(workdir)
    assert _all_finite(newest)
    assert_params_identical(newest, good)


def test_huge_learning_rate_stops_at_the_first_nan_and_the_checkpoint_is_finite(trainer, tmp_path):
    workdir = tmp_path / "w"
    # Warm-up gives step 1 a learning rate of 0 and step 2 half of 1e30: the
    # parameters jump to ~1e29 (finite) and step 3's activations overflow.
    run = trainer.run(workdir, "--config.optimizer.lr=1e30", "--config.checkpoint_every=2")
    assert run.returncode != 0, run.describe()
    assert "non-finite loss, gradient or update at step 3 " in run.stderr, run.describe()
    lines = [m for m in metrics_lines(workdir) if "train/loss" in m]
    assert [m["step"] for m in lines] == [2] and np.isfinite(lines[0]["train/loss"])
    assert finalized_steps(workdir) == [2]
    params = final_params(workdir)
    assert _all_finite(params)
    assert max(float(np.abs(p).max()) for p in jax.tree_util.tree_leaves(params)) > 1e25


# -- disk ---------------------------------------------------------------------------


def test_unwritable_workdir_fails_before_reading_data_or_compiling(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    workdir = str(blocker / "w")

    def must_not_run(*args, **kwargs):
        raise AssertionError("reached data or compile with an unwritable workdir")

    monkeypatch.setattr(trainer_lib.data, "make_source", must_not_run)
    monkeypatch.setattr(trainer_lib.train_lib, "compile_steps", must_not_run)
    monkeypatch.setattr(trainer_lib.jax, "jit", must_not_run)
    config = configs.load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    with pytest.raises(
        PermissionError, match=rf"workdir '{re.escape(workdir)}' is not writable: .*Not a directory"
    ):
        trainer_lib.train_and_evaluate(config, workdir)


def test_unwritable_workdir_on_the_command_line(trainer, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    run = trainer.run(blocker / "w")
    # one line and status 2, as every bad-input error of train.py
    assert run.returncode == 2, run.describe()
    assert f"error: workdir '{blocker / 'w'}' is not writable" in run.stderr, run.describe()
    assert "Traceback" not in run.stderr, run.describe()


def test_failed_writes_during_a_save_keep_the_previous_checkpoint(trainer, reference, tmp_path):
    workdir = tmp_path / "w"
    # max_to_keep=1: a successful step-8 save would delete step 4 afterwards.
    args = ("--config.max_to_keep=1",)
    run = trainer.run(workdir, *args, fault="write_fails_at_save=2")
    assert run.returncode != 0, run.describe()
    assert "File too large" in run.stderr, run.describe()
    assert finalized_steps(workdir) == [4]
    assert tmp_dirs(workdir) == [f"{checkpointing.LATEST_DIR}/8.orbax-checkpoint-tmp"]

    rerun = trainer.run(workdir, *args)
    assert rerun.returncode == 0, rerun.describe()
    assert rerun.resumed_from == 4
    assert tmp_dirs(workdir) == []
    assert_params_identical(final_params(workdir), reference.params)
    assert_metrics_match(workdir, reference.metrics)
