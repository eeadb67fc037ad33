"""SIGKILL a real training process at chosen moments, rerun the same command, and
demand the parameters and every logged metric of the uninterrupted run, bit for bit.

The tiny config trains with AdamW (the default optimizer), dropout, drop-path,
mixup and label smoothing, so the RNG streams, the optimizer state and the data
iterator position must all survive the kills.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from faultkit import (
    TMP_MARK,
    TOTAL_STEPS,
    assert_metrics_match,
    assert_params_identical,
    final_params,
    finalized_steps,
    metrics_lines,
    tmp_dirs,
)

from jaxvit.training import checkpointing


def _inode(path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _new_train_lines(workdir, at_step: int | None = None):
    """An event: the process started now logged a train line (for step ``at_step`` if given).

    Each run rewrites metrics.jsonl (dropping the lines past its checkpoint) into a new
    file, so lines of the file as it was before the run started are never mistaken for new.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    old = _inode(path)

    def event() -> bool:
        if _inode(path) in (None, old):
            return False
        return any(
            "train/loss" in m and (at_step is None or m["step"] == at_step) for m in metrics_lines(workdir)
        )

    return event


def _nth_save_started(workdir, n: int):
    """An event: the ``n``-th new half-written step directory of this process appeared."""
    seen: set[str] = set()
    latest = os.path.join(workdir, checkpointing.LATEST_DIR)

    def event() -> bool:
        if os.path.isdir(latest):
            seen.update(name for name in os.listdir(latest) if TMP_MARK in name)
        return len(seen) >= n

    return event


def _kill_moment(kind: str, workdir, rng: random.Random):
    """``(event, delay)``: kill ``delay`` seconds after ``event()`` first holds."""
    if kind == "step":  # somewhere in the train steps after the first logged one
        return _new_train_lines(workdir), rng.uniform(0.0, 0.3)
    if kind == "save":  # at once, while orbax is writing a step
        return _nth_save_started(workdir, rng.choice([1, 2])), 0.0
    if kind == "eval":  # the step-6 line is flushed just before the step-6 evaluation
        return _new_train_lines(workdir, at_step=6), rng.uniform(0.0, 0.15)
    if kind == "startup":  # importing, reading the data, restoring or compiling
        return (lambda: True), rng.uniform(0.5, 4.0)
    if kind == "anytime":  # any step, save, evaluation or the exit, after training started
        return _new_train_lines(workdir), rng.uniform(0.0, 2.0)
    raise ValueError(kind)


# Two kills per seed, then a run to the end: 9 processes in all.
SCHEDULES = {0: ("save", "eval"), 1: ("step", "save"), 2: ("startup", "anytime")}


@pytest.mark.parametrize("seed", sorted(SCHEDULES))
def test_sigkill_and_rerun_ends_bit_identical(trainer, reference, tmp_path, seed):
    rng = random.Random(seed)
    workdir = tmp_path / "w"
    history = []
    for kind in SCHEDULES[seed]:
        event, delay = _kill_moment(kind, workdir, rng)
        before = finalized_steps(workdir)
        proc = trainer.start(workdir)
        killed = trainer.kill_when(proc, event, delay)
        run = trainer.finish(proc)
        on_disk, half_written = finalized_steps(workdir), tmp_dirs(workdir)
        history.append((kind, round(delay, 3), run.returncode, on_disk, half_written))
        # It finished before the signal landed (also possible in the instant between the
        # liveness check and the kill): only the moments timed by a random delay may.
        if not killed or run.returncode == 0:
            assert kind in ("anytime", "startup"), f"the {kind!r} moment never came: {history}"
            assert run.returncode == 0, run.describe()
            continue
        assert run.returncode == -9, run.describe()
        # The run that was killed resumed from the newest step finished before it started.
        if run.resumed_from is not None:
            assert run.resumed_from == before[-1], (history, run.describe())
        if kind == "save":
            assert any(d.startswith(checkpointing.LATEST_DIR + "/") for d in half_written), (
                f"the kill missed the save it aimed at: {history}"
            )

    expected_start = finalized_steps(workdir)
    last = trainer.run(workdir)
    assert last.returncode == 0, (history, last.describe())
    assert "final test accuracy" in last.stdout
    # Never a half-written step: resumed from the newest finished one, read without error,
    # and orbax's temporary directories are gone.
    assert last.resumed_from == (expected_start[-1] if expected_start else None), history
    assert "cannot be restored" not in last.stderr, last.describe()
    assert tmp_dirs(workdir) == []
    assert finalized_steps(workdir)[-1] == TOTAL_STEPS

    assert_params_identical(final_params(workdir), reference.params)
    assert_metrics_match(workdir, reference.metrics)


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux ``/proc``)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after ")"
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_with_data_workers_leaves_no_orphans_and_resumes_identical(trainer, reference, tmp_path):
    workdir = tmp_path / "w"
    args = ("--config.data.workers=2",)
    proc = trainer.start(workdir, *args)
    workers = []

    def training_with_workers() -> bool:
        workers[:] = _children(proc.pid)
        return bool(metrics_lines(workdir)) and len(workers) >= 2

    assert trainer.kill_when(proc, training_with_workers, 0.0)
    assert trainer.finish(proc).returncode == -9
    on_disk = finalized_steps(workdir)
    # The workers (and multiprocessing's resource tracker) notice and exit.
    deadline = time.monotonic() + 30
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = [pid for pid in workers if _alive(pid)]
    for pid in orphans:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not orphans, f"data workers outlived the killed trainer: {orphans}"

    last = trainer.run(workdir, *args)
    assert last.returncode == 0, last.describe()
    assert last.resumed_from == (on_disk[-1] if on_disk else None)
    assert_params_identical(final_params(workdir), reference.params)
    assert_metrics_match(workdir, reference.metrics)
