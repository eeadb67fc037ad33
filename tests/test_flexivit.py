"""FlexiViT: ``resample_patch_embed``, ``load_pretrained(..., patch_size=)``, a model called at another
patch size, and training with a patch size drawn per step."""

from __future__ import annotations

import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_patch_embed as timm_resample

import jaxvit
from jaxvit.data import pipeline
from jaxvit.training import checkpointing, train_lib, trainer
from jaxvit.training.configs import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kernel(p: int, q: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(p, q, 3, 5)).astype(np.float32)


@pytest.mark.parametrize("old, new", [((16, 16), (8, 8)), ((8, 8), (16, 16)), ((14, 14), (16, 12))])
def test_bicubic_equals_timms_resample_patch_embed(old, new):
    kernel = _kernel(*old)
    ours = np.asarray(jaxvit.resample_patch_embed(kernel, new, "bicubic"))
    # timm's kernel is (D, C, p, q)
    theirs = timm_resample(torch.from_numpy(kernel.transpose(3, 2, 0, 1)), list(new)).numpy()
    np.testing.assert_allclose(ours, theirs.transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_an_upsampled_patch_meets_the_new_kernel_as_the_old_patch_met_the_old(method):
    # FlexiViT's defining property: <resize(x), w'> = <x, w> whenever the resize loses nothing
    kernel = _kernel(8, 8, seed=1)
    new = jaxvit.resample_patch_embed(kernel, 12, method)
    patch = np.random.default_rng(2).random((8, 8, 3), dtype=np.float32)
    if method == "bilinear":  # big_vision resizes its patches with jax.image.resize
        resized = jax.image.resize(jnp.asarray(patch), (12, 12, 3), "bilinear", antialias=True)
    else:
        x = torch.from_numpy(patch.transpose(2, 0, 1))[None]
        resized = torch.nn.functional.interpolate(x, (12, 12), mode="bicubic", antialias=True)[0]
        resized = jnp.asarray(resized.numpy().transpose(1, 2, 0))
    before = jnp.einsum("pqc,pqcd->d", jnp.asarray(patch), kernel)
    after = jnp.einsum("pqc,pqcd->d", resized, new)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


def test_refusals():
    with pytest.raises(ValueError, match="unknown patch resample method 'area'"):
        jaxvit.resample_patch_embed(_kernel(4, 4), 2, "area")
    with pytest.raises(ValueError, match=r"kernel must have shape \(p, q, channels, width\)"):
        jaxvit.resample_patch_embed(np.zeros((4, 4, 3)), 2)


def test_a_timm_checkpoint_loads_at_another_patch_size_as_timm_loads_it(tmp_path):
    kwargs = dict(img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=16, **kwargs).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path / "p16.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    # timm's own loader resizes the patch embedding (and the position table) for a patch-8 model
    peer = timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=8, **kwargs).eval()
    filtered = timm.models.vision_transformer.checkpoint_filter_fn(source.state_dict(), peer)
    peer.load_state_dict(filtered)
    model = jaxvit.create_model(
        None, width=32, depth=1, num_heads=2, patch_size=8, num_classes=3, mlp_dim=128
    )
    with pytest.raises(ValueError, match=r"patch size \(16, 16\) .* but the model has patch_size=8"):
        jaxvit.load_pretrained(path, model, 32)
    params = jaxvit.load_pretrained(path, model, 32, patch_size=8)
    x = np.random.default_rng(3).random((2, 32, 32, 3), dtype=np.float32)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
    with torch.no_grad():
        theirs = peer(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
    with pytest.raises(ValueError, match=r"patch_size=4 must be the model's"):
        jaxvit.load_pretrained(path, model, 32, patch_size=4)


# -- FlexiViT's training: one set of parameters, a patch size drawn per step -----------------------


def test_a_model_called_at_another_patch_size_is_the_resampled_model():
    model = jaxvit.create_model(
        None, width=32, depth=1, num_heads=2, patch_size=16, num_classes=3, mlp_dim=64
    )
    x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32))
    params = model.init(jax.random.key(0), x)["params"]
    params = jax.tree_util.tree_map(
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params
    )
    flexi = jax.jit(lambda p, x: model.apply({"params": p}, x, patch_size=8))(params, x)
    # the same computation written out: a patch-8 model with the kernel and the table resampled
    resampled = jax.tree_util.tree_map(lambda a: a, params)
    resampled["patch_embed"]["kernel"] = jaxvit.resample_patch_embed(
        params["patch_embed"]["kernel"], 8, "bilinear"
    )
    resampled["pos_embed"]["embedding"] = jaxvit.resample_posemb(
        params["pos_embed"]["embedding"], (4, 4), (2, 2)
    )
    expected = model.clone(patch_size=8).apply({"params": resampled}, x)
    np.testing.assert_allclose(flexi, expected, atol=1e-5)
    assert np.abs(flexi - model.apply({"params": params}, x)).max() > 1e-3
    with pytest.raises(ValueError, match=r"image size 32x32 is not divisible by the patch size 5x5"):
        model.apply({"params": params}, x, patch_size=5)


def _flexi_config(steps: int, **overrides):
    config = load_config_file(os.path.join(ROOT, "configs", "default.py"))
    config.unlock()
    config.update(total_steps=steps, progress_bar=False, async_checkpointing=False, flexi_patch_sizes=(2, 4))
    config.update_from_flattened_dict(overrides)
    config.lock()
    return config


def _accuracy(model, params, config, patch_size: int) -> float:
    source = pipeline.make_source(config, "test")
    layout = pipeline.BatchLayout(config.batch_size, 0, 1)
    correct = total = 0
    for batch in pipeline.eval_batches(source, layout, pipeline.preprocess_from_config(config)):
        logits = model.apply({"params": params}, jnp.asarray(batch["image"]), patch_size=patch_size)
        correct += float(np.sum((np.argmax(logits, -1) == batch["label"]) * batch["mask"]))
        total += float(np.sum(batch["mask"]))
    return correct / total


def test_flexivit_trains_one_model_that_reads_the_digits_at_two_patch_sizes(tmp_path, monkeypatch):
    # one trace per patch size: a recompile after the first round fails the run
    monkeypatch.setattr(train_lib, "train_step", chex.assert_max_traces(train_lib.train_step, n=2))
    small = {"model.width": 32, "model.depth": 2, "model.mlp_dim": 64, "model.num_heads": 2}
    config = _flexi_config(1200, eval_every=0, checkpoint_every=0, **small)
    drawn = [trainer.patch_size_of_step(config, step) for step in range(1200)]
    assert 500 < drawn.count(2) < 700 and drawn.count(2) + drawn.count(4) == 1200
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    model, params, _ = checkpointing.restore_params(str(tmp_path))
    at_2, at_4 = (_accuracy(model, params, config, p) for p in (2, 4))
    assert at_2 == pytest.approx(metrics["eval/top1"])  # the run's own eval is at the model's patch size
    # measured: 0.839 at patch 2 (16 tokens), 0.875 at patch 4 (4 tokens); chance is 0.1
    assert at_2 > 0.8 and at_4 > 0.8, (at_2, at_4)
    with pytest.raises(ValueError, match=r"flexi_patch_sizes=\[3\] must be positive ints that divide"):
        trainer.validate_config(_flexi_config(2, flexi_patch_sizes=(3,)), 1)


def test_a_resumed_flexivit_run_draws_the_same_patch_sizes_and_ends_bit_exact(tmp_path):
    tiny = dict(
        checkpoint_every=4, eval_every=0, **{"model.width": 16, "model.depth": 1, "optimizer.warmup_steps": 2}
    )
    first = tmp_path / "first"
    config = _flexi_config(8, **tiny)
    assert [trainer.patch_size_of_step(config, s) for s in range(4, 8)] == [2, 4, 2, 4]  # both resumed
    trainer.train_and_evaluate(config, str(first))
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    kept = sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
    shutil.rmtree(resumed / "checkpoints" / str(kept[-1]))  # the run starts again from step 4
    trainer.train_and_evaluate(config, str(resumed))
    a, b = (checkpointing.restore_params(str(w))[1] for w in (first, resumed))
    assert kept == [4, 8]
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
