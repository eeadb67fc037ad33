"""FlexiViT's patch-size resampling: ``resample_patch_embed`` and ``load_pretrained(..., patch_size=)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_patch_embed as timm_resample

import jaxvit


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
