"""The README's "From Flax NNX" example runs as written: the linen model bridged into NNX."""

from __future__ import annotations

import contextlib
import io
import math
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_block(after_heading: str) -> str:
    text = README.read_text()
    match = re.search(re.escape(after_heading) + r".*?```python\n(.*?)```", text, re.S)
    assert match, f"no python block after {after_heading!r} in the README"
    return match.group(1)


@pytest.fixture(scope="module")
def example() -> dict:
    block = _python_block("### From Flax NNX")
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README-nnx", "exec"), scope)
    scope["_block"], scope["_stdout"] = block, out.getvalue()
    return scope


def _params(module: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _max_abs_diff(a: dict, b: dict) -> dict:
    return jax.tree_util.tree_map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)


def test_prints_shape_and_decreasing_losses(example: dict) -> None:
    assert example["logits"].shape == (4, 10)
    losses = example["losses"]
    assert len(losses) == 3
    # The classifier starts at zero (and the loaded one is zero too), so the first loss is log(10).
    assert losses[0] == pytest.approx(math.log(10), abs=1e-5)
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] < losses[0] - 0.2  # it learns, not just rounding noise
    # The printed line says what the comment in the block says.
    printed = example["_stdout"].strip().split()
    promised = re.search(r"print\(.*#\s*(.*)$", example["_block"], re.M).group(1).split()
    assert printed[:2] == promised[:2] == ["(4,", "10)"]
    np.testing.assert_allclose([float(x) for x in printed[2:]], losses, atol=5e-5)
    np.testing.assert_allclose([float(x) for x in printed[2:]], [float(x) for x in promised[2:]], atol=1e-2)


def test_bridged_model_computes_what_linen_apply_computes(example: dict) -> None:
    vit, model, images = example["vit"], example["model"], example["images"]
    trained = _params(model.vit)
    # After training the classifier is no longer zero, so the logits differ between images.
    assert np.abs(np.asarray(trained["head"]["classifier"]["kernel"])).max() > 1e-3
    for train in (False, True):  # train=True runs the blocks as a lax.scan
        bridged = np.asarray(model(images, train=train))
        linen = np.asarray(vit.apply({"params": trained}, images, train=train))
        assert np.ptp(bridged, axis=0).max() > 1e-2
        np.testing.assert_allclose(bridged, linen, rtol=1e-6, atol=1e-6)
    # The jitted step updated the module's own parameters in place.
    assert jax.tree_util.tree_structure(trained) == jax.tree_util.tree_structure(example["params"])
    assert max(jax.tree_util.tree_leaves(_max_abs_diff(trained, example["params"]))) > 0


def test_loaded_parameters_are_the_bridged_modules(example: dict) -> None:
    Classifier, vit, images = example["Classifier"], example["vit"], example["images"]
    params, model = example["params"], example["model"]
    fresh = Classifier(vit, images, nnx.Rngs(0))  # what the example's model held before loading
    initial = _params(fresh.vit)
    assert jax.tree_util.tree_structure(initial) == jax.tree_util.tree_structure(params)
    assert np.abs(np.asarray(initial["patch_embed"]["kernel"]) - params["patch_embed"]["kernel"]).max() > 0.05

    # The example's model trained from the loaded parameters, not from its lazy_init ones:
    # three AdamW steps of 1e-2 move each parameter by at most about 3e-2.
    moved = _max_abs_diff(_params(model.vit), params)
    assert max(jax.tree_util.tree_leaves(moved)) < 0.035

    # Load parameters whose classifier is not zero, so that the outputs tell them apart.
    keys = iter(jax.random.split(jax.random.key(7), 2))
    loaded = jax.tree_util.tree_map(lambda x: x, params)
    loaded["head"]["classifier"] = {
        name: jax.random.normal(next(keys), value.shape)
        for name, value in params["head"]["classifier"].items()
    }
    nnx.update(fresh.vit, loaded)
    now = _params(fresh.vit)
    assert jax.tree_util.tree_structure(now) == jax.tree_util.tree_structure(loaded)
    for got, want in zip(jax.tree_util.tree_leaves(now), jax.tree_util.tree_leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert (
        fresh.vit.encoder["block_0"]["attn"]["qkv"]["kernel"].get_value()
        is loaded["encoder"]["block_0"]["attn"]["qkv"]["kernel"]
    )
    bridged = np.asarray(fresh(images))
    assert np.ptp(bridged, axis=0).max() > 1e-2
    np.testing.assert_allclose(
        bridged, vit.apply({"params": loaded}, images, train=False), rtol=1e-6, atol=1e-6
    )
