"""Near misses: files that one reader almost reads end in a one-line refusal, never in a load.

Each file is made by the peer's own code (timm here), with tiny random weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import jaxvit

TIMM_TINY = dict(embed_dim=32, depth=1, num_heads=2, num_classes=0)

# timm's Eva models that are not DINOv3: bare, each must be told its rotary embedding (tests/test_eva.py
# reads them), and none loads into a DINOv3 model
EVA_NOT_DINOV3 = {
    "vit_small_patch16_rope_224": "pass rope=",
    "vit_small_patch16_rope_mixed_224": "pass rope_theta=",
    "vit_small_patch16_rope_ape_224": "pass rope=",
    "vit_betwixt_patch16_rope_reg4_gap_256": "pass rope=",
}


@pytest.mark.parametrize("name", sorted(EVA_NOT_DINOV3))
def test_a_timm_eva_model_that_is_not_dinov3_is_not_read_as_dinov3(name, tmp_path):
    model = timm.create_model(name, pretrained=False, **TIMM_TINY)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(
        ValueError, match=f"a bare timm Eva state dict does not say its rotary.*{EVA_NOT_DINOV3[name]}"
    ):
        jaxvit.load_for_inference(path, num_heads=2)
    dinov3 = jaxvit.create_model(
        "mu/16", num_classes=0, posemb="rope", layer_scale_init=1e-5, width=32, num_heads=2
    )
    with pytest.raises(
        ValueError,
        match="(has no DINOv3 rotary embedding|is .mixed. in the file but .dinov3.|does not match the model)",
    ):
        jaxvit.load_pretrained(path, dinov3, 32)


def test_a_timm_eva_file_named_by_its_metadata_is_refused_unless_dinov3(tmp_path):
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, **TIMM_TINY)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "named.safetensors"
    save_file(weights, str(path), metadata={"timm_model": "vit_small_patch16_rope_224"})
    with pytest.raises(ValueError, match="timm model 'vit_small_patch16_rope_224': not supported"):
        jaxvit.load_for_inference(path)
    save_file(weights, str(path), metadata={"timm_model": "vit_small_patch16_dinov3"})
    assert jaxvit.load_for_inference(path, num_heads=2).model.posemb == "rope"


def test_checkpoint_grid_settles_a_grid_the_file_cannot(tmp_path):
    # A 4x6 grid and a class slot is 25 rows, as a 5x5 grid without one is: checkpoint_grid says which.
    kwargs = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    peer = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=(32, 48), **kwargs).eval()
    torch.manual_seed(0)
    for p in peer.parameters():
        p.data += 0.02 * torch.randn_like(p)
    path = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(path))
    model = jaxvit.create_model(
        None, width=32, depth=1, num_heads=2, patch_size=8, num_classes=3, mlp_dim=128
    )
    params = jaxvit.load_pretrained(path, model, (32, 48), checkpoint_grid=(4, 6))
    x = np.random.default_rng(0).random((1, 32, 48, 3), dtype=np.float32)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
    theirs = peer(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-5
    # At another size the table is resampled from the stated grid, as timm does when it knows it.
    params = jaxvit.load_pretrained(path, model, (48, 32), checkpoint_grid=(4, 6))
    table = resample_abs_pos_embed(
        peer.pos_embed.detach(), new_size=(6, 4), old_size=(4, 6), num_prefix_tokens=1, antialias=True
    )
    np.testing.assert_allclose(params["pos_embed"]["embedding"], table.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"checkpoint_grid=\(6, 6\) does not fit the position embedding"):
        jaxvit.load_pretrained(path, model, (32, 48), checkpoint_grid=(6, 6))


def test_an_exported_sincos_table_loads_back_at_another_resolution(tmp_path):
    # The .npz layout holds the fixed table (timm's loader needs it); it is the model's own, so
    # it is left out at any size, not reported as an unexpected weight.
    model = jaxvit.create_model(
        None, width=32, depth=1, num_heads=2, patch_size=8, num_classes=3, posemb="sincos2d"
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    path = jaxvit.export(params, tmp_path / "s.npz", "npz", model=model, image_size=16)
    for size in (16, 32):
        loaded = jaxvit.load_pretrained(path, model, size)
        assert "pos_embed" not in loaded
        x = jnp.ones((1, size, size, 3))
        np.testing.assert_array_equal(model.apply({"params": loaded}, x), model.apply({"params": params}, x))


def test_a_vision_transformer_npz_computes_the_origins_tanh_gelu(tmp_path):
    # flax's nn.gelu, which vision_transformer and big_vision trained with, is the tanh form; timm's
    # _load_weights and transformers read the same weights with exact GELU. jaxvit follows the origin.
    model = jaxvit.create_model(None, width=32, depth=1, num_heads=2, patch_size=8, num_classes=3, mlp_dim=64)
    x = jnp.zeros((1, 16, 16, 3))
    params = jax.tree_util.tree_map(
        lambda a: 0.5 * jax.random.normal(jax.random.key(1), a.shape),
        model.init(jax.random.key(0), x)["params"],
    )
    path = jaxvit.export(params, tmp_path / "vt.npz", "npz", model=model)
    # jaxvit's own export says its fields (exact GELU here) ...
    assert jaxvit.load_for_inference(path).model.activation == "gelu"
    # ... a file of the origin's does not: tanh GELU, as flax computed it
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if k != "jaxvit_model"}
    np.savez(tmp_path / "origin.npz", **arrays)
    bundle = jaxvit.load_for_inference(tmp_path / "origin.npz")
    assert bundle.model.activation == "gelu_tanh"
    origin = model.clone(activation="gelu_tanh")
    image = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3))
    np.testing.assert_allclose(
        bundle.model.apply({"params": bundle.params}, image),
        origin.apply({"params": params}, image),
        atol=1e-6,
    )
