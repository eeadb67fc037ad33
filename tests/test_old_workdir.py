"""A workdir written by jaxvit 0.1 (before the package was split into subpackages) still loads,
and resumes to what the 0.1 code computes from it.

``tests/data/workdir_0_1/`` is ``tests/configs/tiny.py`` trained for 12 steps by the code of
commit 0e0cd39 (its ``checkpoints/12`` and ``config.json``). ``workdir_0_1_reference.json``
holds what that code computed from it: the logits of ``load_for_inference`` on a fixed
input, and every parameter after resuming the run to 16 steps.

The parameters are compared to a tolerance, not bit for bit: XLA:CPU's kernels differ between
instruction sets, and so do the last bits of a run. On one host the 0.1 code and today's resume
to identical bits; the same run with AVX-512 and with AVX2 differs by at most 2.8e-5 (Adam
magnifies the rounding of near-zero gradients), while the four resumed steps move every
parameter leaf by 1e-3 to 3e-3: a resume that lost a part of the state (the optimizer moments,
the random key, the data position) is off by that order. Bit-exact resumption on one host is
tested by tests/faults/test_kill_resume.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxvit
from jaxvit.checkpoints import workdir as workdir_lib

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
OLD = HERE / "data" / "workdir_0_1"
REFERENCE = json.loads((HERE / "data" / "workdir_0_1_reference.json").read_text())


def test_old_workdir_loads_and_computes_what_it_did():
    bundle = jaxvit.load_for_inference(OLD)
    x = np.linspace(0, 1, 2 * 8 * 8 * 1, dtype=np.float32).reshape(2, 8, 8, 1)
    logits = bundle.model.apply({"params": bundle.params}, jnp.asarray(x), train=False)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(REFERENCE["logits"]), rtol=1e-6, atol=1e-7)


def test_old_workdir_resumes_to_what_the_0_1_code_computes(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(OLD, workdir)
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"--config={ROOT / 'tests' / 'configs' / 'tiny.py'}",
        f"--workdir={workdir}",
        "--config.total_steps=16",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resuming from step 12" in run.stderr
    _, params, _ = workdir_lib.restore_params(str(workdir), use_ema=False)
    resumed = {
        jax.tree_util.keystr(k): np.asarray(v, np.float32)
        for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    expected = REFERENCE["params_after_16_steps"]
    assert sorted(resumed) == sorted(expected)
    for name, leaf in expected.items():
        want = np.asarray(leaf["values"], np.float32).reshape(leaf["shape"])
        np.testing.assert_allclose(resumed[name], want, rtol=0, atol=3e-4, err_msg=name)
