"""timm hub folders (config.json + model.safetensors), read and written, and the refusals around them.

The folders are written by timm's own ``save_for_hf``; the way back is built by
timm's own ``create_model("local-dir:...")``. Tiny random weights, perturbed.
"""

from __future__ import annotations

import json
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.models._hub import save_for_hf

import jaxvit
from jaxvit import predict
from jaxvit.families.vit import TIMM_ARCHITECTURES

KWARGS = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3, dynamic_img_size=True)


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def _saved_by_timm(tmp_path_factory, name: str):
    """``(peer, folder)``: timm's ``name`` at 32x48 px, perturbed, saved by timm's ``save_for_hf``."""
    peer = _perturbed(timm.create_model(name, pretrained=False, img_size=(32, 48), **KWARGS))
    folder = tmp_path_factory.mktemp(name) / "peer"
    save_for_hf(peer, str(folder), safe_serialization=True)
    return peer, folder


@pytest.fixture(scope="module")
def deit3_folder(tmp_path_factory):
    """A DeiT-3 (no_embed_class): 24 position-embedding rows for 4x6 patches and a class token."""
    return _saved_by_timm(tmp_path_factory, "deit3_small_patch16_224")


def test_a_timm_folder_loads_with_its_grid_heads_and_preprocessing(deit3_folder):
    peer, folder = deit3_folder
    bundle = jaxvit.load_for_inference(folder)
    assert bundle.image_size == (32, 48) and bundle.model.num_heads == 2
    assert bundle.origin == "timm"
    x = np.random.default_rng(0).random((2, 32, 48, 3), dtype=np.float32)
    ours = np.asarray(bundle.model.apply({"params": bundle.params}, jnp.asarray(x)))
    theirs = _logits(peer, x)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
    # what timm's own data config resolves for the model
    data = resolve_data_config({}, model=peer)
    assert bundle.mean == pytest.approx(tuple(data["mean"])) and bundle.std == pytest.approx(
        tuple(data["std"])
    )
    assert bundle.crop_pct == pytest.approx(data["crop_pct"])
    assert bundle.interpolation == data["interpolation"]
    assert bundle.center_crop == (data["crop_mode"] == "center" and data["crop_pct"] == 1.0)


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """A ViT with a class slot: 4x6 + 1 = 25 rows, which a 5x5 grid without one also is."""
    return _saved_by_timm(tmp_path_factory, "vit_small_patch16_224")


def test_the_bare_file_of_an_ambiguous_grid_is_refused_naming_checkpoint_grid(vit_folder):
    peer, folder = vit_folder
    assert jaxvit.load_for_inference(folder).image_size == (32, 48)
    bare = folder / "model.safetensors"
    with pytest.raises(ValueError, match=r"25 rows .*checkpoint_grid=\(5, 5\) or .*\(4, 6\)") as e:
        jaxvit.load_for_inference(bare, num_heads=2)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="checkpoint_grid"):
        jaxvit.load_pretrained(bare, jaxvit.load_for_inference(folder).model, (32, 48))
    image = folder.parent / "x.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    argv = ["--checkpoint", str(bare), "--num-heads", "2", "--json", str(image)]
    assert predict.main(argv) == 2
    assert predict.main([*argv[:4], "--checkpoint-grid", "4", "6", *argv[4:]]) == 0
    bundle = jaxvit.load_for_inference(bare, num_heads=2, checkpoint_grid=(4, 6))
    x = np.random.default_rng(1).random((1, 32, 48, 3), dtype=np.float32)
    ours = np.asarray(bundle.model.apply({"params": bundle.params}, jnp.asarray(x)))
    assert np.abs(ours - _logits(peer, x)).max() / np.abs(_logits(peer, x)).max() < 1e-4


def test_a_bare_file_does_not_have_its_head_count_guessed(deit3_folder):
    _, folder = deit3_folder
    with pytest.raises(ValueError, match=r"does not say its number of attention heads.*pass num_heads="):
        jaxvit.load_for_inference(folder / "model.safetensors", checkpoint_grid=(4, 6))


def test_a_bare_clip_tower_must_be_told_its_activation(tmp_path):
    peer = timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=32, **KWARGS)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match="does not say its activation.*pass activation="):
        jaxvit.load_for_inference(path, num_heads=2)
    assert jaxvit.load_for_inference(path, num_heads=2, activation="quick_gelu").model.layer_norm_eps == 1e-5


@pytest.mark.parametrize(
    "name",
    [
        "vit_base_patch16_224",
        "vit_base_patch16_gap_224",  # 16 heads at width 768
        "vit_base_patch16_clip_quickgelu_224",
        "vit_so400m_patch16_siglip_256",  # tanh GELU
        "deit3_small_patch16_224",
        "vit_giant_patch14_dinov2",
        "vit_betwixt_patch16_reg4_gap_256",
    ],
)
def test_the_architecture_table_is_timms(name):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False)
    block = model.blocks[0]
    act = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu"}
    activation = act[type(block.mlp.act).__name__]
    if activation == "gelu":
        assert block.mlp.act.approximate == "none"
    assert TIMM_ARCHITECTURES[name] == (
        block.attn.num_heads,
        activation,
        block.norm1.eps,
        model.no_embed_class,
    )


def _edited(folder, tmp_path, **changes):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config[section][field] = value
        else:
            config[section] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(architecture="vit_base_patch16_xp_224"), "timm model 'vit_base_patch16_xp_224' is not one"),
        (
            dict(architecture="vit_relpos_base_patch16_224.sw_in1k"),
            "timm model 'vit_relpos_base_patch16_224'",
        ),
        (dict(model_args__qk_norm=True), r"model_args \['qk_norm'\] are not supported"),
        (dict(model_args__pool_include_prefix=True), "pool_include_prefix=True is not supported"),
        (dict(model_args__global_pool="avgmax"), "global_pool='avgmax' is not supported"),
        # near misses of the fc_norm form: the config turns timm's fc_norm on, the weights lack it
        (dict(model_args__global_pool="avg"), "fc_norm=None make timm's fc_norm on, but the weights lack"),
        (dict(model_args__fc_norm=True), "fc_norm=True make timm's fc_norm on, but the weights lack"),
        (dict(num_classes=7), "num_classes=7 but the weights have a classifier of 3"),
        (dict(model_args__img_size=[32, 32]), "a 4x4 grid.*but the weights have 24"),
    ],
)
def test_what_a_timm_folder_states_and_jaxvit_cannot_do_is_refused(deit3_folder, tmp_path, changes, message):
    _, folder = deit3_folder
    with pytest.raises(ValueError, match=message) as e:
        jaxvit.load_for_inference(_edited(folder, tmp_path, **changes))
    assert "\n" not in str(e.value)


def test_a_crop_mode_jaxvit_cannot_do_is_refused_for_inference_only(deit3_folder, tmp_path):
    _, folder = deit3_folder
    edited = _edited(folder, tmp_path, pretrained_cfg__crop_mode="border")
    with pytest.raises(ValueError, match="crop_mode='border'.*not supported"):
        jaxvit.load_for_inference(edited)
    model = jaxvit.load_for_inference(folder).model
    assert jaxvit.load_pretrained(edited, model, (32, 48))["pos_embed"]["embedding"].shape == (1, 25, 32)


def test_an_export_is_a_timm_folder_that_timm_builds(deit3_folder, tmp_path):
    peer, folder = deit3_folder
    bundle = jaxvit.load_for_inference(folder)
    pre = jaxvit.checkpoints.checkpoint.Preprocessing((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 0.9, "bicubic")
    out = jaxvit.export(
        bundle.params,
        tmp_path / "out",
        "timm",
        model=bundle.model,
        image_size=bundle.image_size,
        labels=["a", "b", "c"],
        preprocessing=pre,
    )
    fresh = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = np.random.default_rng(2).random((2, 32, 48, 3), dtype=np.float32)
    np.testing.assert_array_equal(_logits(fresh, x), _logits(peer, x))
    data = resolve_data_config({}, model=fresh)
    assert (
        tuple(data["mean"]) == (0.1, 0.2, 0.3)
        and data["crop_pct"] == 0.9
        and data["input_size"] == (3, 32, 48)
    )
    again = jaxvit.load_for_inference(out)
    assert again.labels == ("a", "b", "c") and again.mean == (0.1, 0.2, 0.3) and again.crop_pct == 0.9
