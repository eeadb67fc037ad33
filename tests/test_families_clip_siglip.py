"""CLIP and SigLIP image towers: parity with transformers and timm, both directions, two resolutions.

Tiny peer models are built once per module with random weights, every
parameter then moved by 0.02 * N(0, 1) so that zero inits hide nothing;
nothing is downloaded. Each case compares the pooled features (the peer's
``pooler_output`` / ``image_embeds`` / timm's pooled features) and the final
tokens, at the checkpoint's resolution (16 px, a 4x4 grid) and at another one
(24 px, 6x6: the peer's own position-embedding interpolation against jaxvit's
``resample_posemb``), in fp32. ``MEASURED`` collects max abs and max relative
differences (relative to the largest reference value); they are printed at
the end of the module (``pytest -s``).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from helpers import perturb_torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file as save_torch_safetensors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import jaxvit
from jaxvit.data.preprocess import preprocess

NATIVE, OTHER = 16, 24
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
RTOL = 1e-4
MEASURED: list[tuple[str, str, int, float, float]] = []


def images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def assert_same_pixels(mine: np.ndarray, ref: np.ndarray, std) -> None:
    """Equal but for a few pixels one 8-bit level apart (the resize rounds its own way)."""
    step = np.abs(mine - ref) * np.asarray(std) * 255
    assert step.max() < 1.01 and np.mean(step > 1e-3) < 0.02, (step.max(), np.mean(step > 1e-3))


def compare(case: str, what: str, size: int, ours, ref) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (case, what, ours.shape, ref.shape)
    abs_diff = float(np.max(np.abs(ours - ref)))
    rel_diff = abs_diff / float(np.max(np.abs(ref)))
    MEASURED.append((case, what, size, abs_diff, rel_diff))
    assert rel_diff < RTOL, f"{case} {what} at {size} px: max abs {abs_diff:.2e}, relative {rel_diff:.2e}"


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\ncase | output | px | max abs | max rel")
    for case, what, size, abs_diff, rel_diff in MEASURED:
        print(f"{case} | {what} | {size} | {abs_diff:.1e} | {rel_diff:.1e}")


def run_ours(bundle, x: np.ndarray) -> dict[str, np.ndarray]:
    """Output, pooled features, final tokens and the last block's output of a bundle's model."""
    out, state = bundle.model.apply({"params": bundle.params}, jnp.asarray(x), mutable=["intermediates"])
    inter = state["intermediates"]
    last = f"block_{bundle.model.depth - 1}"
    return dict(
        out=np.asarray(out),
        features=np.asarray(inter["head"]["features"][0]),
        encoded=np.asarray(inter["encoded"][0]),
        last_block=np.asarray(inter["encoder"][last]["out"][0]),
    )


# ---------------------------------------------------------------------------
# transformers CLIP
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    config = CLIPVisionConfig(
        **SIZES, image_size=NATIVE, patch_size=4, projection_dim=24, hidden_act="quick_gelu"
    )
    torch.manual_seed(0)
    peer = perturb_torch(CLIPVisionModelWithProjection(config), seed=1)
    folder = tmp_path_factory.mktemp("hf_clip") / "peer"
    peer.save_pretrained(folder)
    ours = {size: jaxvit.load_for_inference(folder, image_size=size) for size in (NATIVE, OTHER)}
    outputs = {size: run_ours(ours[size], images(size)) for size in (NATIVE, OTHER)}
    return peer, folder, ours, outputs


def clip_reference(peer, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = peer(pixel_values=nchw(x), interpolate_pos_encoding=True)
        tower = peer.vision_model if hasattr(peer, "vision_model") else peer
        hidden = out.last_hidden_state
        return dict(
            embeds=out.image_embeds.numpy() if hasattr(out, "image_embeds") else None,
            hidden=hidden.numpy(),
            normed=tower.post_layernorm(hidden).numpy(),
            pooled=tower.post_layernorm(hidden[:, 0]).numpy(),
        )


def test_hf_clip_model_is_built_from_the_folder(hf_clip):
    _, _, ours, _ = hf_clip
    model = ours[NATIVE].model
    assert (model.num_classes, model.activation, model.layer_norm_eps) == (24, "quick_gelu", 1e-5)
    assert model.pre_norm and not model.patch_bias and not model.head_bias and model.class_token
    assert ours[NATIVE].origin == "hf_clip" and ours[NATIVE].image_size == (NATIVE, NATIVE)


@pytest.mark.parametrize("size", [NATIVE, OTHER])
def test_hf_clip_to_jaxvit(hf_clip, size):
    peer, _, _, outputs = hf_clip
    ref, ours = clip_reference(peer, images(size)), outputs[size]
    compare("HF CLIP -> jaxvit", "image_embeds", size, ours["out"], ref["embeds"])
    compare("HF CLIP -> jaxvit", "pooler_output", size, ours["features"], ref["pooled"])
    compare("HF CLIP -> jaxvit", "last_hidden_state", size, ours["last_block"], ref["hidden"])
    compare("HF CLIP -> jaxvit", "post_layernorm(all tokens)", size, ours["encoded"], ref["normed"])


def test_jaxvit_to_hf_clip(hf_clip, tmp_path):
    _, _, ours, outputs = hf_clip
    bundle = ours[NATIVE]
    jaxvit.export(bundle.params, tmp_path / "with_projection", "hf", model=bundle.model)
    back = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "with_projection").eval()
    # Without the projection: a num_classes=0 model is a CLIPVisionModel, its output pooler_output.
    tower = bundle.model.clone(num_classes=0)
    tower_params = {k: v for k, v in bundle.params.items() if k != "head"}
    jaxvit.export(tower_params, tmp_path / "tower", "hf", model=tower)
    assert json.loads((tmp_path / "tower" / "config.json").read_text())["architectures"] == [
        "CLIPVisionModel"
    ]
    back_tower = CLIPVisionModel.from_pretrained(tmp_path / "tower").eval()
    for size in (NATIVE, OTHER):
        ref = clip_reference(back, images(size))
        compare("jaxvit -> HF CLIP", "image_embeds", size, outputs[size]["out"], ref["embeds"])
        compare("jaxvit -> HF CLIP", "last_hidden_state", size, outputs[size]["last_block"], ref["hidden"])
        with torch.no_grad():
            pooled = back_tower(pixel_values=nchw(images(size)), interpolate_pos_encoding=True).pooler_output
        compare(
            "jaxvit -> HF CLIPVisionModel", "pooler_output", size, outputs[size]["features"], pooled.numpy()
        )


def test_clip_preprocessing_is_the_image_processors(hf_clip):
    _, _, ours, _ = hf_clip
    bundle = ours[NATIVE]
    assert bundle.center_crop and bundle.interpolation == "bicubic" and bundle.crop_pct == 1.0
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    processor = CLIPImageProcessor(
        size={"shortest_edge": NATIVE}, crop_size={"height": NATIVE, "width": NATIVE}
    )
    ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    mine = preprocess(
        image,
        bundle.image_size,
        bundle.mean,
        bundle.std,
        bundle.crop_pct,
        bundle.interpolation,
        center_crop=bundle.center_crop,
    )
    assert_same_pixels(mine, ref, bundle.std)


def test_predict_takes_a_clip_bundle(hf_clip, tmp_path):
    from jaxvit.predict import predict

    _, _, ours, _ = hf_clip
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    (result,) = predict(ours[NATIVE], [tmp_path / "grey.png"], k=3)
    assert len(result["top_k"]) == 3


# ---------------------------------------------------------------------------
# transformers SigLIP, and big_vision's two-tower .npz of the same weights
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
    config = SiglipVisionConfig(**SIZES, image_size=NATIVE, patch_size=4)
    torch.manual_seed(0)
    peer = perturb_torch(SiglipVisionModel(config), seed=2)
    folder = tmp_path_factory.mktemp("hf_siglip") / "peer"
    peer.save_pretrained(folder)
    ours = {size: jaxvit.load_for_inference(folder, image_size=size) for size in (NATIVE, OTHER)}
    outputs = {size: run_ours(ours[size], images(size)) for size in (NATIVE, OTHER)}
    return peer, folder, ours, outputs


def siglip_reference(peer, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = peer(pixel_values=nchw(x), interpolate_pos_encoding=True)
    return dict(pooled=out.pooler_output.numpy(), hidden=out.last_hidden_state.numpy())


def test_hf_siglip_model_is_built_from_the_folder(hf_siglip):
    _, _, ours, _ = hf_siglip
    model = ours[NATIVE].model
    assert (model.num_classes, model.pool, model.class_token, model.activation) == (
        0,
        "map",
        False,
        "gelu_tanh",
    )
    assert (ours[NATIVE].mean, ours[NATIVE].interpolation, ours[NATIVE].center_crop) == (
        (0.5,) * 3,
        "bicubic",
        False,
    )


@pytest.mark.parametrize("size", [NATIVE, OTHER])
def test_hf_siglip_to_jaxvit(hf_siglip, size):
    peer, _, _, outputs = hf_siglip
    ref, ours = siglip_reference(peer, images(size)), outputs[size]
    compare("HF SigLIP -> jaxvit", "pooler_output", size, ours["out"], ref["pooled"])
    compare("HF SigLIP -> jaxvit", "last_hidden_state", size, ours["encoded"], ref["hidden"])


def test_jaxvit_to_hf_siglip(hf_siglip, tmp_path):
    _, _, ours, outputs = hf_siglip
    jaxvit.export(ours[NATIVE].params, tmp_path / "ours", "hf", model=ours[NATIVE].model)
    back = SiglipVisionModel.from_pretrained(tmp_path / "ours").eval()
    for size in (NATIVE, OTHER):
        ref = siglip_reference(back, images(size))
        compare("jaxvit -> HF SigLIP", "pooler_output", size, outputs[size]["out"], ref["pooled"])
        compare("jaxvit -> HF SigLIP", "last_hidden_state", size, outputs[size]["encoded"], ref["hidden"])


def test_siglip_preprocessing_is_the_image_processors(hf_siglip):
    _, _, ours, _ = hf_siglip
    bundle = ours[NATIVE]
    image = Image.fromarray(np.random.default_rng(6).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    processor = SiglipImageProcessor(size={"height": NATIVE, "width": NATIVE})
    ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    mine = preprocess(
        image, bundle.image_size, bundle.mean, bundle.std, bundle.crop_pct, bundle.interpolation
    )
    assert_same_pixels(mine, ref, bundle.std)


def test_visualize_takes_a_siglip_folder(hf_siglip, tmp_path):
    from jaxvit.visualize import save_attention

    _, folder, _, _ = hf_siglip
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "grey.png")
    out = save_attention(folder, tmp_path / "grey.png", tmp_path / "attention.png", panel_size=32)
    assert out.stat().st_size > 0


def big_vision_two_tower(peer: SiglipVisionModel) -> dict[str, np.ndarray]:
    """The peer's weights in big_vision's SigLIP layout, image tower under params/img/, plus text keys."""
    sd = {k.removeprefix("vision_model."): v.numpy() for k, v in peer.state_dict().items()}
    d, heads = SIZES["hidden_size"], SIZES["num_attention_heads"]
    out = {
        "embedding/kernel": sd["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["embeddings.patch_embedding.bias"],
        "pos_embedding": sd["embeddings.position_embedding.weight"][None],
        "Transformer/encoder_norm/scale": sd["post_layernorm.weight"],
        "Transformer/encoder_norm/bias": sd["post_layernorm.bias"],
        "MAPHead_0/probe": sd["head.probe"],
    }

    def attention(dst: str, q, k, v, o, qb, kb, vb, ob) -> None:
        for name, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[f"{dst}/{name}/kernel"] = w.T.reshape(d, heads, -1)
            out[f"{dst}/{name}/bias"] = b.reshape(heads, -1)
        out[f"{dst}/out/kernel"] = o.T.reshape(heads, -1, d)
        out[f"{dst}/out/bias"] = ob

    def dense_and_norm(dst: str, src: str, kind: str) -> None:
        if kind == "ln":
            out[f"{dst}/scale"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]
        else:
            out[f"{dst}/kernel"], out[f"{dst}/bias"] = sd[f"{src}.weight"].T, sd[f"{src}.bias"]

    for i in range(SIZES["num_hidden_layers"]):
        src, dst = f"encoder.layers.{i}", f"Transformer/encoderblock_{i}"
        p = f"{src}.self_attn"
        attention(
            f"{dst}/MultiHeadDotProductAttention_0",
            *(sd[f"{p}.{n}_proj.weight"] for n in "qkv"),
            sd[f"{p}.out_proj.weight"],
            *(sd[f"{p}.{n}_proj.bias"] for n in "qkv"),
            sd[f"{p}.out_proj.bias"],
        )
        dense_and_norm(f"{dst}/LayerNorm_0", f"{src}.layer_norm1", "ln")
        dense_and_norm(f"{dst}/LayerNorm_1", f"{src}.layer_norm2", "ln")
        dense_and_norm(f"{dst}/MlpBlock_0/Dense_0", f"{src}.mlp.fc1", "dense")
        dense_and_norm(f"{dst}/MlpBlock_0/Dense_1", f"{src}.mlp.fc2", "dense")
    q, k, v = np.split(sd["head.attention.in_proj_weight"], 3)
    qb, kb, vb = np.split(sd["head.attention.in_proj_bias"], 3)
    attention(
        "MAPHead_0/MultiHeadDotProductAttention_0",
        q,
        k,
        v,
        sd["head.attention.out_proj.weight"],
        qb,
        kb,
        vb,
        sd["head.attention.out_proj.bias"],
    )
    dense_and_norm("MAPHead_0/LayerNorm_0", "head.layernorm", "ln")
    dense_and_norm("MAPHead_0/MlpBlock_0/Dense_0", "head.mlp.fc1", "dense")
    dense_and_norm("MAPHead_0/MlpBlock_0/Dense_1", "head.mlp.fc2", "dense")
    arrays = {f"params/img/{k}": v for k, v in out.items()}
    rng = np.random.default_rng(0)  # the text tower and the temperature, which must be left out
    arrays["params/txt/Embed_0/embedding"] = rng.normal(size=(50, d)).astype(np.float32)
    arrays["params/txt/Encoder_0/encoder_norm/scale"] = np.ones(d, np.float32)
    arrays["params/t"] = np.ones(1, np.float32)
    return arrays


def test_big_vision_two_tower_npz_loads_the_image_tower(hf_siglip, tmp_path):
    peer, _, ours, outputs = hf_siglip
    np.savez(tmp_path / "siglip.npz", **big_vision_two_tower(peer))
    # big_vision's MLP uses flax's nn.gelu, the tanh form, as SigLIP does
    model = ours[NATIVE].model
    params = jaxvit.load_pretrained(tmp_path / "siglip.npz", model, NATIVE)
    x = images(NATIVE)
    pooled, state = model.apply({"params": params}, jnp.asarray(x), mutable=["intermediates"])
    ref = siglip_reference(peer, x)
    compare("big_vision npz -> jaxvit", "pooled (MAP head)", NATIVE, pooled, ref["pooled"])
    compare(
        "big_vision npz -> jaxvit",
        "final tokens",
        NATIVE,
        state["intermediates"]["encoded"][0],
        ref["hidden"],
    )


# ---------------------------------------------------------------------------
# timm vit_*_clip_* and vit_*_siglip_*
# ---------------------------------------------------------------------------

TIMM_SIZES = dict(img_size=NATIVE, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
TIMM_CASES = {
    "clip": (
        "vit_base_patch16_clip_224",
        dict(num_classes=8, act_layer="quick_gelu"),
        dict(activation="quick_gelu", num_heads=4),
    ),
    "siglip": ("vit_base_patch16_siglip_224", dict(num_classes=0), dict(num_heads=4)),
}


@pytest.fixture(scope="module", params=sorted(TIMM_CASES))
def timm_tower(request, tmp_path_factory):
    name, kwargs, overrides = TIMM_CASES[request.param]
    peer = timm.create_model(name, pretrained=False, dynamic_img_size=True, **TIMM_SIZES, **kwargs)
    peer = perturb_torch(peer, seed=3)
    path = tmp_path_factory.mktemp("timm") / f"{request.param}.safetensors"
    save_torch_safetensors(peer.state_dict(), path)
    ours = {size: jaxvit.load_for_inference(path, image_size=size, **overrides) for size in (NATIVE, OTHER)}
    outputs = {size: run_ours(ours[size], images(size)) for size in (NATIVE, OTHER)}
    return request.param, peer, ours, outputs


def timm_reference(peer, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        tokens = peer.forward_features(nchw(x))
        return dict(
            out=peer.forward_head(tokens).numpy(),
            pooled=peer.forward_head(tokens, pre_logits=True).numpy(),
            tokens=tokens.numpy(),
        )


@pytest.mark.parametrize("size", [NATIVE, OTHER])
def test_timm_tower_to_jaxvit(timm_tower, size):
    family, peer, ours, outputs = timm_tower
    ref, mine = timm_reference(peer, images(size)), outputs[size]
    case = f"timm {family} -> jaxvit"
    compare(case, "output", size, mine["out"], ref["out"])
    compare(case, "pooled", size, mine["features"], ref["pooled"])
    compare(case, "final tokens", size, mine["encoded"], ref["tokens"])
    model = ours[size].model
    assert model.pre_norm == (family == "clip") and model.patch_bias == (family != "clip")
    assert model.layer_norm_eps == (1e-5 if family == "clip" else 1e-6)


def test_jaxvit_to_timm_tower(timm_tower, tmp_path):
    family, _, ours, outputs = timm_tower
    path = jaxvit.export(ours[NATIVE].params, tmp_path / "ours.safetensors", "timm", model=ours[NATIVE].model)
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    back = timm.create_model(
        meta["timm_model"], pretrained=False, dynamic_img_size=True, **json.loads(meta["timm_kwargs"])
    )
    from safetensors.torch import load_file

    back.load_state_dict(load_file(path), strict=True)
    back.eval()
    for size in (NATIVE, OTHER):
        ref = timm_reference(back, images(size))
        compare(f"jaxvit -> timm {family}", "output", size, outputs[size]["out"], ref["out"])
        compare(f"jaxvit -> timm {family}", "final tokens", size, outputs[size]["encoded"], ref["tokens"])


def test_timm_tower_preprocessing(timm_tower):
    family, _, ours, _ = timm_tower
    bundle = ours[NATIVE]
    assert (bundle.crop_pct, bundle.interpolation) == (0.9, "bicubic")
    assert bundle.mean[0] == (0.48145466 if family == "clip" else 0.5)


def test_two_tower_folders_load_their_image_tower(tmp_path):
    """CLIPModel and SiglipModel folders: the image tower loads, the text tower's keys are left out."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    text = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
    )
    vision = dict(**SIZES, image_size=NATIVE, patch_size=4)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12))
    siglip = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    for peer, name in ((clip, "clip"), (siglip, "siglip")):
        peer.save_pretrained(tmp_path / name)
        ckpt = jaxvit.checkpoints.pretrained.read_checkpoint(tmp_path / name)
        model, size = jaxvit.checkpoints.architecture.model_from_checkpoint(ckpt)
        params = jaxvit.checkpoints.fitting.fit_to_model(
            ckpt, model, size
        )  # every key checked, no text key left
        assert size == (NATIVE, NATIVE) and model.width == SIZES["hidden_size"]
        want = peer.vision_model.post_layernorm.weight.detach().numpy()
        np.testing.assert_array_equal(params["encoder"]["norm"]["scale"], want)
    assert model.pool == "map"
    clip_model = jaxvit.checkpoints.architecture.model_from_checkpoint(
        jaxvit.checkpoints.pretrained.read_checkpoint(tmp_path / "clip")
    )[0]
    assert clip_model.num_classes == 12 and not clip_model.head_bias
