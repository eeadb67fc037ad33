"""DINOv2's own torch.hub files (``jaxvit/families/dinov2/torch_hub.py``), against a reference built here.

facebookresearch/dinov2 is not installed, so the reference is timm's
``VisionTransformer`` configured as DINOv2 (LayerScale; registers without
position slots; the packed SwiGLU), every weight perturbed, and its state dict
written back into DINOv2's hub layout, the inverse of timm's
``_convert_dinov2``; timm's own ``checkpoint_filter_fn`` reads that file back,
so it is the hub layout. At another resolution the reference's position table
is what DINOv2's ``interpolate_pos_encoding`` makes, written out below from
its formula. The measured differences are printed at the end (``pytest -s``).
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

import jaxvit
from jaxvit.checkpoints import registry
from jaxvit.checkpoints.pretrained import read_checkpoint
from jaxvit.families.dinov2 import torch_hub
from jaxvit.layers.posemb import resample_posemb

REL_TOL = 1e-4
PATCH = 14
NATIVE = 56  # a 4x4 grid
OTHER = (70, (42, 84))  # 5x5, and a non-square 3x6
TINY = dict(patch_size=PATCH, depth=2, init_values=1e-5, num_classes=0, embed_dim=48, num_heads=3)
# DINOv2's SwiGLU at width 48: hidden (int(192 * 2 / 3) + 7) // 8 * 8 = 128, packed 256 (the half keeps int() at 256)
SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=(2 * 128 + 0.5) / 48)
CASES = {
    "plain": TINY,
    "registers": dict(TINY, reg_tokens=2, no_embed_class=True),
    "swiglu": dict(TINY, **SWIGLU),
    # DINOv2's ViT-S width: the head count comes from the width
    "S-width": dict(TINY, embed_dim=384, num_heads=6, depth=1),
}
MEASURED: list[tuple[str, str, str, float]] = []


def origin_pos_table(pos_embed: torch.Tensor, height: int, width: int, offset: float, antialias: bool):
    """DINOv2's ``interpolate_pos_encoding`` for an image of ``height x width`` pixels.

    DINOv2 unpacks the image as ``B, nc, w, h``: its ``w`` is the height. The
    ``(1, D, M, M)`` table is scaled by ``((w0 + offset) / M, (h0 + offset) / M)``
    (or resized to ``(w0, h0)`` without an offset), class slot kept in front.
    """
    w, h = height, width
    n = pos_embed.shape[1] - 1
    w0, h0 = w // PATCH, h // PATCH
    if w0 * h0 == n and w == h:
        return pos_embed
    m = int(math.sqrt(n))
    grid = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        kwargs = dict(scale_factor=(float(w0 + offset) / m, float(h0 + offset) / m))
    else:
        kwargs = dict(size=(w0, h0))
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    assert tuple(grid.shape[-2:]) == (w0, h0)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, w0 * h0, -1)], dim=1)


def origin_resize(case: str) -> tuple[float, bool]:
    # the hub's _reg models: interpolate_offset=0.0, interpolate_antialias=True; the others 0.1, False
    return (0.0, True) if case == "registers" else (0.1, False)


def to_hub_layout(peer: VisionTransformer, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """timm's DINOv2 model -> DINOv2's hub state dict (``_convert_dinov2`` backwards)."""
    state = {k: v.clone() for k, v in peer.state_dict().items()}
    width = state["cls_token"].shape[-1]
    out = {"mask_token": torch.randn(1, width, generator=gen)}
    if "reg_token" in state:
        # DINOv2 keeps a class slot in the table; timm folds it into the class token
        slot = 0.1 * torch.randn(1, 1, width, generator=gen)
        out["cls_token"] = state.pop("cls_token") - slot
        out["pos_embed"] = torch.cat([slot, state.pop("pos_embed")], dim=1)
        out["register_tokens"] = state.pop("reg_token")
    swiglu = isinstance(peer.blocks[0].mlp, GluMlp)
    for key, value in state.items():
        if swiglu:  # DINOv2's SwiGLUFFN names its packed input w12 and its output w3
            key = re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", key))
        out[key] = value
    return out


def perturb(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms, LayerScales and tokens too
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def timm_features(peer: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        tokens = peer.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous())
        return {"tokens": tokens.numpy(), "pooled": peer.forward_head(tokens, pre_logits=True).numpy()}


def jaxvit_features(bundle, x: np.ndarray) -> dict[str, np.ndarray]:
    # one compiled program is quicker than op-by-op dispatch, even for one call
    apply = jax.jit(functools.partial(bundle.model.apply, mutable=["intermediates"]))
    _, state = apply({"params": bundle.params}, jnp.asarray(x))
    return {
        "tokens": np.asarray(state["intermediates"]["encoded"][0]),
        "pooled": np.asarray(state["intermediates"]["head"]["features"][0]),
    }


def images(size) -> np.ndarray:
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32)


def compare(case: str, size, ours: dict, theirs: dict) -> None:
    label = f"{size}" if isinstance(size, int) else f"{size[0]}x{size[1]}"
    for what in ("tokens", "pooled"):
        a, b = np.asarray(ours[what], np.float64), np.asarray(theirs[what], np.float64)
        assert a.shape == b.shape, (case, label, what, a.shape, b.shape)
        rel = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        MEASURED.append((case, label, what, rel))
        assert rel < REL_TOL, f"{case} {what} at {label}: max rel {rel:.3g}"


@pytest.fixture(scope="module", autouse=True)
def print_table():
    yield
    print("\n| case | resolution | output | max rel |")
    print("|---|---|---|---:|")
    for case, label, what, rel in MEASURED:
        print(f"| {case} | {label} | {what} | {rel:.2e} |")


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    """case -> (timm kwargs, timm model, hub state dict, path of the hub ``.pth``)."""
    root = tmp_path_factory.mktemp("dinov2_hub")
    gen = torch.Generator().manual_seed(0)
    out = {}
    for case, kwargs in CASES.items():
        torch.manual_seed(len(out))
        peer = perturb(VisionTransformer(img_size=NATIVE, **kwargs), gen)
        hub = to_hub_layout(peer, gen)
        path = root / f"{case}.pth"
        torch.save(hub, path)
        out[case] = (kwargs, peer, hub, path)
    return out


def heads_for(case: str) -> dict[str, int]:
    return {} if case == "S-width" else {"num_heads": 3}


@pytest.mark.parametrize("case", sorted(CASES))
def test_timm_reads_the_file_back_into_its_own_model(case, hub_files):
    kwargs, peer, hub, _ = hub_files[case]
    assert "mask_token" in hub and ("register_tokens" in hub) == (case == "registers")
    assert any(".mlp.w12." in k for k in hub) == (case == "swiglu")
    again = VisionTransformer(img_size=NATIVE, **kwargs)
    again.load_state_dict(checkpoint_filter_fn(dict(hub), again))
    for key, value in peer.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("case", sorted(CASES))
def test_features_match_at_the_native_resolution(case, hub_files):
    _, peer, _, path = hub_files[case]
    assert registry.format_for("state_dict", torch.load(path)) is torch_hub
    bundle = jaxvit.load_for_inference(path, **heads_for(case))
    model = bundle.model
    assert bundle.origin == "dinov2" and bundle.image_size == (NATIVE, NATIVE)
    assert (model.num_heads, model.num_classes, model.pool) == (peer.blocks[0].attn.num_heads, 0, "tok")
    assert model.num_registers == (2 if case == "registers" else 0)
    assert model.mlp_type == ("swiglu" if isinstance(peer.blocks[0].mlp, GluMlp) else "mlp")
    x = images(NATIVE)
    compare(case, NATIVE, jaxvit_features(bundle, x), timm_features(peer, x))


@pytest.mark.parametrize("size", OTHER, ids=str)
@pytest.mark.parametrize("case", ["plain", "registers"])  # the two resizes of the hub models
def test_features_match_the_origins_resize_at_other_resolutions(case, size, hub_files):
    kwargs, _, hub, path = hub_files[case]
    h, w = (size, size) if isinstance(size, int) else size
    table = origin_pos_table(hub["pos_embed"], h, w, *origin_resize(case))
    state = checkpoint_filter_fn(dict(hub), VisionTransformer(img_size=NATIVE, **kwargs))
    if case == "registers":  # timm's no_embed_class: the class slot goes into the class token
        state["cls_token"] = hub["cls_token"] + table[:, :1]
        table = table[:, 1:]
    state["pos_embed"] = table
    reference = VisionTransformer(img_size=(h, w), **kwargs).eval()
    reference.load_state_dict(state)
    bundle = jaxvit.load_for_inference(path, image_size=size, num_heads=3)
    x = images(size)
    compare(case, size, jaxvit_features(bundle, x), timm_features(reference, x))


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_offset_is_torchs_bicubic_at_the_offset_scale_factor(antialias):
    rng = np.random.default_rng(1)
    for old, new in [(4, (5, 5)), (5, (2, 9)), (37, (16, 23)), (6, (6, 4))]:
        table = rng.normal(size=(1, 1 + old * old, 8)).astype(np.float32)
        grid = torch.from_numpy(table[:, 1:]).reshape(1, old, old, 8).permute(0, 3, 1, 2)
        scale = ((new[0] + 0.1) / old, (new[1] + 0.1) / old)
        theirs = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
        theirs = theirs.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
        ours = resample_posemb(table, new, (old, old), 1, method="bicubic_offset", antialias=antialias)
        np.testing.assert_array_equal(ours[:, :1], table[:, :1])
        # torch places its taps in float32, jaxvit in float64: a few 1e-6 of the table's scale apart
        rel = float(np.max(np.abs(np.asarray(ours[:, 1:]) - theirs)) / np.max(np.abs(theirs)))
        MEASURED.append(("bicubic_offset" + " antialias" * antialias, f"{old} -> {new}", "table", rel))
        assert rel < 1e-5, (old, new, rel)


def test_the_file_says_dinov2s_preprocessing_and_only_it_claims_the_file(hub_files):
    _, _, hub, path = hub_files["plain"]
    arrays = {k: v.numpy() for k, v in hub.items()}
    assert [f.NAME for f in registry.FORMATS if f.claims("state_dict", arrays)] == ["dinov2", "timm"]
    assert registry.format_for("state_dict", arrays) is torch_hub
    bundle = jaxvit.load_for_inference(path, num_heads=3)
    assert (bundle.crop_pct, bundle.interpolation) == (224 / 256, "bicubic")
    assert bundle.mean == pytest.approx((0.485, 0.456, 0.406)) and bundle.std == pytest.approx(
        (0.229, 0.224, 0.225)
    )
    ckpt = read_checkpoint(path)
    assert (ckpt.posemb_resample, ckpt.posemb_antialias, ckpt.grid) == ("bicubic_offset", False, (4, 4))
    assert "mask_token" not in ckpt.unmatched and not ckpt.unmatched


def test_chunked_blocks_read_as_the_plain_ones(hub_files, tmp_path):
    _, _, hub, path = hub_files["plain"]
    # block_chunks=2 at depth 2: chunk c holds block c, under blocks.{c}.{c}
    chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k): v for k, v in hub.items()}
    torch.save(chunked, tmp_path / "chunked.pth")
    plain, read = read_checkpoint(path).params, read_checkpoint(tmp_path / "chunked.pth").params
    assert sorted(plain) == sorted(read)
    for key in plain:
        np.testing.assert_array_equal(plain[key], read[key], err_msg=key)
    swapped = {
        re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{1 - int(m[1])}.{m[1]}.", k): v for k, v in hub.items()
    }
    torch.save(swapped, tmp_path / "swapped.pth")
    with pytest.raises(
        ValueError, match=r"not DINOv2's consecutive runs of 1 blocks \(block 0 is in chunk 1\)"
    ):
        read_checkpoint(tmp_path / "swapped.pth")
    mixed = {**hub, "blocks.0.1.norm1.weight": hub["blocks.1.norm1.weight"]}
    torch.save(mixed, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"both chunked \(blocks.C.I.\*\) and not"):
        read_checkpoint(tmp_path / "mixed.pth")


def test_a_width_dinov2_never_published_needs_num_heads(hub_files):
    _, _, _, path = hub_files["plain"]
    with pytest.raises(ValueError, match=r"width 48 is none of DINOv2's.*pass num_heads=\.\.\.$") as info:
        jaxvit.load_for_inference(path)
    assert "\n" not in str(info.value)


def test_an_unknown_key_is_refused(hub_files, tmp_path):
    _, _, hub, _ = hub_files["plain"]
    torch.save({**hub, "blocks.0.attn.q_norm.weight": torch.ones(48)}, tmp_path / "extra.pth")
    with pytest.raises(
        ValueError, match=r"unexpected in the checkpoint: blocks.0.attn.q_norm.weight"
    ) as info:
        jaxvit.load_for_inference(tmp_path / "extra.pth", num_heads=3)
    assert "mask_token" not in str(info.value)
