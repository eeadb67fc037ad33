"""Parity with transformers and timm for DINOv2 (with registers), DINOv3, DeiT (distilled) and DeiT-3.

Each peer is built once per module with random weights, every weight then
perturbed (``+ 0.02 * randn``) so that zero-initialised tokens, biases and
scales hide nothing; nothing is downloaded. For each family and direction the
pooled features and the final tokens are compared in fp32, at the
checkpoint's resolution and at another one (the peer resizing its own
position embedding there). The measured differences are printed at the end
(``pytest -s``).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_torch_safetensors
from safetensors.torch import save_file as save_torch_safetensors
from timm.models._hub import save_for_hf
from transformers import (
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
)

import jaxvit

REL_TOL = 1e-4  # the ceiling; the measured values are far below (see the printed table)
NATIVE = 16  # pixels; patch 4 -> a 4x4 grid
OTHER = (24, 20)  # another, non-square resolution: 6x5 patches
MEASURED: list[tuple[str, str, str, str, float, float]] = []


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Adds 0.02 * randn to every weight (the floating entries of the state dict), in place; eval mode.

    Buffers outside the state dict (DINOv3's rotary frequencies) are computed, not weights.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.state_dict(keep_vars=True).values():
            if p.is_floating_point():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return module.eval()


def images(size, seed=0) -> np.ndarray:
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).normal(size=(2, h, w, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous()


def record(family: str, direction: str, what: str, size, ours, theirs) -> None:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (family, direction, what, ours.shape, theirs.shape)
    diff = float(np.max(np.abs(ours - theirs)))
    rel = diff / float(np.max(np.abs(theirs)))
    label = f"{size}" if isinstance(size, int) else f"{size[0]}x{size[1]}"
    MEASURED.append((family, direction, what, label, diff, rel))
    assert rel < REL_TOL, f"{family} {direction} {what} at {label}: max abs {diff:.3g}, rel {rel:.3g}"


@pytest.fixture(scope="module", autouse=True)
def print_table():
    yield
    print("\n| family | direction | output | resolution | max abs | max rel |")
    print("|---|---|---|---|---:|---:|")
    for family, direction, what, size, diff, rel in MEASURED:
        print(f"| {family} | {direction} | {what} | {size} | {diff:.2e} | {rel:.2e} |")


def jaxvit_outputs(model, params, x: np.ndarray) -> dict[str, np.ndarray]:
    out, state = model.apply({"params": params}, jnp.asarray(x), mutable=["intermediates"])
    result = {
        "tokens": np.asarray(state["intermediates"]["encoded"][0]),
        "pooled": np.asarray(state["intermediates"]["head"]["features"][0]),
    }
    if model.num_classes:
        result["logits"] = np.asarray(out)
    return result


# -- peers: each returns {"tokens", "pooled"[, "logits"]} at any size ----------------------


def hf_dinov2_outputs(peer, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = peer(pixel_values=nchw(x))
    return {"tokens": out.last_hidden_state.numpy(), "pooled": out.pooler_output.numpy()}


def hf_deit_outputs(peer, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        tokens = peer.deit(nchw(x), interpolate_pos_encoding=True).last_hidden_state
        logits = peer(nchw(x), interpolate_pos_encoding=True).logits
    pooled = (tokens[:, 0] + tokens[:, 1]) / 2  # what timm's distilled models pool; HF has no pooler here
    return {"tokens": tokens.numpy(), "pooled": pooled.numpy(), "logits": logits.numpy()}


def timm_outputs(peer, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        tokens = peer.forward_features(nchw(x))
        result = {"tokens": tokens.numpy(), "pooled": peer.forward_head(tokens, pre_logits=True).numpy()}
        if peer.num_classes:
            result["logits"] = peer.forward_head(tokens).numpy()
    return result


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=NATIVE, patch_size=4)
TIMM_TINY = dict(img_size=NATIVE, patch_size=4, embed_dim=32, depth=2, num_heads=2, dynamic_img_size=True)

# name -> (build the peer, its outputs, its timm name or transformers class for the way back)
FAMILIES = {
    "hf dinov2 (swiglu)": (
        lambda: Dinov2Model(Dinov2Config(**TINY, use_swiglu_ffn=True, layerscale_value=0.5)),
        hf_dinov2_outputs,
        Dinov2Model,
    ),
    "hf dinov2 registers": (
        lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, num_register_tokens=3)),
        hf_dinov2_outputs,
        Dinov2WithRegistersModel,
    ),
    "hf dinov3 (swiglu, registers)": (
        lambda: DINOv3ViTModel(
            DINOv3ViTConfig(
                **TINY, intermediate_size=48, use_gated_mlp=True, hidden_act="silu", num_register_tokens=2
            )
        ),
        hf_dinov2_outputs,
        DINOv3ViTModel,
    ),
    "hf dinov3": (
        lambda: DINOv3ViTModel(DINOv3ViTConfig(**TINY, intermediate_size=64, rope_theta=50.0)),
        hf_dinov2_outputs,
        DINOv3ViTModel,
    ),
    "hf deit distilled": (
        lambda: DeiTForImageClassificationWithTeacher(
            DeiTConfig(**TINY, intermediate_size=64, num_labels=5, layer_norm_eps=1e-6)
        ),
        hf_deit_outputs,
        DeiTForImageClassificationWithTeacher,
    ),
    "timm dinov2 (swiglu)": (
        lambda: timm.create_model(
            "vit_giant_patch14_dinov2", pretrained=False, num_classes=0, **{**TIMM_TINY, "num_heads": 4}
        ),
        timm_outputs,
        "vit_giant_patch14_dinov2",
    ),
    "timm dinov2 reg4": (
        lambda: timm.create_model(
            "vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, **TIMM_TINY
        ),
        timm_outputs,
        "vit_small_patch14_reg4_dinov2",
    ),
    "timm dinov3 (swiglu)": (
        lambda: timm.create_model(
            "vit_small_plus_patch16_dinov3", pretrained=False, num_classes=0, global_pool="token", **TIMM_TINY
        ),
        timm_outputs,
        "vit_small_plus_patch16_dinov3",
    ),
    "timm dinov3 qkv bias": (
        lambda: timm.create_model(
            "vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=3, global_pool="token", **TIMM_TINY
        ),
        timm_outputs,
        "vit_small_patch16_dinov3_qkvb",
    ),
    "timm deit distilled": (
        lambda: timm.create_model(
            "deit_tiny_distilled_patch16_224", pretrained=False, num_classes=5, **TIMM_TINY
        ),
        timm_outputs,
        "deit_tiny_distilled_patch16_224",
    ),
    "timm deit3": (
        lambda: timm.create_model("deit3_small_patch16_224", pretrained=False, num_classes=5, **TIMM_TINY),
        timm_outputs,
        "deit3_small_patch16_224",
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, peer, peer outputs, way back, path, loaded bundle) for one family, built once."""
    name = request.param
    build, outputs, back = FAMILIES[name]
    torch.manual_seed(0)
    peer = perturb(build(), seed=len(name))
    folder = tmp_path_factory.mktemp(name.replace(" ", "_").replace("(", "").replace(")", ""))
    if name.startswith("hf"):
        path = folder / "peer"
        peer.save_pretrained(path)
    else:
        # a timm hub folder, as timm writes it: config.json (architecture, model_args,
        # pretrained_cfg) says the head count and grid that the state dict cannot
        path = folder / "peer"
        save_for_hf(peer, str(path), safe_serialization=True)
    bundle = jaxvit.load_for_inference(path)
    return name, peer, outputs, back, path, bundle


def _compare(family_name, direction, size, ours, theirs):
    for what in theirs:
        record(family_name, direction, what, size, ours[what], theirs[what])


def test_peer_to_jaxvit_at_the_checkpoint_resolution(family):
    name, peer, outputs, _, path, bundle = family
    if name.startswith("timm dinov3"):  # a bare file has no table to tell the resolution: timm's default
        bare = jaxvit.load_for_inference(path / "model.safetensors", num_heads=bundle.model.num_heads)
        assert bare.image_size == (256, 256)
    assert bundle.image_size == (NATIVE, NATIVE)
    x = images(NATIVE)
    _compare(name, "peer -> jaxvit", NATIVE, jaxvit_outputs(bundle.model, bundle.params, x), outputs(peer, x))


def test_peer_to_jaxvit_at_another_resolution(family):
    name, peer, outputs, _, path, bundle = family
    params = jaxvit.load_pretrained(path, bundle.model, OTHER)
    x = images(OTHER, seed=1)
    _compare(name, "peer -> jaxvit", OTHER, jaxvit_outputs(bundle.model, params, x), outputs(peer, x))


def test_jaxvit_to_peer(family, tmp_path):
    name, peer, outputs, back, _, bundle = family
    if name.startswith("hf"):
        jaxvit.export(bundle.params, tmp_path / "out", "hf", model=bundle.model)
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert config["architectures"] == [back.__name__]
        fresh = back.from_pretrained(tmp_path / "out").eval()
    else:
        # a timm hub folder, built by timm's own loader from its config.json
        jaxvit.export(bundle.params, tmp_path / "out", "timm", model=bundle.model)
        fresh = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True, dynamic_img_size=True)
        fresh = fresh.eval()
    for size in (NATIVE, OTHER):
        x = images(size, seed=2)
        _compare(name, "jaxvit -> peer", size, outputs(fresh, x), outputs(peer, x))


# Models that start in jaxvit (random weights, a position-embedding slot for the class token that
# is not zero, a SwiGLU width of jaxvit's choosing), written for a peer: (fields, format, peer)
JAXVIT_ORIGIN = {
    "dinov2 registers swiglu -> hf": (
        dict(num_classes=0, num_registers=2, layer_scale_init=0.1, mlp_type="swiglu", mlp_dim=88),
        "hf",
        Dinov2WithRegistersModel,
    ),
    "dinov2 layerscale -> hf": (dict(num_classes=0, layer_scale_init=0.1), "hf", Dinov2Model),
    # random weights give the key a bias, which DINOv3 lacks by default: written with key_bias=True
    "dinov3 key bias registers -> hf": (
        dict(num_classes=0, posemb="rope", num_registers=2, layer_scale_init=0.1),
        "hf",
        DINOv3ViTModel,
    ),
    "deit distilled -> hf": (
        dict(num_classes=5, distill_token=True),
        "hf",
        DeiTForImageClassificationWithTeacher,
    ),
    "dinov2 registers swiglu -> timm": (
        dict(num_classes=0, num_registers=2, layer_scale_init=0.1, mlp_type="swiglu", mlp_dim=88),
        "timm",
        "vit_giant_patch14_dinov2",
    ),
    "dinov3 swiglu registers -> timm": (
        dict(
            num_classes=0,
            posemb="rope",
            num_registers=2,
            layer_scale_init=0.1,
            mlp_type="swiglu",
            mlp_dim=40,
            layer_norm_eps=1e-5,
        ),
        "timm",
        "vit_small_patch16_dinov3",
    ),
    "deit distilled -> timm": (
        dict(num_classes=5, distill_token=True),
        "timm",
        "deit_base_distilled_patch16_224",
    ),
}


@pytest.mark.parametrize("case", sorted(JAXVIT_ORIGIN))
def test_a_jaxvit_model_written_for_a_peer_computes_the_same(case, tmp_path):
    fields, fmt, peer_kind = JAXVIT_ORIGIN[case]
    model = jaxvit.create_model(
        None, width=32, depth=2, num_heads=2, patch_size=4, **{"mlp_dim": 128, **fields}
    )
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, NATIVE, NATIVE, 3)))
    rng = np.random.default_rng(len(case))
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray(0.1 * rng.normal(size=a.shape), jnp.float32), shapes["params"]
    )
    if fmt == "timm" and model.posemb == "rope":
        # timm's DINOv3 fixes the key bias at zero (its export refuses any other); so does jaxvit's init
        for i in range(model.depth):
            bias = params["encoder"][f"block_{i}"]["attn"]["qkv"]["bias"]
            params["encoder"][f"block_{i}"]["attn"]["qkv"]["bias"] = bias.at[32:64].set(0.0)
    if fmt == "hf":
        path = jaxvit.export(params, tmp_path / "out", "hf", model=model)
        peer = peer_kind.from_pretrained(path).eval()
        outputs = hf_deit_outputs if model.distill_token else hf_dinov2_outputs
    else:
        path = jaxvit.export(params, tmp_path / "out.safetensors", "timm", model=model, image_size=NATIVE)
        with safe_open(str(path), "np") as f:
            kwargs = json.loads(f.metadata()["timm_kwargs"])
            assert f.metadata()["timm_model"] == peer_kind
        peer = timm.create_model(peer_kind, pretrained=False, dynamic_img_size=True, **kwargs).eval()
        peer.load_state_dict(load_torch_safetensors(path), strict=True)
        outputs = timm_outputs
    for size in (NATIVE, OTHER):
        # at another size jaxvit resizes as the peer does, told by the written file
        sized = params if size == NATIVE else jaxvit.load_pretrained(path, model, size)
        x = images(size, seed=3)
        _compare(
            case.split(" -> ")[0], f"jaxvit -> {fmt}", size, jaxvit_outputs(model, sized, x), outputs(peer, x)
        )


def test_an_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "swin").mkdir()
    (tmp_path / "swin" / "config.json").write_text(json.dumps({"model_type": "swin"}))
    save_torch_safetensors({"x": torch.zeros(1)}, tmp_path / "swin" / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"model_type='swin'.*supported model types: \['beit', 'clip', 'clip_vision_model', 'deit', 'dinov2',",
    ):
        jaxvit.load_for_inference(tmp_path / "swin")


def test_dinov2_classifier_and_deit_without_teacher_are_refused_by_name(tmp_path):
    from transformers import DeiTForImageClassification, DeiTModel, Dinov2ForImageClassification

    Dinov2ForImageClassification(Dinov2Config(**TINY, num_labels=3)).save_pretrained(tmp_path / "dino")
    with pytest.raises(ValueError, match="Dinov2ForImageClassification's head reads the class token"):
        jaxvit.load_for_inference(tmp_path / "dino")
    DeiTForImageClassification(DeiTConfig(**TINY, intermediate_size=64)).save_pretrained(tmp_path / "deit")
    with pytest.raises(ValueError, match="DeiTForImageClassification .* is not supported"):
        jaxvit.load_for_inference(tmp_path / "deit")
    # DeiTModel's pooler reads the class token alone; jaxvit's features pool both tokens
    DeiTModel(DeiTConfig(**TINY, intermediate_size=64)).save_pretrained(tmp_path / "pooled")
    with pytest.raises(ValueError, match="DeiTModel's pooler .* is not supported"):
        jaxvit.load_for_inference(tmp_path / "pooled")
    DeiTModel(DeiTConfig(**TINY, intermediate_size=64), add_pooling_layer=False).save_pretrained(
        tmp_path / "bare"
    )
    assert jaxvit.load_for_inference(tmp_path / "bare").model.distill_token
