"""MAE: its sin-cos embedding (``posemb="sincos2d_mae"``), transformers' ``ViTMAEModel`` read and
written, and the fine-tuned form with ``fc_norm`` (timm's ``global_pool="avg"``), read and written.

The peers' own code builds every file: tiny random weights, perturbed everywhere (the frozen
position table too, so that reading it is what gives the match).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import transformers
from helpers import nchw, relative_error
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

import jaxvit

MAE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8)


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _images(size, seed: int = 0) -> np.ndarray:
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).random((2, h, w, 3), dtype=np.float32)


def _mae_tokens(peer, x: np.ndarray) -> np.ndarray:
    """``ViTMAEModel``'s tokens of the whole image in order: no token dropped, none shuffled."""
    n, h, w, _ = x.shape
    patches = (h // peer.config.patch_size) * (w // peer.config.patch_size)
    noise = torch.arange(patches, dtype=torch.float32)[None].repeat(n, 1)
    interpolate = (h, w) != (peer.config.image_size,) * 2
    with torch.no_grad():
        return peer(nchw(x), noise=noise, interpolate_pos_encoding=interpolate).last_hidden_state.numpy()


def _our_tokens(model, params, x: np.ndarray) -> np.ndarray:
    _, state = model.apply({"params": params}, jnp.asarray(x), mutable=["intermediates"])
    return np.asarray(state["intermediates"]["encoded"][0])


def test_the_mae_sincos_table_is_transformers_and_not_big_visions():
    peer = transformers.ViTMAEModel(transformers.ViTMAEConfig(image_size=32, **MAE))
    # transformers 5 leaves a fresh model's table at zeros; its own initializer writes MAE's
    peer.embeddings.patch_embeddings.projection._is_hf_initialized = False
    peer.embeddings.initialize_weights()
    theirs = peer.embeddings.position_embeddings.detach().numpy()
    ours = jaxvit.posemb_sincos_2d((4, 4), 32, num_prefix_tokens=1, kind="sincos2d_mae")
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    big_vision = jaxvit.posemb_sincos_2d((4, 4), 32, num_prefix_tokens=1)
    assert np.abs(big_vision - theirs).max() > 0.05
    model = jaxvit.create_model("mae:B/16", num_classes=0)
    assert model.posemb == "sincos2d_mae" and model.layer_norm_eps == 1e-6
    # ViTMAEModel("vit-mae-base") has 85,798,656, of which its frozen table is 197 x 768
    assert jaxvit.count_params(model) == 85_798_656 - 197 * 768


@pytest.fixture(scope="module")
def mae_folder(tmp_path_factory):
    config = transformers.ViTMAEConfig(image_size=32, mask_ratio=0.0, layer_norm_eps=1e-6, **MAE)
    peer = _perturbed(transformers.ViTMAEModel(config))
    folder = tmp_path_factory.mktemp("mae") / "peer"
    peer.save_pretrained(folder)
    return peer, folder


@pytest.mark.parametrize("size", [32, 48])
def test_vit_mae_model_loads_with_the_peers_tokens(mae_folder, size):
    peer, folder = mae_folder
    bundle = jaxvit.load_for_inference(folder)
    model = bundle.model
    assert (model.num_classes, model.posemb, model.pool, bundle.image_size) == (0, "learn", "tok", (32, 32))
    assert bundle.mean == (0.485, 0.456, 0.406) and bundle.interpolation == "bicubic"
    x = _images(size)
    params = jaxvit.load_pretrained(folder, model, size)
    theirs = _mae_tokens(peer, x)
    assert relative_error(_our_tokens(model, params, x), theirs) < 1e-4
    assert relative_error(model.apply({"params": params}, jnp.asarray(x)), theirs[:, 0]) < 1e-4


def test_vit_mae_model_exports_back_for_transformers(mae_folder, tmp_path):
    peer, folder = mae_folder
    bundle = jaxvit.load_for_inference(folder)
    out = jaxvit.export(bundle.params, tmp_path / "out", "hf", model=bundle.model, image_size=32)
    again, info = transformers.ViTMAEModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x = _images(32, seed=1)
    assert relative_error(_mae_tokens(again.eval(), x), _mae_tokens(peer, x)) < 1e-5


def test_the_pretraining_checkpoint_with_its_decoder_is_refused(tmp_path):
    config = transformers.ViTMAEConfig(
        image_size=32,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_intermediate_size=32,
        **MAE,
    )
    transformers.ViTMAEForPreTraining(config).save_pretrained(tmp_path / "pre")
    with pytest.raises(ValueError, match=r"ViTMAEForPreTraining's pixel decoder \(decoder\..*not supported"):
        jaxvit.load_for_inference(tmp_path / "pre")


# -- timm's fine-tuned MAE form: the mean of the patch tokens, then fc_norm -------------------------

TIMM = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, dynamic_img_size=True)


@pytest.fixture(scope="module")
def fc_norm_folder(tmp_path_factory):
    """timm's ViT with ``global_pool="avg"`` (so ``fc_norm`` on, the final norm off), at 32x48 px."""
    peer = timm.create_model("vit_base_patch16_224", img_size=(32, 48), global_pool="avg", **TIMM)
    assert isinstance(peer.fc_norm, torch.nn.LayerNorm) and isinstance(peer.norm, torch.nn.Identity)
    peer = _perturbed(peer, seed=1)
    folder = tmp_path_factory.mktemp("fc_norm") / "peer"
    save_for_hf(peer, str(folder), safe_serialization=True)
    return peer, folder


@pytest.mark.parametrize("size", [(32, 48), (48, 48)])
def test_a_timm_fc_norm_vit_loads_with_the_peers_features_and_logits(fc_norm_folder, size):
    peer, folder = fc_norm_folder
    model = jaxvit.load_for_inference(folder).model
    assert (model.fc_norm, model.pool, model.class_token) == (True, "gap", True)
    params = jaxvit.load_pretrained(folder, model, size)
    assert "norm" not in params["encoder"] and set(params["head"]) == {"fc_norm", "classifier"}
    x = _images(size, seed=2)
    logits, state = model.apply({"params": params}, jnp.asarray(x), mutable=["intermediates"])
    with torch.no_grad():
        tokens = peer.forward_features(nchw(x))
        features, theirs = peer.forward_head(tokens, pre_logits=True), peer.forward_head(tokens)
    assert relative_error(state["intermediates"]["encoded"][0], tokens.numpy()) < 1e-4
    assert relative_error(state["intermediates"]["head"]["features"][0], features.numpy()) < 1e-4
    assert relative_error(logits, theirs.numpy()) < 1e-4


def test_a_timm_fc_norm_vit_exports_back_for_timm(fc_norm_folder, tmp_path):
    peer, folder = fc_norm_folder
    bundle = jaxvit.load_for_inference(folder)
    out = jaxvit.export(bundle.params, tmp_path / "out", "timm", model=bundle.model, image_size=(32, 48))
    fresh = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = _images((32, 48), seed=3)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(nchw(x)).numpy(), peer(nchw(x)).numpy())


def test_a_bare_fc_norm_file_with_a_class_token_must_be_told_its_pool(fc_norm_folder, tmp_path):
    peer, _ = fc_norm_folder
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(path))
    stated = dict(checkpoint_grid=(4, 6), num_heads=2)
    with pytest.raises(ValueError, match=r"does not say what it pools: 'gap' .* pass pool=\.\.\."):
        jaxvit.load_for_inference(path, **stated)
    bundle = jaxvit.load_for_inference(path, pool="gap", **stated)
    assert bundle.model.fc_norm and bundle.image_size == (32, 48)
    x = _images((32, 48), seed=4)
    with torch.no_grad():
        theirs = peer(nchw(x)).numpy()
    assert relative_error(bundle.model.apply({"params": bundle.params}, jnp.asarray(x)), theirs) < 1e-4
    plain = bundle.model.clone(fc_norm=False)  # the same sizes without fc_norm do not load
    with pytest.raises(ValueError, match="fc_norm"):
        jaxvit.load_pretrained(path, plain, (32, 48), checkpoint_grid=(4, 6))


def test_fc_norm_replaces_the_final_norm_and_is_refused_where_it_cannot_be():
    model = jaxvit.create_model("mu/8", num_classes=3, pool="gap", fc_norm=True)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, 16, 16, 3)))["params"]
    assert "norm" not in params["encoder"] and params["head"]["fc_norm"]["scale"].shape == (32,)
    plain = jaxvit.create_model("mu/8", num_classes=3, pool="gap")
    assert jaxvit.count_params(model, 16) == jaxvit.count_params(plain, 16)
    for bad in (dict(pool="attn_pool"), dict(distill_token=True)):
        with pytest.raises(ValueError, match="fc_norm=True"):
            jaxvit.create_model("mu/8", fc_norm=True, **bad)
    with pytest.raises(ValueError, match="fc_norm=True .* has no final LayerNorm of its tokens"):
        jaxvit.intermediate_features(model, {"params": {}}, jnp.zeros((1, 16, 16, 3)), norm=True)
