"""``python -m jaxvit.plan``: a tiny config compiled for a v5e:2x2 TPU topology on this CPU-only
machine, by the TPU compiler (libtpu), checked against the model's own sizes."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxvit
from jaxvit import ops
from jaxvit import plan as planner
from jaxvit.summary import formula_flops
from jaxvit.training import configs, trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "configs" / "tiny.py"
# Wide enough that the MLP kernels (64 x 256 = 2**14 elements) are big enough for FSDP to shard.
WIDE = {"width": 64, "mlp_dim": 256}
TOPOLOGY = "v5e:2x2"


def _config(fsdp: int):
    config = configs.load_config_file(str(CONFIG))
    config.model.update(WIDE)
    config.mesh.fsdp = fsdp
    return config


@pytest.fixture(scope="module")
def plans():
    return {fsdp: planner.plan(_config(fsdp), TOPOLOGY, max_batch=False) for fsdp in (1, 4)}


def _parameter_elements():
    model = trainer.validate_config(_config(1), 4)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    sizes = [math.prod(a.shape) for a in jax.tree_util.tree_leaves(params)]
    return sum(sizes), sum(s for s in sizes if s >= 2**14)


def test_the_state_per_chip_is_the_models_with_and_without_fsdp(plans):
    total, sharded = _parameter_elements()
    assert sharded == 4 * 64 * 256  # fc1 and fc2 of both blocks
    # float32 parameters and Adam's two moments, plus three int32 step counters
    assert plans[1]["state_bytes_per_device"] == 12 * total + 12
    # FSDP over the 4 chips keeps a quarter of each array of 2**14 elements or more
    assert plans[4]["state_bytes_per_device"] == 12 * (total - sharded) + 12 * sharded // 4 + 12
    for fsdp, p in plans.items():
        assert (p["devices"], p["batch_per_device"], p["mesh"]["fsdp"]) == (4, 4, fsdp)
        assert p["hbm_bytes_per_device"] == 16 * 2**30
        assert p["train"]["fits"] and p["eval"]["fits"]
        # the compiler's buffers hold the state (tiled, so padded) and this chip's 4 images
        assert p["train"]["argument_bytes"] >= p["state_bytes_per_device"] + 4 * 8 * 8 * 4
    assert plans[4]["train"]["argument_bytes"] < plans[1]["train"]["argument_bytes"]


def test_the_plan_counts_flops_and_finds_the_collectives_of_each_mesh(plans):
    model = trainer.validate_config(_config(1), 4)
    forward = sum(formula_flops(model, 8).values())
    for p in plans.values():
        assert p["model_flops_per_device"] == 3 * forward * 4  # 4 images per chip
        # XLA's count: a training step is a forward pass and a backward pass of twice its cost
        assert 2.5 < p["xla_flops_per_device"] / p["xla_eval_flops_per_device"] < 4.0
        assert p["step_time_lower_bound_s"] >= p["model_flops_per_device"] / 197e12
    assert "all-reduce" in plans[1]["collectives"] and "all-gather" not in plans[1]["collectives"]
    assert plans[4]["collectives"]["all-gather"]["count"] >= 4  # the sharded kernels, gathered to compute


def test_the_command_prints_the_plan_or_one_line(plans):
    wide = [f"--config.model.{k}={v}" for k, v in WIDE.items()]
    base = [sys.executable, "-m", "jaxvit.plan", f"--config={CONFIG}", *wide]
    run = subprocess.run(
        [*base, f"--topology={TOPOLOGY}", "--json", "--nomax_batch"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["state_bytes_per_device"] == plans[1]["state_bytes_per_device"]
    for args, message in (
        (["--topology=v9z:2x2"], "error: unknown topology 'v9z:2x2'"),
        ([], "error: --topology is required"),
        (["--topology=v5e:2x2", "--config.batchsize=8"], "error: unknown config key(s) ['batchsize']"),
    ):
        run = subprocess.run([*base, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert run.returncode == 2
        assert run.stderr.startswith(message) and run.stderr.count("\n") == 1, run.stderr


def test_without_libtpu_the_planner_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(planner.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'jaxvit\[tpu-plan\]'"):
        planner.topology_devices(TOPOLOGY)


def test_splash_attention_compiles_into_the_sharded_tpu_step():
    """XLA cannot partition a Pallas kernel: the steps trace under their mesh and Splash runs per
    device (shard_map) on the batch split over data and fsdp; without that this compile fails."""
    with ops.attention_impl("splash"):
        p = planner.plan(_config(4), TOPOLOGY, max_batch=False)
    assert p["train"]["fits"] and p["eval"]["fits"]


def test_a_config_that_takes_its_model_from_a_checkpoint_is_planned_with_that_model(plans, tmp_path):
    wide = jaxvit.create_model(
        None, num_classes=10, num_channels=1, depth=2, num_heads=2, patch_size=4, **WIDE
    )
    params = wide.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    folder = jaxvit.export(params, tmp_path / "wide", "hf", model=wide, image_size=8)
    config = configs.load_config_file(str(CONFIG))  # width 16: the checkpoint's 64 must win
    config.init_from, config.model_from_checkpoint = str(folder), True
    p = planner.plan(config, TOPOLOGY, max_batch=False)
    assert p["state_bytes_per_device"] == plans[1]["state_bytes_per_device"]


def test_a_step_too_big_for_the_chip_is_reported_not_raised():
    """The TPU compiler refuses a step that does not fit. The plan says so and halves the batch
    until a step compiles; here the state alone (1.6G parameters and Adam's moments) is more than
    a chip's HBM, so no batch does. (The halving that finds a batch is not run here: the TPU
    compiler's time grows with the batch, 56 s at 2**17 images of 8 px per chip.)"""
    config = _config(1)
    config.model.update(width=4096, mlp_dim=4 * 4096 * 8, num_heads=2)
    p = planner.plan(config, TOPOLOGY)
    assert not p["train"]["fits"] and "RESOURCE_EXHAUSTED" in p["train"]["compiler"]
    assert p["largest_compiled_batch_per_device"] is None
    lines = planner.format_plan(p).splitlines()
    assert (
        lines[1].startswith("train step does NOT fit: RESOURCE_EXHAUSTED")
        and "exceeds available HBM" in lines[1]
    )
    assert lines[2] == "  no batch of at least one example per device fits"
