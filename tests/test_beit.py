"""BEiT: the relative position bias (``rel_pos_bias="block"``), transformers' ``BeitModel`` /
``BeitForImageClassification`` and timm's ``Beit`` read and written, at the checkpoint's grid and
at another.

The peers' own code builds every file: tiny random weights, perturbed everywhere (the
relative position tables, zero at init, too).
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import transformers
from helpers import nchw, relative_error
from safetensors.torch import load_file, save_file
from timm.models._hub import save_for_hf
from transformers.models.beit.modeling_beit import BeitRelativePositionBias

import jaxvit
from jaxvit.layers import relative_position_index, resample_rel_pos_bias

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4)


@pytest.mark.parametrize("grid", [(3, 3), (2, 4)])
def test_the_relative_position_index_is_transformers(grid):
    theirs = BeitRelativePositionBias.generate_relative_position_index.__wrapped__(grid).numpy()
    np.testing.assert_array_equal(relative_position_index(grid), theirs)


def test_the_table_is_resized_as_transformers_resizes_it():
    config = transformers.BeitConfig(image_size=12, use_relative_position_bias=True, **TINY)
    peer = BeitRelativePositionBias(config)
    with torch.no_grad():
        peer.relative_position_bias_table.normal_()
        theirs = peer((5, 5), interpolate_pos_encoding=True, dim_size=26)[0].numpy()  # (H, T, T)
    table = peer.relative_position_bias_table.detach().numpy()
    resized = resample_rel_pos_bias(table, (5, 5), (3, 3))
    ours = np.transpose(np.asarray(resized)[relative_position_index((5, 5))], (2, 0, 1))
    assert relative_error(ours, theirs) < 1e-5


# (pooling, absolute position table): the fine-tuned BEiTs' mean pooling with fc_norm, and the
# class token after a final LayerNorm with a learned absolute table
FORMS = {
    "mean": dict(use_mean_pooling=True, use_absolute_position_embeddings=False),
    "cls_abs": dict(use_mean_pooling=False, use_absolute_position_embeddings=True),
    # BEiT's pre-training: one table for every block
    "shared": dict(use_relative_position_bias=False, use_shared_relative_position_bias=True),
}


@pytest.fixture(scope="module", params=list(FORMS))
def beit_folder(request, tmp_path_factory):
    config = transformers.BeitConfig(
        image_size=16,
        num_labels=3,
        layer_norm_eps=1e-6,
        **TINY,
        **{"use_relative_position_bias": True, **FORMS[request.param]},
    )
    peer = transformers.BeitForImageClassification(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("beit") / request.param
    peer.eval().save_pretrained(folder)
    return request.param, peer, folder


def _theirs(peer, x: np.ndarray) -> dict:
    interpolate = x.shape[1] != peer.config.image_size
    with torch.no_grad():
        backbone = peer.beit(nchw(x), interpolate_pos_encoding=interpolate)
        logits = peer(nchw(x), interpolate_pos_encoding=interpolate).logits
    return {"tokens": backbone.last_hidden_state, "features": backbone.pooler_output, "logits": logits}


def _ours(model, params, x: np.ndarray) -> dict:
    logits, state = model.apply({"params": params}, jnp.asarray(x), mutable=["intermediates"])
    inter = state["intermediates"]
    return {"tokens": inter["encoded"][0], "features": inter["head"]["features"][0], "logits": logits}


@pytest.mark.parametrize("size", [16, 24])
def test_beit_loads_with_the_peers_tokens_features_and_logits(beit_folder, size):
    form, peer, folder = beit_folder
    bundle = jaxvit.load_for_inference(folder)
    model = bundle.model
    kind = "shared" if form == "shared" else "block"
    assert (model.rel_pos_bias, model.layer_scale_init, model.num_classes) == (kind, 0.1, 3)
    assert (model.pool, model.fc_norm, model.posemb) == (
        ("tok", False, "learn") if form == "cls_abs" else ("gap", True, "none")
    )
    params = jaxvit.load_pretrained(folder, model, size)
    owner = params["encoder"] if form == "shared" else params["encoder"]["block_1"]["attn"]
    assert owner["rel_pos_bias"]["table"].shape == ((2 * size // 4 - 1) ** 2 + 3, 2)
    x = np.random.default_rng(size).random((2, size, size, 3), dtype=np.float32)
    ours, theirs = _ours(model, params, x), _theirs(peer, x)
    for what in theirs:
        assert relative_error(ours[what], theirs[what].numpy()) < 1e-4, what


def test_beit_exports_back_for_transformers(beit_folder, tmp_path):
    form, peer, folder = beit_folder
    bundle = jaxvit.load_for_inference(folder)
    out = jaxvit.export(bundle.params, tmp_path / "out", "hf", model=bundle.model, image_size=16)
    again, info = transformers.BeitForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x = np.random.default_rng(5).random((2, 16, 16, 3), dtype=np.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(again.eval()(nchw(x)).logits.numpy(), peer(nchw(x)).logits.numpy())


def test_what_jaxvit_does_not_compute_is_refused(tmp_path):
    both = transformers.BeitConfig(
        image_size=16, use_shared_relative_position_bias=True, use_relative_position_bias=True, **TINY
    )
    transformers.BeitModel(both).save_pretrained(tmp_path / "both")
    with pytest.raises(
        ValueError, match="a shared relative position table and one per block .* not supported"
    ):
        jaxvit.load_for_inference(tmp_path / "both")
    mim = transformers.BeitConfig(image_size=16, use_mask_token=True, **TINY)
    transformers.BeitForMaskedImageModeling(mim).save_pretrained(tmp_path / "mim")
    with pytest.raises(ValueError, match=r"\['BeitForMaskedImageModeling'\] is not supported"):
        jaxvit.load_for_inference(tmp_path / "mim")


def test_the_bias_is_an_option_of_the_one_model():
    model = jaxvit.create_model("beit:B/16", num_classes=1000)
    # microsoft/beit-base-patch16-224's 86,530,984 parameters, and the 12 x 768 key biases of
    # jaxvit's fused qkv (zero in a BEiT checkpoint, which has none)
    assert jaxvit.count_params(model) == 86_530_984 + 12 * 768
    tiny = jaxvit.create_model("mu/4", num_classes=0, rel_pos_bias="block", posemb="none")
    x = jnp.zeros((1, 8, 8, 3))
    params = tiny.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"relative position table has shape \(12, 2\) .* needs \(52, 2\)"):
        tiny.apply({"params": params}, jnp.zeros((1, 16, 16, 3)))
    for bad in (dict(class_token=False, pool="gap"), dict(num_registers=1)):
        with pytest.raises(ValueError, match="rel_pos_bias='block' .* needs one class token"):
            jaxvit.create_model("mu/4", rel_pos_bias="block", **bad)


# -- timm's BEiT: hub folders and state dicts, read and written -------------------------------------

TIMM = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def _timm_beit(**kwargs):
    peer = timm.create_model("beit_base_patch16_224", **{**TIMM, **kwargs})
    torch.manual_seed(1)
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return peer.eval()


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    peer = _timm_beit()
    folder = tmp_path_factory.mktemp("timm_beit") / "peer"
    save_for_hf(peer, str(folder), safe_serialization=True)
    return peer, folder


@pytest.mark.parametrize("size", [16, 24])
def test_a_timm_beit_folder_loads_with_timms_outputs_at_its_size_and_another(timm_folder, size):
    peer, folder = timm_folder
    bundle = jaxvit.load_for_inference(folder)
    model = bundle.model
    assert (model.rel_pos_bias, model.pool, model.fc_norm, model.num_heads, model.layer_norm_eps) == (
        "block",
        "gap",
        True,
        2,
        1e-6,
    )
    if size != 16:  # timm's own resize of the tables (checkpoint_filter_fn), into a model at 24 px
        resized = timm.create_model("beit_base_patch16_224", **{**TIMM, "img_size": size}).eval()
        resized.load_state_dict(timm.models.beit.checkpoint_filter_fn(peer.state_dict(), resized))
        peer = resized
    params = jaxvit.load_pretrained(folder, model, size)
    x = np.random.default_rng(size).random((2, size, size, 3), dtype=np.float32)
    logits, state = model.apply({"params": params}, jnp.asarray(x), mutable=["intermediates"])
    with torch.no_grad():
        tokens = peer.forward_features(nchw(x))
        theirs = {"tokens": tokens, "features": peer.forward_head(tokens, pre_logits=True)}
        theirs["logits"] = peer.forward_head(tokens)
    ours = {"tokens": state["intermediates"]["encoded"][0], "logits": logits}
    ours["features"] = state["intermediates"]["head"]["features"][0]
    for what in theirs:
        assert relative_error(ours[what], theirs[what].numpy()) < 1e-4, what


def test_a_timm_beit_exports_back_for_timm(timm_folder, tmp_path):
    peer, folder = timm_folder
    bundle = jaxvit.load_for_inference(folder)
    out = jaxvit.export(bundle.params, tmp_path / "out", "timm", model=bundle.model, image_size=16)
    fresh = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = np.random.default_rng(3).random((2, 16, 16, 3), dtype=np.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(nchw(x)).numpy(), peer(nchw(x)).numpy())


def test_a_timm_beit_folder_whose_config_disagrees_with_its_fc_norm_is_refused(timm_folder, tmp_path):
    _, folder = timm_folder
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    config = json.loads((edited / "config.json").read_text())
    config.setdefault("model_args", {})["use_fc_norm"] = False  # the weights have fc_norm
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="global_pool='avg' and use_fc_norm disagree with the weights"):
        jaxvit.load_for_inference(edited)


def test_a_bare_timm_beit_file_must_be_told_its_heads_and_pool_and_a_shared_table_reads(
    timm_folder, tmp_path
):
    peer, _ = timm_folder
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"does not say what it pools: 'gap'.*pass pool=\.\.\."):
        jaxvit.load_for_inference(path, num_heads=2)
    with pytest.raises(ValueError, match=r"does not say its number of attention heads"):
        jaxvit.load_for_inference(path, pool="gap")
    bundle = jaxvit.load_for_inference(path, pool="gap", num_heads=2)
    x = np.random.default_rng(4).random((2, 16, 16, 3), dtype=np.float32)
    with torch.no_grad():
        theirs = peer(nchw(x)).numpy()
    assert relative_error(bundle.model.apply({"params": bundle.params}, jnp.asarray(x)), theirs) < 1e-4
    shared = _timm_beit(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)  # BEiT's pre-training
    path = tmp_path / "shared.safetensors"
    save_file({k: v.contiguous() for k, v in shared.state_dict().items()}, str(path))
    bundle = jaxvit.load_for_inference(path, pool="gap", num_heads=2)
    assert bundle.model.rel_pos_bias == "shared"
    with torch.no_grad():
        theirs = shared(nchw(x)).numpy()
    assert relative_error(bundle.model.apply({"params": bundle.params}, jnp.asarray(x)), theirs) < 1e-4
    out = jaxvit.export(
        bundle.params, tmp_path / "out.safetensors", "timm", model=bundle.model, image_size=16
    )
    again = _timm_beit(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    again.load_state_dict(load_file(str(out)), strict=True)
    with torch.no_grad():
        np.testing.assert_array_equal(again(nchw(x)).numpy(), theirs)
    both = _timm_beit(use_shared_rel_pos_bias=True)
    save_file({k: v.contiguous() for k, v in both.state_dict().items()}, str(path))
    with pytest.raises(
        ValueError, match=r"a shared relative position table and one per block: not supported"
    ):
        jaxvit.load_for_inference(path, pool="gap", num_heads=2)


def test_the_geometric_resize_is_timms():
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table

    table = np.random.default_rng(0).normal(size=(rel_rows := 15 * 15 + 3, 2)).astype(np.float32)
    for new in ((4, 4), (12, 12)):
        rows = (2 * new[0] - 1) * (2 * new[1] - 1) + 3
        theirs = resize_rel_pos_bias_table(torch.from_numpy(table), new, (rows, 2)).numpy()
        ours = resample_rel_pos_bias(table, new, (8, 8), method="geometric")
        assert ours.shape == (rows, 2) and rel_rows == table.shape[0]
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
