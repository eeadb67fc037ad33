"""A workdir written by jaxvit 0.1 (before the package was split into subpackages) still loads,
and resumes to the same bits.

``tests/data/workdir_0_1/`` is ``tests/configs/tiny.py`` trained for 12 steps by the code of
commit 0e0cd39 (its ``checkpoints/12`` and ``config.json``). ``workdir_0_1_reference.json``
holds what that code computed from it: the logits of ``load_for_inference`` on a fixed
input, and a sha256 of every parameter after resuming the run to 16 steps.
"""

from __future__ import annotations

import hashlib
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


def test_old_workdir_resumes_to_the_same_bits(tmp_path):
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
    digest = {
        jax.tree_util.keystr(k): hashlib.sha256(
            np.ascontiguousarray(np.asarray(v, np.float32)).tobytes()
        ).hexdigest()
        for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    assert digest == REFERENCE["params_after_16_steps"]
