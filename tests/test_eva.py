"""timm's ``Eva`` beyond DINOv3: EVA-01, EVA02 (classification and CLIP towers) and the RoPE ViTs,
read from hub folders at the checkpoint's grid and at another, and written back for timm.

timm's own code builds every file: tiny models of each registered architecture, every weight
perturbed (the mixed RoPE's learned frequencies too). At another size the peer is timm's model
at that size with timm's own ``checkpoint_filter_fn`` resize.
"""

from __future__ import annotations

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from helpers import nchw, relative_error
from safetensors.torch import save_file
from timm.layers.pos_embed_sincos import build_rotary_pos_embed, get_mixed_freqs, get_mixed_grid
from timm.models._hub import save_for_hf
from timm.models.eva import checkpoint_filter_fn

import jaxvit
from jaxvit.layers import rope_axial_tables, rope_mixed_tables, unrolled_to_scan

TIMM = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)
# registered architecture -> what the weights cannot tell, as jaxvit must read it
KINDS = {
    "eva02_tiny_patch14_224": dict(rope="axial", rope_ref_grid=(16, 16), mlp_type="swiglu", pool="gap"),
    "eva02_base_patch14_224": dict(rope="axial", mlp_norm=True, fc_norm=True, posemb="learn"),
    "eva02_base_patch16_clip_224": dict(attn_out_norm=True, mlp_norm=True, pool="tok", fc_norm=False),
    "vit_small_patch16_rope_224": dict(rope="axial", rope_theta=100.0, rope_xy=True, posemb="none"),
    "vit_small_patch16_rope_mixed_ape_224": dict(rope="mixed", rope_xy=True, posemb="learn"),
    "vit_medium_patch16_rope_reg1_gap_256": dict(num_registers=1, class_token=False, pool="gap"),
    "eva_giant_patch14_224": dict(rope="none", mlp_type="mlp", fc_norm=True),
    "vit_pe_core_tiny_patch16_384": dict(pool="map", pool_heads=8, rope_grid_offset=1.0, pre_norm=True),
    "vit_pe_core_gigantic_patch14_448": dict(pool_mlp_dim=128, class_token=False, layer_norm_eps=1e-5),
    "vit_pe_spatial_tiny_patch16_512": dict(final_norm=False, fc_norm=False, pool="gap", rope_xy=True),
    "eva02_enormous_patch14_clip_224": dict(post_norm=True, layer_scale_init=None, pool="tok"),
}


def _peer(name: str, **kwargs):
    peer = timm.create_model(name, **{**TIMM, **kwargs})
    torch.manual_seed(len(name))
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return peer.eval()


@pytest.mark.parametrize(
    ("grid", "ref", "offset", "xy"),
    [((4, 6), None, 0.0, True), ((5, 3), (16, 16), 0.0, False), ((4, 4), (24, 24), 1.0, True)],
)
def test_the_axial_rotary_tables_are_timms(grid, ref, offset, xy):
    sin, cos = build_rotary_pos_embed(
        list(grid), dim=16, temperature=100.0, in_pixels=False, ref_feat_shape=ref, grid_offset=offset,
        grid_indexing="xy" if xy else "ij",
    )  # fmt: skip
    ours_cos, ours_sin = rope_axial_tables(grid, 16, 100.0, ref, offset, xy)
    np.testing.assert_allclose(ours_cos, cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours_sin, sin.numpy(), atol=1e-6)


def test_the_mixed_rotary_tables_are_timms():
    freqs = torch.randn(2, 3, 4, 8)  # (2, depth, heads, head_dim / 2)
    t_x, t_y = get_mixed_grid([3, 5], grid_indexing="xy")
    theirs = get_mixed_freqs(freqs, t_x, t_y)[1]  # block 1: (heads, N, 2 * head_dim)
    cos, sin = rope_mixed_tables(jnp.asarray(freqs[:, 1].numpy()), (3, 5), xy=True)
    np.testing.assert_allclose(np.transpose(sin, (1, 0, 2)), theirs[..., :16].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.transpose(cos, (1, 0, 2)), theirs[..., 16:].numpy(), atol=1e-5)


@pytest.fixture(scope="module", params=sorted(KINDS))
def eva_folder(request, tmp_path_factory):
    peer = _peer(request.param)
    folder = tmp_path_factory.mktemp("eva") / request.param
    save_for_hf(peer, str(folder), safe_serialization=True)
    return request.param, peer, folder


def _outputs(model, params, peer, x: np.ndarray) -> dict:
    logits, state = model.apply({"params": params}, jnp.asarray(x), mutable=["intermediates"])
    with torch.no_grad():
        tokens = peer.forward_features(nchw(x))
        theirs = {"features": peer.forward_head(tokens, pre_logits=True), "logits": peer.forward_head(tokens)}
    theirs["tokens"] = tokens
    ours = {"features": state["intermediates"]["head"]["features"][0], "logits": logits}
    ours["tokens"] = state["intermediates"]["encoded"][0]
    return {what: relative_error(ours[what], theirs[what].numpy()) for what in theirs}


def test_an_eva_folder_loads_at_its_size_and_another_and_exports_back(eva_folder, tmp_path):
    name, peer, folder = eva_folder
    bundle = jaxvit.load_for_inference(folder)
    model = bundle.model
    assert {k: getattr(model, k) for k in KINDS[name]} == KINDS[name]
    cfg = peer.pretrained_cfg  # each family's preprocessing, as the folder states it (PE's: 0.5, 0.5)
    assert (bundle.mean, bundle.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert (bundle.crop_pct, bundle.interpolation) == (cfg["crop_pct"], cfg["interpolation"])
    x = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
    errors = _outputs(model, bundle.params, peer, x)
    resized = timm.create_model(name, **{**TIMM, "img_size": 24}).eval()
    resized.load_state_dict(checkpoint_filter_fn(peer.state_dict(), resized))
    y = np.random.default_rng(1).random((2, 24, 24, 3), dtype=np.float32)
    errors_24 = _outputs(model, jaxvit.load_pretrained(folder, model, 24), resized, y)
    assert max(errors.values()) < 1e-5 and max(errors_24.values()) < 1e-5, (errors, errors_24)
    out = jaxvit.export(bundle.params, tmp_path / "out", "timm", model=model, image_size=16)
    fresh = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(nchw(x)).numpy(), peer(nchw(x)).numpy())


TINY_MODEL = dict(width=32, depth=2, num_heads=2, patch_size=4, num_classes=3, mlp_dim=128)


def test_a_bare_eva_file_must_be_told_its_rotary_embedding_and_a_model_must_agree(tmp_path):
    peer = _peer("vit_small_patch16_rope_224")
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(path))
    with pytest.raises(
        ValueError, match=r"does not say its rotary embedding, pooling or block form .*: pass rope=\.\.\."
    ):
        jaxvit.load_for_inference(path, num_heads=2)
    told = dict(num_heads=2, rope="axial", rope_theta=100.0, rope_xy=True, pool="tok")
    bundle = jaxvit.load_for_inference(path, **told)
    x = np.random.default_rng(2).random((2, 16, 16, 3), dtype=np.float32)
    with torch.no_grad():
        theirs = peer(nchw(x)).numpy()
    assert relative_error(bundle.model.apply({"params": bundle.params}, jnp.asarray(x)), theirs) < 1e-5
    dinov3 = jaxvit.create_model(None, **TINY_MODEL, posemb="rope", layer_scale_init=1e-5)
    with pytest.raises(ValueError, match=r"has no DINOv3 rotary embedding, which the model has"):
        jaxvit.load_pretrained(path, dinov3, 16)
    folder = tmp_path / "folder"
    save_for_hf(peer, str(folder), safe_serialization=True)
    wrong = jaxvit.create_model(None, **TINY_MODEL, rope="axial", posemb="none", layer_scale_init=1e-5)
    with pytest.raises(ValueError, match=r"rope_xy=True in the file but False in the model"):
        jaxvit.load_pretrained(folder, wrong, 16)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("model_args", {})["use_fc_norm"] = True  # the weights have the final norm
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"global_pool='token' and the norms it implies disagree with the weights"
    ):
        jaxvit.load_for_inference(folder)
    config["model_args"]["use_post_transformer_norm"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"timm Eva with both a final norm and fc_norm: not supported"):
        jaxvit.load_for_inference(folder)


def test_the_eva_files_that_do_not_say_what_they_compute_are_refused(tmp_path):
    lingbot = timm.create_model("vit_small_patch16_lingbot", **{**TIMM, "depth": 1})
    save_for_hf(lingbot, str(tmp_path / "lingbot"), safe_serialization=True)
    with pytest.raises(
        ValueError,
        match="timm model 'vit_small_patch16_lingbot': not supported as DINOv3; .*families.eva.TIMM_MODELS",
    ):
        jaxvit.load_for_inference(tmp_path / "lingbot")
    # bare, PE-Core's keys are those of a timm CLIP ViT with attention pooling, which timm has not
    pe = timm.create_model("vit_pe_core_tiny_patch16_384", **{**TIMM, "depth": 1})
    save_file({k: v.contiguous() for k, v in pe.state_dict().items()}, str(tmp_path / "pe.safetensors"))
    with pytest.raises(ValueError, match="timm's Perception Encoder .*: load its timm hub folder"):
        jaxvit.load_for_inference(tmp_path / "pe.safetensors", num_heads=2, activation="gelu")
    # bare, EVA02-E's post-norm blocks have the keys of pre-norm ones
    enormous = _peer("eva02_enormous_patch14_clip_224")
    path = tmp_path / "enormous.safetensors"
    save_file({k: v.contiguous() for k, v in enormous.state_dict().items()}, str(path))
    told = dict(num_heads=2, rope="none", pool="tok")  # no rotary base nor axis order to tell
    with pytest.raises(ValueError, match=r"pooling or block form .*: pass post_norm=\.\.\."):
        jaxvit.load_for_inference(path, **told)
    bundle = jaxvit.load_for_inference(path, **told, post_norm=True)
    x = np.random.default_rng(3).random((2, 16, 16, 3), dtype=np.float32)
    with torch.no_grad():
        theirs = enormous(nchw(x)).numpy()
    assert relative_error(bundle.model.apply({"params": bundle.params}, jnp.asarray(x)), theirs) < 1e-5


@pytest.mark.parametrize(
    ("variant", "timm_name"),
    [("eva02:S/14", "eva02_small_patch14_224"), ("eva02:B/14", "eva02_base_patch14_224")],
)
def test_the_eva02_variants_count_timms_parameters(variant, timm_name):
    model = jaxvit.create_model(variant, num_classes=0)
    with torch.device("meta"):
        peer = timm.create_model(timm_name, num_classes=0)
    key_biases = model.depth * model.width  # jaxvit's fused qkv has a key bias, zero in EVA
    assert jaxvit.count_params(model, 224) == sum(p.numel() for p in peer.parameters()) + key_biases


def test_the_eva_options_compose_scanned_and_in_bf16_and_their_parameters_train():
    options = dict(rope="mixed", rope_xy=True, mlp_type="swiglu", mlp_norm=True, attn_out_norm=True)
    options.update(num_registers=1, layer_scale_init=1e-5, mlp_dim=48, num_classes=0)
    model = jaxvit.create_model(None, **{**TINY_MODEL, **options})
    x = np.random.default_rng(5).normal(size=(2, 16, 20, 3)).astype(np.float32)
    params = model.init(jax.random.key(0), x)["params"]
    block = params["encoder"]["block_1"]
    assert block["attn"]["rope_freqs"].shape == (2, 2, 8) and block["mlp"]["norm"]["scale"].shape == (48,)
    scanned = jaxvit.create_model(None, **{**TINY_MODEL, **options, "scan": True})
    np.testing.assert_array_equal(
        model.apply({"params": params}, x), scanned.apply({"params": unrolled_to_scan(params)}, x)
    )
    in_bf16 = jaxvit.create_model(None, **{**TINY_MODEL, **options, "dtype": jnp.bfloat16})
    assert in_bf16.apply({"params": params}, x).dtype == jnp.bfloat16
    grads = jax.grad(lambda p: (model.apply({"params": p}, x, train=True) ** 2).sum())(params)
    for name in ("attn/rope_freqs", "attn/norm/scale", "mlp/norm/scale"):
        leaf = flax.traverse_util.flatten_dict(grads["encoder"]["block_1"], sep="/")[name]
        assert float(jnp.abs(leaf).sum()) > 0, name
