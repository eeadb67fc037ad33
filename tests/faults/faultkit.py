"""Helpers for the fault tests: real ``train.py`` processes on real workdirs.

Every process shares one JAX compilation cache for the test session, so only
the first run of a configuration pays for XLA compiles. The uninterrupted
reference run (``reference``) compiles from scratch; the interrupted runs load
the cached executables, so bit-identity also covers "cached vs fresh compile".
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np
import pytest

from jaxvit.training import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "train.py")
TINY = os.path.join(ROOT, "tests", "configs", "tiny.py")
FAULTY_TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_faulty_train.py")
TOTAL_STEPS = 12  # tests/configs/tiny.py
PROCESS_TIMEOUT = 240  # seconds; a hung run fails its test instead of the CI job
RESUMED = re.compile(r"resuming from step (\d+)")
TMP_MARK = "orbax-checkpoint-tmp"


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("jax_cache")
    return {
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


@dataclass
class Run:
    """A finished (or killed) process: exit code and its captured output."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def resumed_from(self) -> int | None:
        found = RESUMED.findall(self.stderr)
        return int(found[-1]) if found else None

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-6000:]}"


class Trainer:
    """Starts ``train.py`` on the tiny config with the session's compile cache."""

    def __init__(self, env: dict[str, str], log_dir: str):
        self.env = {**os.environ, **env}
        self.log_dir = log_dir

    def command(self, workdir, *args: str, fault: str | None = None) -> list[str]:
        script = [FAULTY_TRAIN, fault] if fault else [TRAIN]
        return [sys.executable, *script, f"--config={TINY}", f"--workdir={workdir}", *args]

    def start(self, workdir, *args: str, fault: str | None = None, env=None) -> subprocess.Popen:
        log_base = os.path.join(self.log_dir, f"run{time.monotonic_ns()}")
        # Files, not pipes: a chatty child never blocks on a full pipe.
        out, err = open(log_base + ".out", "w"), open(log_base + ".err", "w")
        proc = subprocess.Popen(
            self.command(workdir, *args, fault=fault),
            stdout=out,
            stderr=err,
            cwd=ROOT,
            env={**self.env, **(env or {})},
        )
        proc.log_files = (out, err)
        proc.log_base = log_base
        proc.started = time.monotonic()
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = PROCESS_TIMEOUT) -> Run:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for f in proc.log_files:
            f.close()
        with open(proc.log_base + ".out") as out, open(proc.log_base + ".err") as err:
            return Run(proc.returncode, out.read(), err.read())

    def run(self, workdir, *args: str, fault: str | None = None, env=None) -> Run:
        return self.finish(self.start(workdir, *args, fault=fault, env=env))

    @staticmethod
    def kill_when(
        proc: subprocess.Popen, event: Callable[[], bool], delay: float = 0.0, sig=signal.SIGKILL
    ) -> bool:
        """Polls ``event()`` every ~2 ms; once true, waits ``delay`` s and sends ``sig``.

        Returns whether the signal reached a live process (False: it exited first).
        """
        deadline = proc.started + PROCESS_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if event():
                time.sleep(delay)
                if proc.poll() is not None:
                    return False
                proc.send_signal(sig)
                return True
            time.sleep(0.002)
        return False


@pytest.fixture(scope="session")
def trainer(compile_cache, tmp_path_factory) -> Trainer:
    return Trainer(compile_cache, str(tmp_path_factory.mktemp("logs")))


# -- the workdir on disk ------------------------------------------------------


def finalized_steps(workdir) -> list[int]:
    """Steps orbax finished (a plain integer directory name), oldest first."""
    directory = os.path.join(workdir, checkpointing.LATEST_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def tmp_dirs(workdir) -> list[str]:
    """Half-written checkpoints left by orbax, in the latest and best directories."""
    found = []
    for sub in (checkpointing.LATEST_DIR, checkpointing.BEST_DIR):
        directory = os.path.join(workdir, sub)
        if os.path.isdir(directory):
            found += [f"{sub}/{n}" for n in os.listdir(directory) if TMP_MARK in n]
    return sorted(found)


def metrics_lines(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    # A kill can cut the last line short; a complete line ends with a newline.
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


def train_steps_logged(workdir) -> int:
    return max((m["step"] for m in metrics_lines(workdir) if "train/loss" in m), default=0)


def final_params(workdir):
    _, params, _ = checkpointing.restore_params(workdir)
    return params


def assert_params_identical(actual, expected) -> None:
    """Bit-identical parameter trees: same paths, shapes, dtypes and every bit."""
    flat_a = dict(jax.tree_util.tree_leaves_with_path(actual))
    flat_e = dict(jax.tree_util.tree_leaves_with_path(expected))
    assert sorted(map(str, flat_a)) == sorted(map(str, flat_e))
    differing = [
        jax.tree_util.keystr(path)
        for path, value in flat_e.items()
        if not (value.dtype == flat_a[path].dtype and np.array_equal(flat_a[path], value))
    ]
    assert not differing, f"parameters differ from the uninterrupted run: {differing}"


TRAIN_KEYS = ("train/loss", "train/accuracy", "train/grad_norm", "learning_rate")
EVAL_KEYS = ("eval/loss", "eval/top1", "eval/top5")


def assert_metrics_match(workdir, reference: list[dict], keys=TRAIN_KEYS + EVAL_KEYS) -> None:
    """Every line logged equals the reference run's line for that step in ``keys``, exactly;
    every reference line was logged exactly once (a resumed run drops the lines past its
    checkpoint before logging those steps again)."""
    expected = {(m["step"], "eval/loss" in m): m for m in reference}
    seen = set()
    for line in metrics_lines(workdir):
        key = (line["step"], "eval/loss" in line)
        assert key not in seen, f"step {line['step']} logged twice"
        want = expected[key]
        for k in keys:
            if k in want:
                assert line[k] == want[k], f"step {line['step']} {k}: {line[k]} != {want[k]}"
        seen.add(key)
    assert seen == set(expected), f"missing metrics lines: {sorted(set(expected) - seen)}"


@dataclass
class Reference:
    workdir: str
    params: dict
    metrics: list[dict]


@pytest.fixture(scope="session")
def reference(trainer, tmp_path_factory) -> Reference:
    """The uninterrupted tiny run, once per session."""
    workdir = tmp_path_factory.mktemp("reference") / "w"
    run = trainer.run(workdir)
    assert run.returncode == 0, run.describe()
    assert "final test accuracy" in run.stdout
    assert finalized_steps(workdir)[-1] == TOTAL_STEPS
    return Reference(str(workdir), final_params(workdir), metrics_lines(workdir))
