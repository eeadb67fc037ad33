"""Tests of pretrained checkpoints: parity with timm and transformers, big_vision layouts, resolution, errors.

Peer models are built locally with random weights (nothing is downloaded); every
parameter is randomised so zero-initialised tokens and heads cannot hide a bug.
"""

import logging
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file as load_torch_safetensors
from safetensors.torch import save_file as save_torch_safetensors
from scipy.special import erf
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import _load_weights as timm_load_npz
from transformers import ViTConfig, ViTForImageClassification

import jaxvit
from jaxvit.checkpoints import pretrained

ATOL = 1e-4  # fp32 logits of two frameworks
LOGGER = "jaxvit.checkpoints.pretrained"


def randomize_torch(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = p.ndim == 1 and name.endswith("weight") and "norm" in name
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.05 * noise)
    return module.eval()


def torch_logits(module: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = module(torch.from_numpy(images.transpose(0, 3, 1, 2)).contiguous())
    return (out.logits if hasattr(out, "logits") else out).numpy()


def jax_logits(model, params, images: np.ndarray) -> np.ndarray:
    return np.asarray(model.apply({"params": params}, jnp.asarray(images)))


def random_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, h, w, 3)).astype(np.float32)


def random_params(model, image_size, seed=0):
    """Random params of ``model`` without running its init (shapes from ``eval_shape``)."""
    images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype), shapes)


def assert_close(a, b, atol=ATOL):
    diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    assert diff < atol, f"max abs diff {diff}"
    return diff


# -- timm --------------------------------------------------------------------


def test_timm_vit_tiny_224_matches(tmp_path):
    peer = randomize_torch(timm.create_model("vit_tiny_patch16_224", pretrained=False), seed=0)
    save_torch_safetensors(peer.state_dict(), tmp_path / "tiny.safetensors")
    model = jaxvit.create_model("Ti/16", num_classes=1000)
    params = jaxvit.load_pretrained(tmp_path / "tiny.safetensors", model, 224)
    images = random_images(2, 224, 224)
    expected = torch_logits(peer, images)
    assert np.abs(expected).max() > 0.1  # the head is not trivially zero
    assert_close(jax_logits(model, params, images), expected)


TIMM_SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=7)
TIMM_CASES = {
    "tok": (dict(), dict(class_token=True, pool="tok")),
    "gap": (dict(class_token=False, global_pool="avg", fc_norm=False), dict(class_token=False, pool="gap")),
    "map": (dict(class_token=False, global_pool="map"), dict(class_token=False, pool="map")),
    "gelu_tanh": (dict(act_layer="gelu_tanh"), dict(activation="gelu_tanh")),
}


def small_model(**overrides):
    fields = dict(num_classes=7, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=256)
    return jaxvit.create_model(None, **{**fields, **overrides})


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_small_round_trips(tmp_path, case):
    timm_kwargs, ours = TIMM_CASES[case]
    peer = randomize_torch(TimmViT(**TIMM_SMALL, **timm_kwargs), seed=1)
    images = random_images(3, 32, 32, seed=1)
    expected = torch_logits(peer, images)
    save_torch_safetensors(peer.state_dict(), tmp_path / "peer.safetensors")
    model = small_model(**ours)
    params = jaxvit.load_pretrained(tmp_path / "peer.safetensors", model, 32)
    assert_close(jax_logits(model, params, images), expected)

    # jaxvit -> VT .npz -> timm's own loader for Google checkpoints.
    jaxvit.export(params, tmp_path / "ours.npz", "npz", model=model)
    fresh = TimmViT(**TIMM_SMALL, **timm_kwargs).eval()
    timm_load_npz(fresh, str(tmp_path / "ours.npz"))
    assert_close(torch_logits(fresh, images), expected)

    # jaxvit -> timm safetensors -> strict load_state_dict, into a model built from the written kwargs.
    jaxvit.export(params, tmp_path / "ours.safetensors", "timm", model=model)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours.safetensors"), "np") as f:
        import json

        kwargs = json.loads(f.metadata()["timm_kwargs"])
    rebuilt = TimmViT(**kwargs).eval()
    rebuilt.load_state_dict(load_torch_safetensors(tmp_path / "ours.safetensors"), strict=True)
    assert_close(torch_logits(rebuilt, images), expected)


def test_timm_pth_file_loads_with_weights_only(tmp_path):
    peer = randomize_torch(TimmViT(**TIMM_SMALL), seed=2)
    torch.save({"state_dict": peer.state_dict()}, tmp_path / "peer.pth")
    model = small_model()
    params = jaxvit.load_pretrained(tmp_path / "peer.pth", model, 32)
    images = random_images(2, 32, 32)
    assert_close(jax_logits(model, params, images), torch_logits(peer, images))


def test_timm_fc_norm_needs_a_model_with_fc_norm(tmp_path):
    peer = randomize_torch(TimmViT(**TIMM_SMALL, class_token=False, global_pool="avg"), seed=3)
    save_torch_safetensors(peer.state_dict(), tmp_path / "peer.safetensors")
    with pytest.raises(
        ValueError, match=r"unexpected in the checkpoint: head/fc_norm/bias \(64,\) .*needs fc_norm=True"
    ):
        jaxvit.load_pretrained(tmp_path / "peer.safetensors", small_model(class_token=False, pool="gap"), 32)
    model = small_model(class_token=False, pool="gap", fc_norm=True)
    params = jaxvit.load_pretrained(tmp_path / "peer.safetensors", model, 32)
    images = random_images(2, 32, 32)
    assert_close(jax_logits(model, params, images), torch_logits(peer, images))


# -- Hugging Face --------------------------------------------------------------


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_hf_vit_round_trips(tmp_path, act):
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=5,
        hidden_act=act,
    )
    torch.manual_seed(0)
    peer = randomize_torch(ViTForImageClassification(config), seed=3)
    peer.save_pretrained(tmp_path / "hf")
    images = random_images(2, 16, 16, seed=2)
    expected = torch_logits(peer, images)

    model = pretrained.model_from_hf_config(tmp_path / "hf")
    assert (model.width, model.depth, model.num_heads, model.mlp_dim, model.num_classes) == (32, 2, 4, 64, 5)
    assert model.layer_norm_eps == 1e-12
    assert model.activation == ("gelu" if act == "gelu" else "gelu_tanh")
    params = jaxvit.load_pretrained(tmp_path / "hf", model, 16)
    assert_close(jax_logits(model, params, images), expected)

    labels = [f"thing {i}" for i in range(5)]
    jaxvit.export(params, tmp_path / "ours", "hf", model=model, labels=labels)
    back = ViTForImageClassification.from_pretrained(tmp_path / "ours").eval()
    assert back.config.id2label[3] == "thing 3"
    assert_close(torch_logits(back, images), expected)
    again = jaxvit.load_pretrained(tmp_path / "ours", model, 16)  # the classic google/vit-* key names
    chex_equal(again, params)


def chex_equal(a, b):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# -- big_vision layouts, against an independent NumPy forward pass -----------------


def bv_checkpoint(seed, *, width=16, depth=2, heads=2, mlp=32, patch=4, grid=(2, 3), classes=3, cls=False,
                  map_head=False, scanned=False):  # fmt: skip
    rng = np.random.default_rng(seed)

    def f(*shape, center=0.0):
        return (center + 0.3 * rng.normal(size=shape)).astype(np.float32)

    hd = width // heads
    w = {
        "embedding/kernel": f(patch, patch, 3, width),
        "embedding/bias": f(width),
        "pos_embedding": f(1, grid[0] * grid[1], width),
        "Transformer/encoder_norm/scale": f(width, center=1.0),
        "Transformer/encoder_norm/bias": f(width),
        "head/kernel": f(width, classes),
        "head/bias": f(classes),
    }
    if cls:
        w["cls"] = f(1, 1, width)

    def attention(prefix):
        out = {}
        for n in ("query", "key", "value"):
            out[f"{prefix}/{n}/kernel"], out[f"{prefix}/{n}/bias"] = f(width, heads, hd), f(heads, hd)
        out[f"{prefix}/out/kernel"], out[f"{prefix}/out/bias"] = f(heads, hd, width), f(width)
        return out

    def mlp_block(prefix):
        return {
            f"{prefix}/Dense_0/kernel": f(width, mlp),
            f"{prefix}/Dense_0/bias": f(mlp),
            f"{prefix}/Dense_1/kernel": f(mlp, width),
            f"{prefix}/Dense_1/bias": f(width),
        }

    blocks = []
    for _ in range(depth):
        b = {"LayerNorm_0/scale": f(width, center=1.0), "LayerNorm_0/bias": f(width)}
        b.update(attention("MultiHeadDotProductAttention_0"))
        b.update({"LayerNorm_1/scale": f(width, center=1.0), "LayerNorm_1/bias": f(width)})
        b.update(mlp_block("MlpBlock_0"))
        blocks.append(b)
    if scanned:
        w.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
    else:
        w.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()})
    if map_head:
        w["MAPHead_0/probe"] = f(1, 1, width)
        w.update(attention("MAPHead_0/MultiHeadDotProductAttention_0"))
        w.update(
            {"MAPHead_0/LayerNorm_0/scale": f(width, center=1.0), "MAPHead_0/LayerNorm_0/bias": f(width)}
        )
        w.update(mlp_block("MAPHead_0/MlpBlock_0"))
    return w


def np_layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_attention(xq, xkv, w, prefix):
    q, k, v = (
        np.einsum("ntd,dhk->nthk", x, w[f"{prefix}/{n}/kernel"]) + w[f"{prefix}/{n}/bias"]
        for n, x in (("query", xq), ("key", xkv), ("value", xkv))
    )
    logits = np.einsum("nqhk,nshk->nhqs", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("nhqs,nshk->nqhk", weights, v)
    return np.einsum("nqhk,hkd->nqd", out, w[f"{prefix}/out/kernel"]) + w[f"{prefix}/out/bias"]


def np_mlp(x, w, prefix):
    y = x @ w[f"{prefix}/Dense_0/kernel"] + w[f"{prefix}/Dense_0/bias"]
    y = 0.5 * y * (1.0 + erf(y / np.sqrt(2.0)))
    return y @ w[f"{prefix}/Dense_1/kernel"] + w[f"{prefix}/Dense_1/bias"]


def bv_forward(w, images, pool):
    """big_vision's ViT on the raw checkpoint arrays: posemb on the patches, then the class token."""
    kernel = w["embedding/kernel"]
    p, d = kernel.shape[0], kernel.shape[-1]
    n, height, width, c = images.shape
    x = np.einsum("nipjqc,pqcd->nijd", images.reshape(n, height // p, p, width // p, p, c), kernel)
    x = x.reshape(n, -1, d) + w["embedding/bias"] + w["pos_embedding"]
    if "cls" in w:
        x = np.concatenate([np.broadcast_to(w["cls"], (n, 1, d)), x], axis=1)
    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    depth = w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0] if scanned else sum(
        k.endswith("LayerNorm_0/scale") and k.startswith("Transformer/encoderblock_") for k in w
    )  # fmt: skip
    for i in range(depth):
        if scanned:
            b = {k.split("/", 2)[2]: v[i] for k, v in w.items() if k.startswith("Transformer/encoderblock/")}
        else:
            b = {
                k.split("/", 2)[2]: v for k, v in w.items() if k.startswith(f"Transformer/encoderblock_{i}/")
            }
        y = np_layer_norm(x, b["LayerNorm_0/scale"], b["LayerNorm_0/bias"])
        x = x + np_attention(y, y, b, "MultiHeadDotProductAttention_0")
        y = np_layer_norm(x, b["LayerNorm_1/scale"], b["LayerNorm_1/bias"])
        x = x + np_mlp(y, b, "MlpBlock_0")
    x = np_layer_norm(x, w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"])
    if pool == "gap":
        x = x.mean(axis=1)
    elif pool == "tok":
        x = x[:, 0]
    else:
        probe = np.broadcast_to(w["MAPHead_0/probe"], (n, 1, d))
        y = np_attention(probe, x, w, "MAPHead_0/MultiHeadDotProductAttention_0")
        ln = np_layer_norm(y, w["MAPHead_0/LayerNorm_0/scale"], w["MAPHead_0/LayerNorm_0/bias"])
        x = (y + np_mlp(ln, w, "MAPHead_0/MlpBlock_0"))[:, 0]
    return x @ w["head/kernel"] + w["head/bias"]


def save_npz(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


BV_CASES = {
    "gap": dict(cls=False, map_head=False, scanned=False),
    "map_scanned": dict(cls=False, map_head=True, scanned=True),
    "tok_cls": dict(cls=True, map_head=False, scanned=False),
}


@pytest.mark.parametrize("case", sorted(BV_CASES))
def test_big_vision_npz_matches_numpy_forward(tmp_path, case):
    spec = BV_CASES[case]
    w = bv_checkpoint(4, **spec)
    path = save_npz(tmp_path / "bv.npz", {f"params/{k}": v for k, v in w.items()})
    pool = "map" if spec["map_head"] else ("tok" if spec["cls"] else "gap")
    model = jaxvit.create_model(
        None, num_classes=3, width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4,
        class_token=spec["cls"], pool=pool,
    )  # fmt: skip
    params = jaxvit.load_pretrained(path, model, (8, 12))  # a non-square 2x3 grid
    images = random_images(2, 8, 12, seed=5)
    assert_close(jax_logits(model, params, images), bv_forward(w, images, pool), atol=1e-4)

    # Values land where they belong.
    get = (lambda k: w[f"Transformer/encoderblock/{k}"][1]) if spec["scanned"] else (
        lambda k: w[f"Transformer/encoderblock_1/{k}"])  # fmt: skip
    qkv = np.asarray(params["encoder"]["block_1"]["attn"]["qkv"]["kernel"])
    np.testing.assert_array_equal(
        qkv[:, 16:32], get("MultiHeadDotProductAttention_0/key/kernel").reshape(16, 16)
    )
    np.testing.assert_array_equal(
        np.asarray(params["encoder"]["block_1"]["mlp"]["fc2"]["bias"]), get("MlpBlock_0/Dense_1/bias")
    )
    posemb = np.asarray(params["pos_embed"]["embedding"])
    if spec["cls"]:
        np.testing.assert_array_equal(posemb[:, 0], 0.0)  # big_vision's class token gets no posemb
        np.testing.assert_array_equal(np.asarray(params["cls_token"]["token"]), w["cls"])
    np.testing.assert_array_equal(posemb[:, int(spec["cls"]) :], w["pos_embedding"])
    if spec["map_head"]:
        np.testing.assert_array_equal(
            np.asarray(params["head"]["map"]["attn"]["value"]["kernel"]),
            w["MAPHead_0/MultiHeadDotProductAttention_0/value/kernel"],
        )
        scanned_model = model.clone(scan=True)
        scanned_params = jaxvit.load_pretrained(path, scanned_model, (8, 12))
        chex_equal(scanned_params, jaxvit.unrolled_to_scan(params))


# -- resolution, heads, round trips ----------------------------------------------


@pytest.fixture(scope="module")
def tiny224(tmp_path_factory):
    """A 224-pixel checkpoint of a one-block, width-32 model with patch 16, exported as .npz."""
    model = jaxvit.create_model(
        None, num_classes=10, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=16
    )
    params = random_params(model, (224, 224))
    path = tmp_path_factory.mktemp("tiny") / "tiny224.npz"
    jaxvit.export(params, path, "npz", model=model)
    return model, params, path


@pytest.mark.parametrize("size, grid", [(384, (24, 24)), ((32, 48), (2, 3))])
def test_resolution_change_resamples_posemb(tiny224, caplog, size, grid):
    model, params, path = tiny224
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = jaxvit.load_pretrained(path, model, size)
    assert "resampling the position embedding" in caplog.text and f"{grid[0]}x{grid[1]}" in caplog.text
    expected = jaxvit.resample_posemb(params["pos_embed"]["embedding"], grid, (14, 14))
    np.testing.assert_allclose(loaded["pos_embed"]["embedding"], expected, atol=1e-6)
    np.testing.assert_array_equal(
        loaded["pos_embed"]["embedding"][:, 0], params["pos_embed"]["embedding"][:, 0]
    )
    h, w = (size, size) if isinstance(size, int) else size
    logits = model.apply({"params": loaded}, jnp.ones((1, h, w, 3)))
    assert logits.shape == (1, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_npz_round_trip_is_exact_and_scan_agnostic(tiny224, tmp_path):
    model, params, path = tiny224
    chex_equal(jaxvit.load_pretrained(path, model, 224), params)
    scanned = model.clone(scan=True)
    jaxvit.export(jaxvit.unrolled_to_scan(params), tmp_path / "s.npz", "npz", model=scanned)
    chex_equal(jaxvit.load_pretrained(tmp_path / "s.npz", scanned, 224), jaxvit.unrolled_to_scan(params))


def test_other_class_count_gets_a_fresh_head(tiny224, caplog):
    model, params, path = tiny224
    four = model.clone(num_classes=4)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = jaxvit.load_pretrained(path, four, 224)
    assert "new zero-initialised head (32, 4)" in caplog.text
    np.testing.assert_array_equal(loaded["head"]["classifier"]["kernel"], np.zeros((32, 4)))
    np.testing.assert_array_equal(loaded["head"]["classifier"]["bias"], np.zeros(4))
    np.testing.assert_array_equal(loaded["encoder"]["norm"]["scale"], params["encoder"]["norm"]["scale"])
    features = jaxvit.load_pretrained(path, model.clone(num_classes=0), 224)
    assert "head" not in features  # tok pooling without a classifier has no head parameters


def test_pre_logits_kept_or_dropped(tmp_path, caplog):
    model = jaxvit.create_model(None, num_classes=3, width=16, depth=1, num_heads=2, patch_size=4,
                                representation_size=8)  # fmt: skip
    params = random_params(model, (8, 8), seed=1)
    jaxvit.export(params, tmp_path / "r.npz", "npz", model=model)
    chex_equal(jaxvit.load_pretrained(tmp_path / "r.npz", model, 8), params)
    plain = model.clone(representation_size=None)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = jaxvit.load_pretrained(tmp_path / "r.npz", plain, 8)
    assert "dropping the pre_logits layer (16, 8)" in caplog.text
    assert "pre_logits" not in loaded["head"]
    np.testing.assert_array_equal(loaded["head"]["classifier"]["kernel"], np.zeros((16, 3)))


# -- malformed files ------------------------------------------------------------------


class NotATensor:
    pass


@pytest.fixture
def good_npz(tiny224):
    _, _, path = tiny224
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_truncated_npz(tiny224, tmp_path):
    data = tiny224[2].read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        (tmp_path / "t.npz").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"t\.npz.*truncated or corrupt"):
            jaxvit.load_pretrained(tmp_path / "t.npz", tiny224[0], 224)


def test_truncated_safetensors(tmp_path):
    save_torch_safetensors(TimmViT(**TIMM_SMALL).state_dict(), tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"x\.safetensors.*truncated or corrupt"):
        jaxvit.load_pretrained(tmp_path / "x.safetensors", small_model(), 32)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda w: w.update({"Transformer/encoder_norm/scale": np.ones(33, np.float32)}),
            r"encoder/norm/scale: checkpoint \(33,\) vs model \(32,\)",
        ),
        (
            lambda w: w.pop("Transformer/encoderblock_0/LayerNorm_2/bias"),
            r"missing from the checkpoint: encoder/block_0/norm2/bias \(32,\)",
        ),
        (
            lambda w: w.update({"extra/thing": np.ones(3)}),
            r"unexpected in the checkpoint: extra/thing \(3,\)",
        ),
        (
            lambda w: w.update({"Transformer/encoderblock_1/LayerNorm_0/scale": np.ones(32)}),
            r"depth 2 \(encoder blocks 0\.\.1\) but the model has depth=1",
        ),
    ],
    ids=["wrong_shape", "missing", "unexpected", "depth"],
)
def test_mismatches_name_key_and_shapes(tiny224, good_npz, tmp_path, edit, message):
    edit(good_npz)
    path = save_npz(tmp_path / "bad.npz", good_npz)
    with pytest.raises(ValueError, match=message):
        jaxvit.load_pretrained(path, tiny224[0], 224)


def test_width_and_heads_mismatch(tiny224):
    model, _, path = tiny224
    with pytest.raises(ValueError, match=r"width 32 .* but the model has width=64"):
        jaxvit.load_pretrained(path, model.clone(width=64), 224)
    with pytest.raises(ValueError, match=r"2 attention heads but the model has num_heads=4"):
        jaxvit.load_pretrained(path, model.clone(num_heads=4), 224)


def test_object_arrays_are_refused(good_npz, tiny224, tmp_path):
    good_npz["meta"] = np.array([{"a": 1}], dtype=object)
    with open(tmp_path / "obj.npz", "wb") as f:
        np.savez(f, **good_npz)
    with pytest.raises(ValueError, match=r"object array under key 'meta'.*refuses to unpickle"):
        jaxvit.load_pretrained(tmp_path / "obj.npz", tiny224[0], 224)


def test_pickles_are_refused(tiny224, tmp_path):
    with open(tmp_path / "p.npz", "wb") as f:
        pickle.dump({"embedding/kernel": np.zeros(3)}, f)
    with pytest.raises(ValueError, match=r"p\.npz is a pickle.*never unpickles"):
        jaxvit.load_pretrained(tmp_path / "p.npz", tiny224[0], 224)
    with open(tmp_path / "p.pth", "wb") as f:
        pickle.dump({"patch_embed.proj.weight": NotATensor()}, f, protocol=2)
    with pytest.raises(
        ValueError, match=r"p\.pth with torch\.load\(weights_only=True\).*refuses to unpickle"
    ):
        jaxvit.load_pretrained(tmp_path / "p.pth", tiny224[0], 224)


def test_not_a_checkpoint(tiny224, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxvit.load_pretrained(tmp_path / "nope.npz", tiny224[0], 224)
    (tmp_path / "x.txt").write_text("hello world, not weights")
    with pytest.raises(ValueError, match=r"x\.txt is not a checkpoint jaxvit can read"):
        jaxvit.load_pretrained(tmp_path / "x.txt", tiny224[0], 224)
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        jaxvit.load_pretrained(tmp_path / "folder", tiny224[0], 224)


def test_every_registered_format_has_what_the_registry_promises():
    from jaxvit.checkpoints import registry

    for fmt in registry.FORMATS:
        assert isinstance(fmt.NAME, str) and callable(fmt.claims) and callable(fmt.read), fmt
        assert fmt.PREPROCESSING.crop_pct <= 1.0
    for writers in registry.EXPORTERS.values():
        for fmt in writers:
            assert callable(fmt.write) and isinstance(fmt.HAS_SINCOS, bool)
        assert all(callable(fmt.exports) for fmt in writers[:-1])
    assert sorted(registry.EXPORTS) == ["hf", "npz", "timm"]
    assert sorted(jaxvit.checkpoints.inference.ORIGINS) == sorted(
        [
            "big_vision",
            "big_vision_naflex",
            "vt",
            "hf_clip",
            "hf_siglip",
            "hf_siglip2",
            "hf_deit",
            "hf_dinov2",
            "hf_dinov3",
            "hf_mae",
            "hf_beit",
            "timm_beit",
            "timm_eva",
            "hf",
            "timm_dinov3",
            "timm",
            "dinov2",
            "open_clip",
            "workdir",
        ]
    )
    with pytest.raises(
        ValueError, match="model_type='bert'.*supported model types.*'clip'.*'dinov2'.*'siglip'.*'vit'"
    ):
        registry.hf_format({"model_type": "bert"})
    assert registry.format_for("state_dict", {"blocks.0.norm1.weight": np.zeros(2)}).NAME == "timm"
    with pytest.raises(ValueError, match="unknown origin 'nope'"):
        registry.by_origin("nope")


def test_names_of_the_old_pretrained_module_still_resolve():
    with pytest.warns(DeprecationWarning, match="jaxvit.checkpoints.exporting.export"):
        assert pretrained.export is jaxvit.export
    with pytest.warns(DeprecationWarning, match="jaxvit.checkpoints.inference"):
        assert pretrained.load_for_inference is jaxvit.load_for_inference
        assert pretrained.PREPROCESSING["timm"].interpolation == "bicubic"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pretrained.nope  # noqa: B018
