"""Tests of the model: shapes at every step, parameter counts, equivalences, dtypes, errors."""

import collections
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvit
from jaxvit import model as vit
from jaxvit import ops

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4)


# The reference formulas, written out: jax's own GELUs and CLIP's QuickGELU.
REFERENCE_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def tiny(**overrides) -> jaxvit.VisionTransformer:
    return jaxvit.create_model(None, **{"num_classes": 10, **TINY, **overrides})


def perturb(params, scale=0.05, seed=7):
    """Random offsets, so the zero-init head and biases do not hide differences."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten(
        [a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys, strict=True)]
    )


def images(n=2, h=16, w=16, c=3, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, h, w, c), jnp.float32)


# -- variants and parameter counts ------------------------------------------


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("Ti/16", 5_717_416),
        ("S/16", 22_050_664),
        ("B/16", 86_567_656),
        ("B/32", 88_224_232),
        ("L/16", 304_326_632),
        ("H/14", 632_045_800),
    ],
)
def test_published_parameter_counts(variant, expected):
    assert jaxvit.count_params(jaxvit.create_model(variant, num_classes=1000), 224) == expected


def test_siglip_so400m_parameter_count():
    # SigLIP's So400m/14 image tower at 224 px: no class token, MAP head, no classifier.
    model = jaxvit.create_model("So400m/14", num_classes=0, class_token=False, pool="map")
    assert jaxvit.count_params(model, 224) == 427_680_704


@pytest.mark.parametrize(
    "variant, projection, expected", [("B/32", 512, 87_849_216), ("L/14", 768, 303_966_208)]
)
def test_clip_tower_parameter_counts(variant, projection, expected):
    # transformers' CLIPVisionModelWithProjection of the same size has as many parameters.
    model = jaxvit.create_model(
        variant, num_classes=projection, pre_norm=True, patch_bias=False, head_bias=False
    )
    assert jaxvit.count_params(model, 224) == expected


def test_parameter_count_is_the_same_when_scanned():
    assert jaxvit.count_params(jaxvit.create_model("S/16", scan=True)) == 22_050_664


def test_decode_variant():
    assert jaxvit.decode_variant("B/16") == dict(
        width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16
    )
    assert jaxvit.decode_variant("H/14")["patch_size"] == 14
    assert jaxvit.decode_variant("S/16x8")["patch_size"] == (16, 8)
    assert "patch_size" not in jaxvit.decode_variant("L")
    for name in ["mu", "Ti", "S", "M", "B", "L", "H", "g"]:
        assert jaxvit.decode_variant(f"{name}/32")["width"] == jaxvit.VARIANTS[name]["width"]


@pytest.mark.parametrize("bad", ["X/16", "b/16", "B/0", "B/x", "B/16x8x2", ""])
def test_unknown_variant_lists_valid_names(bad):
    with pytest.raises(ValueError, match="B/16|Ti"):
        jaxvit.create_model(bad) if bad else jaxvit.decode_variant(bad)


def test_unknown_override_lists_fields():
    with pytest.raises(ValueError, match="unknown model field.*'widht'.*valid fields.*width"):
        jaxvit.create_model("Ti/16", widht=3)


# -- step 1: patch embedding ------------------------------------------------


def test_patchify_layout_and_inverse():
    x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
    patches = jaxvit.patchify(x, 4)
    assert patches.shape == (2, 6, 48)
    # Patch (row 1, col 2) is the image block [4:8, 8:12], flattened (p q c).
    np.testing.assert_array_equal(patches[0, 1 * 3 + 2], x[0, 4:8, 8:12].reshape(-1))
    np.testing.assert_array_equal(jaxvit.unpatchify(patches, 4, (2, 3)), x)
    np.testing.assert_array_equal(jaxvit.unpatchify(jaxvit.patchify(x, (2, 4)), (2, 4), (4, 3)), x)
    with pytest.raises(ValueError, match="do not fit grid"):
        jaxvit.unpatchify(patches, 4, (3, 3))


@pytest.mark.parametrize("patch, size", [(4, (16, 24)), ((4, 2), (8, 6))])
def test_patch_embed_equals_strided_conv(patch, size):
    """Forward and gradients equal a VALID conv with stride = kernel, to fp32 precision."""
    module = jaxvit.PatchEmbed(width=16, patch_size=patch)
    x = images(2, *size, 3)
    params = module.init(jax.random.key(1), x)
    params = perturb(params)
    p, q = (patch, patch) if isinstance(patch, int) else patch

    def conv(params, x):
        y = jax.lax.conv_general_dilated(
            x,
            params["params"]["kernel"],
            window_strides=(p, q),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )
        y = y + params["params"]["bias"]
        return y.reshape(y.shape[0], -1, y.shape[-1])

    ours = module.apply(params, x)
    assert ours.shape == (2, (size[0] // p) * (size[1] // q), 16)
    np.testing.assert_allclose(ours, conv(params, x), rtol=1e-5, atol=1e-5)

    def loss(f):
        return lambda params, x: jnp.sum(jnp.sin(f(params, x)))

    g_ours = jax.grad(loss(module.apply), argnums=(0, 1))(params, x)
    g_conv = jax.grad(loss(conv), argnums=(0, 1))(params, x)
    chex.assert_trees_all_close(g_ours, g_conv, rtol=1e-4, atol=1e-4)


# -- shapes at every step, 224 px / patch 16 --------------------------------


def test_shapes_at_every_step_at_224():
    model = jaxvit.create_model("mu/16", num_classes=1000)
    x = jax.ShapeDtypeStruct((3, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    params = variables["params"]
    assert params["patch_embed"]["kernel"].shape == (16, 16, 3, 32)
    assert params["cls_token"]["token"].shape == (1, 1, 32)
    assert params["pos_embed"]["embedding"].shape == (1, 197, 32)
    logits, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["intermediates"]), variables, x)
    inter = state["intermediates"]
    assert inter["patch_tokens"][0].shape == (3, 196, 32)
    assert inter["encoder"]["block_0"]["out"][0].shape == (3, 197, 32)
    assert inter["encoded"][0].shape == (3, 197, 32)
    assert logits.shape == (3, 1000)


def test_non_square_images_and_patches():
    model = tiny(patch_size=(4, 2))
    x = images(2, 8, 12)
    variables = model.init(jax.random.key(0), x)
    assert variables["params"]["pos_embed"]["embedding"].shape == (1, 1 + 2 * 6, 32)
    assert model.apply(variables, x).shape == (2, 10)


# -- step 2: class token and position embedding ------------------------------


def test_class_token_and_posemb_init():
    model = jaxvit.create_model("S/16", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    cls = variables["params"]["cls_token"]["token"]
    pos = variables["params"]["pos_embed"]["embedding"]
    assert cls.shape == (1, 1, 384) and not np.any(cls)
    assert pos.shape == (1, 197, 384)
    assert 0.018 < float(jnp.std(pos)) < 0.022
    # zero-init classifier: logits are the (zero) bias at init
    assert not np.any(variables["params"]["head"]["classifier"]["kernel"])


def test_posemb_sincos_2d():
    pe = jaxvit.posemb_sincos_2d((3, 5), 16)
    assert pe.shape == (1, 15, 16)
    # row-major (h w): token 7 is y=1, x=2; first quarter is sin(x * omega_0) = sin(2)
    np.testing.assert_allclose(pe[0, 7, 0], np.sin(2.0), rtol=1e-6)
    np.testing.assert_allclose(pe[0, 7, 8], np.sin(1.0), rtol=1e-6)
    assert len(np.unique(np.asarray(pe[0]), axis=0)) == 15
    with pytest.raises(ValueError, match="multiple of 4"):
        jaxvit.posemb_sincos_2d((2, 2), 10)


@pytest.mark.parametrize("old, new", [((4, 4), (6, 6)), ((4, 4), (3, 5)), ((2, 3), (4, 7))])
def test_resample_posemb_matches_torch_bilinear(old, new):
    import torch  # the test extra has it; only this test needs it

    rng = np.random.default_rng(0)
    posemb = rng.normal(size=(1, 1 + old[0] * old[1], 8)).astype(np.float32)
    out = jaxvit.resample_posemb(posemb, new, old_grid=old if old[0] != old[1] else None)
    assert out.shape == (1, 1 + new[0] * new[1], 8)
    np.testing.assert_array_equal(out[:, 0], posemb[:, 0])  # class slot kept
    grid = torch.from_numpy(posemb[0, 1:].reshape(1, *old, 8)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=new, mode="bilinear", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 8).numpy()
    np.testing.assert_allclose(out[0, 1:], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, antialias", [("bicubic", False), ("bicubic", True), ("bilinear", True)])
@pytest.mark.parametrize("old, new", [((4, 4), (6, 6)), ((7, 7), (3, 5)), ((3, 5), (8, 4)), ((5, 5), (5, 9))])
def test_resample_posemb_matches_torch_interpolate(method, antialias, old, new):
    import torch

    posemb = jax.random.normal(jax.random.key(3), (1, 1 + old[0] * old[1], 6))
    out = jaxvit.resample_posemb(posemb, new, old_grid=old, method=method, antialias=antialias)
    grid = torch.from_numpy(np.array(posemb[0, 1:]).reshape(1, *old, 6)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(
        grid, size=new, mode=method, align_corners=False, antialias=antialias
    )
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 6).numpy()
    np.testing.assert_array_equal(out[:, :1], posemb[:, :1])
    # torch computes in float32, these in float64: a few ulp of values near 1 apart
    np.testing.assert_allclose(out[:, 1:], ref, rtol=1e-5, atol=1e-5)


def test_resample_posemb_without_class_slot_and_errors():
    posemb = jnp.ones((1, 16, 4))
    assert jaxvit.resample_posemb(posemb, (2, 2), num_prefix_tokens=0).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="pass old_grid"):
        jaxvit.resample_posemb(jnp.ones((1, 1 + 12, 4)), (4, 4))
    with pytest.raises(ValueError, match="does not match"):
        jaxvit.resample_posemb(jnp.ones((1, 1 + 12, 4)), (4, 4), old_grid=(3, 5))


def test_learned_posemb_at_another_resolution_is_a_clear_error():
    model = tiny()
    variables = model.init(jax.random.key(0), images(1, 16, 16))
    with pytest.raises(ValueError, match=r"\(1, 17, 32\).*6x6 patches.*\(1, 37, 32\).*resample_posemb"):
        model.apply(variables, images(1, 24, 24))


@pytest.mark.parametrize(
    "overrides, tokens",
    [
        (dict(posemb="sincos2d", pool="gap", class_token=False), 16),
        (dict(posemb="sincos2d", pool="tok"), 17),
        (dict(pool="map", class_token=False), 16),
        (dict(pool="gap", representation_size=24), 17),
    ],
)
def test_pooling_and_posemb_options(overrides, tokens):
    model = tiny(**overrides)
    x = images()
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    assert ("cls_token" in params) == model.class_token
    assert ("pos_embed" in params) == (model.posemb == "learn")
    logits, state = model.apply(variables, x, mutable=["intermediates"])
    assert state["intermediates"]["encoded"][0].shape == (2, tokens, 32)
    assert logits.shape == (2, 10)
    features = model.clone(num_classes=0).apply({"params": _without_head(params)}, x)
    assert features.shape == (2, overrides.get("representation_size", 32))


def _without_head(params):
    head = {k: v for k, v in params["head"].items() if k != "classifier"}
    return {**params, "head": head}


def test_gap_is_the_mean_of_patch_tokens():
    model = tiny(pool="gap", num_classes=0)
    x = images()
    variables = model.init(jax.random.key(0), x)
    features, state = model.apply(variables, x, mutable=["intermediates"])
    encoded = state["intermediates"]["encoded"][0]
    np.testing.assert_allclose(features, encoded[:, 1:].mean(axis=1), rtol=1e-6)


# -- step 3: encoder -------------------------------------------------------


@pytest.fixture(scope="module")
def scanned():
    model = tiny(scan=True, depth=3)
    x = images()
    return model, model.init(jax.random.key(0), x), x


def test_scan_equals_unrolled(scanned):
    model, variables, x = scanned
    blocks = variables["params"]["encoder"]["blocks"]
    assert blocks["attn"]["qkv"]["kernel"].shape == (3, 32, 96)
    unrolled_params = jaxvit.scan_to_unrolled(variables["params"])
    assert set(unrolled_params["encoder"]) == {"block_0", "block_1", "block_2", "norm"}
    unrolled = model.clone(scan=False)
    np.testing.assert_allclose(
        unrolled.apply({"params": unrolled_params}, x), model.apply(variables, x), rtol=1e-5, atol=1e-6
    )
    back = jaxvit.unrolled_to_scan(unrolled_params)
    chex.assert_trees_all_equal(back, jax.tree_util.tree_map(np.asarray, dict(variables["params"])))


def test_training_gradients_are_finite_and_reach_every_parameter(scanned):
    model, variables, x = scanned
    model = model.clone(dropout=0.1, attention_dropout=0.1, drop_path_rate=0.2)
    params = perturb(variables["params"])
    rngs = {"dropout": jax.random.key(3)}
    grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, train=True, rngs=rngs) ** 2))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert float(jnp.abs(g).max()) > 0, path


def test_remat_gives_the_same_outputs_and_gradients(scanned):
    model, variables, x = scanned
    params = perturb(variables["params"])

    def grads(m):
        return jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x) ** 2))(params)

    plain = grads(model)
    for policy in ["nothing_saveable", "dots_saveable"]:
        chex.assert_trees_all_close(grads(model.clone(remat_policy=policy)), plain, rtol=1e-5, atol=1e-6)
    unrolled = model.clone(scan=False, remat_policy="nothing_saveable")
    out = unrolled.apply({"params": jaxvit.scan_to_unrolled(params)}, x)
    np.testing.assert_allclose(out, model.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


def test_drop_path_zeroes_whole_examples_and_keeps_the_mean():
    x = jnp.ones((4000, 3, 2))
    y = jaxvit.drop_path(x, 0.25, jax.random.key(0))
    per_example = np.asarray(y[:, 0, 0])
    np.testing.assert_allclose(np.unique(per_example), [0.0, 1 / 0.75], rtol=1e-6)
    np.testing.assert_array_equal(y, y[:, :1, :1] * jnp.ones_like(y))
    assert abs(float(per_example.mean()) - 1.0) < 0.05


def test_dropout_only_in_training():
    model = tiny(dropout=0.5, attention_dropout=0.5, drop_path_rate=0.5)
    x = images()
    variables = model.init(jax.random.key(0), x)
    variables = {"params": perturb(variables["params"])}
    eval_a = model.apply(variables, x)
    np.testing.assert_array_equal(eval_a, model.apply(variables, x))
    train_a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)


@pytest.mark.parametrize("name", sorted(REFERENCE_ACTIVATIONS))
def test_activation_is_a_field(name):
    mlp = jaxvit.MlpBlock(mlp_dim=8, activation=name)
    x = jnp.linspace(-3, 3, 12).reshape(1, 3, 4)
    params = mlp.init(jax.random.key(0), x)
    p = params["params"]
    hidden = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    want = REFERENCE_ACTIVATIONS[name](hidden) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(mlp.apply(params, x), want, rtol=1e-5, atol=1e-6)


def test_gelu_approximate_is_a_deprecated_name_of_gelu_tanh():
    old = tiny(gelu_approximate=True)
    new = tiny(activation="gelu_tanh")
    x = images()
    variables = {"params": perturb(new.init(jax.random.key(0), x)["params"])}
    with pytest.warns(DeprecationWarning, match="activation='gelu_tanh'"):
        np.testing.assert_array_equal(old.apply(variables, x), new.apply(variables, x))
    with pytest.raises(ValueError, match="contradicts activation='quick_gelu'"):
        tiny(gelu_approximate=True, activation="quick_gelu")
    with pytest.raises(ValueError, match="unknown activation 'relu'.*quick_gelu"):
        tiny(activation="relu")


# -- options of the CLIP and SigLIP towers ------------------------------------


def test_bias_switches_remove_exactly_their_parameters():
    x = images()
    full = flat_shapes(tiny(), x)
    cut = flat_shapes(tiny(patch_bias=False, qkv_bias=False, head_bias=False), x)
    gone = {"patch_embed/bias", "head/classifier/bias"} | {
        f"encoder/block_{i}/attn/qkv/bias" for i in range(TINY["depth"])
    }
    assert set(full) - set(cut) == gone and set(cut) < set(full)
    model = tiny(patch_bias=False, qkv_bias=False, head_bias=False)
    params = perturb(model.init(jax.random.key(0), x)["params"])
    patches = jaxvit.patchify(x, 4) @ params["patch_embed"]["kernel"].reshape(-1, TINY["width"])
    _, state = model.apply({"params": params}, x, mutable=["intermediates"])
    np.testing.assert_allclose(state["intermediates"]["patch_tokens"][0], patches, rtol=1e-5, atol=1e-6)
    features = state["intermediates"]["head"]["features"][0]
    logits = model.apply({"params": params}, x)
    np.testing.assert_allclose(
        logits, features @ params["head"]["classifier"]["kernel"], rtol=1e-5, atol=1e-5
    )


def test_pre_norm_normalises_the_tokens_before_the_first_block():
    x = images()
    model = tiny(pre_norm=True, layer_norm_eps=1e-5)
    variables = {"params": perturb(model.init(jax.random.key(0), x)["params"])}
    assert set(variables["params"]["encoder"]["norm_pre"]) == {"scale", "bias"}
    _, state = model.apply(variables, x, mutable=["intermediates"])
    p = variables["params"]
    embedded = (
        jnp.concatenate(
            [
                jnp.broadcast_to(p["cls_token"]["token"], (2, 1, TINY["width"])),
                jaxvit.patchify(x, 4) @ p["patch_embed"]["kernel"].reshape(-1, TINY["width"])
                + p["patch_embed"]["bias"],
            ],
            axis=1,
        )
        + p["pos_embed"]["embedding"]
    )
    normed = nn.LayerNorm(epsilon=1e-5).apply({"params": p["encoder"]["norm_pre"]}, embedded)
    block = jaxvit.EncoderBlock(mlp_dim=TINY["mlp_dim"], num_heads=TINY["num_heads"], layer_norm_eps=1e-5)
    want, _ = block.apply({"params": p["encoder"]["block_0"]}, normed, jnp.zeros(()))
    got = state["intermediates"]["encoder"]["block_0"]["out"][0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and scanned the same
    scanned = model.clone(scan=True)
    out = scanned.apply({"params": jaxvit.unrolled_to_scan(variables["params"])}, x)
    np.testing.assert_allclose(out, model.apply(variables, x), rtol=1e-5, atol=1e-5)


def flat_shapes(model, x):
    import flax

    return flax.traverse_util.flatten_dict(vit.param_shapes(model, x.shape[1:3]), sep="/")


# -- intermediates ---------------------------------------------------------


def test_attention_weights_and_block_outputs():
    model = tiny(depth=2)
    x = images()
    variables = model.init(jax.random.key(0), x)
    assert set(variables) == {"params"}  # init sows nothing
    plain = model.apply(variables, x)
    logits, state = model.apply(variables, x, mutable=["intermediates", "attention"])
    # The explicit-weights path gives the same logits as dot_product_attention.
    np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-6)
    weights = jaxvit.attention_weights(model, variables, x)
    assert weights.shape == (2, 2, 4, 17, 17)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(jaxvit.attention_weights(model, variables, x, block=1), weights[1])
    assert len(state["intermediates"]["encoder"]) == 2


def test_attention_weights_match_a_hand_computation():
    attn = jaxvit.SelfAttention(num_heads=2)
    x = jax.random.normal(jax.random.key(0), (1, 5, 8))
    params = attn.init(jax.random.key(1), x)
    _, state = attn.apply(params, x, mutable=["attention"])
    qkv = (x @ params["params"]["qkv"]["kernel"] + params["params"]["qkv"]["bias"]).reshape(1, 5, 3, 2, 4)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    want = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) / 2.0, axis=-1)
    np.testing.assert_allclose(state["attention"]["weights"][0], want, rtol=1e-5, atol=1e-6)


# -- dtype threading -------------------------------------------------------


def test_bf16_compute_with_fp32_params_threads_through_every_matmul():
    model = tiny(dtype=jnp.bfloat16, pool="map", class_token=False, representation_size=16)
    x = images()
    variables = model.init(jax.random.key(0), x)
    assert {a.dtype for a in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, state = model.apply(variables, x, mutable=["intermediates"])
    assert logits.dtype == jnp.bfloat16
    for leaf in jax.tree_util.tree_leaves(state):
        assert leaf.dtype == jnp.bfloat16
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)}))(
        variables, x
    )
    dots = _dot_operand_dtypes(jaxpr.jaxpr)
    assert dots, "no matmul found"
    assert all(d == {jnp.dtype(jnp.bfloat16)} for d in dots), dots
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x).astype(jnp.float32)))(
        variables["params"]
    )
    assert all(
        g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads)
    )


def test_bf16_params_too():
    model = tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), images())
    assert {a.dtype for a in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    assert model.apply(variables, images()).dtype == jnp.bfloat16


def _dot_operand_dtypes(jaxpr):
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append({v.aval.dtype for v in eqn.invars})
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else _subjaxprs(eqn):
            found.extend(_dot_operand_dtypes(sub))
    return found


def _subjaxprs(eqn):
    for param in eqn.params.values():
        for p in param if isinstance(param, tuple | list) else (param,):
            if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
                yield p.jaxpr
            elif hasattr(p, "eqns"):
                yield p


# -- bfloat16 products on the CPU ------------------------------------------


def _dot_types(fn, *args):
    """``(lhs, rhs, result)`` element types of every ``dot_general`` in the lowered program, counted."""
    text = jax.jit(fn).lower(*args).as_text()
    tensor = r"tensor<(?:[^>]*x)?(\w+)>"
    return collections.Counter(
        re.findall(rf"stablehlo\.dot_general.*: \({tensor}, {tensor}\) -> {tensor}", text)
    )


FAST = ("bf16", "bf16", "f32")  # the form XLA:CPU runs on its bfloat16 kernels


@pytest.mark.parametrize(
    "lhs_shape, rhs_shape, dims",
    [
        ((2, 5, 8), (8, 6), (((2,), (0,)), ((), ()))),  # Dense
        ((2, 3, 5, 4), (2, 3, 7, 4), (((3,), (3,)), ((0, 1), (0, 1)))),  # q k^T, heads-major
        ((3, 4, 5), (4, 5, 6), (((1, 2), (0, 1)), ((), ()))),  # DenseGeneral over two axes
    ],
)
def test_bf16_dot_general_accumulates_in_f32_forward_and_backward(lhs_shape, rhs_shape, dims):
    lhs, rhs = _rand(lhs_shape, 0).astype(jnp.bfloat16), _rand(rhs_shape, 1).astype(jnp.bfloat16)
    f32 = lambda a: np.asarray(a, np.float32)
    out = ops.dot_general(lhs, rhs, dims)
    ct = _rand(out.shape, 2).astype(jnp.bfloat16)
    # reference: exact float32 products of the same bfloat16 values, rounded once
    ref = lambda a, b: jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(out), f32(ref(lhs, rhs).astype(jnp.bfloat16)), rtol=1e-2, atol=1e-2)
    grads = jax.vjp(lambda a, b: ops.dot_general(a, b, dims), lhs, rhs)[1](ct)
    ref_grads = jax.vjp(ref, lhs, rhs)[1](ct.astype(jnp.float32))
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(f32(g), f32(r), rtol=2e-2, atol=2e-2 * float(jnp.abs(r).max()))
    # per-example gradients under vmap are the gradients of each example
    one = lambda a, b: jax.vjp(lambda a, b: ops.dot_general(a, b, dims), a, b)[1](ct)
    batched = jax.vmap(one, in_axes=(None, 0))(lhs, jnp.stack([rhs, 2 * rhs]))
    chex.assert_trees_all_equal(jax.tree_util.tree_map(lambda g: g[1], batched), one(lhs, 2 * rhs))

    # every product, forward and backward, has the fast form; "plain" has none
    def vjp(a, b):
        out, backward = jax.vjp(lambda a, b: ops.dot_general(a, b, dims), a, b)
        return out, backward(ct)

    assert _dot_types(vjp, lhs, rhs) == {FAST: 3}
    with ops.product_impl("plain"):  # read when traced: a new function
        assert FAST not in _dot_types(lambda a, b: vjp(a, b), lhs, rhs)
    assert ops.get_product_impl() == "auto"


def test_dot_general_leaves_float32_to_lax():
    lhs, rhs = _rand((4, 8)), _rand((8, 3), 1)
    dims = (((1,), (0,)), ((), ()))
    jaxpr = jax.make_jaxpr(lambda a, b: ops.dot_general(a, b, dims))(lhs, rhs)
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns] == ["dot_general"]
    np.testing.assert_array_equal(ops.dot_general(lhs, rhs, dims), jax.lax.dot_general(lhs, rhs, dims))


def test_bf16_bias_gradient_is_a_float32_sum_of_the_rows():
    y, bias = _rand((3, 70, 6)).astype(jnp.bfloat16), _rand((6,), 1).astype(jnp.bfloat16)
    ct = _rand(y.shape, 2).astype(jnp.bfloat16)
    out, backward = jax.vjp(ops.add_bias, y, bias)
    np.testing.assert_array_equal(out, y + bias)
    dy, dbias = backward(ct)
    np.testing.assert_array_equal(dy, ct)
    assert dbias.dtype == jnp.bfloat16
    want = np.asarray(ct, np.float64).reshape(-1, 6).sum(axis=0)
    np.testing.assert_allclose(np.asarray(dbias, np.float64), want, rtol=8e-3)  # one bfloat16 rounding
    jaxpr = str(jax.make_jaxpr(backward)(ct))
    assert "reduce_sum[axes=(0,)" in jaxpr and "f32[210,6]" in jaxpr


@pytest.mark.parametrize("name", ops.ACTIVATIONS)
def test_bf16_dense_activation_rounds_once_and_differentiates_as_the_composition(name):
    """In bfloat16 on the CPU, inference applies the activation to the float32 accumulator;
    the derivatives (and the values they come with) are those of the three steps in turn."""
    x, kernel, bias = (
        _rand(s, seed, scale=1.0).astype(jnp.bfloat16) for seed, s in enumerate([(2, 5, 8), (8, 6), (6,)])
    )
    fused = lambda x, k, b: ops.dense_activation(x, k, b, name)
    steps = lambda x, k, b: ops.activation(
        ops.add_bias(ops.dot_general(x, k, (((2,), (0,)), ((), ()))), b), name
    )
    f32 = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree)
    exact = lambda x, k, b: ops.activation(
        x.astype(jnp.float32) @ k.astype(jnp.float32) + b.astype(jnp.float32), name
    ).astype(jnp.bfloat16)
    np.testing.assert_array_equal(f32(fused(x, kernel, bias)), f32(exact(x, kernel, bias)))  # one rounding
    chex.assert_trees_all_close(
        f32(fused(x, kernel, bias)), f32(steps(x, kernel, bias)), rtol=2e-2, atol=2e-2
    )
    ct = _rand((2, 5, 6), 3).astype(jnp.bfloat16)
    chex.assert_trees_all_equal(*(f32(jax.vjp(f, x, kernel, bias)[1](ct)) for f in (fused, steps)))
    chex.assert_trees_all_equal(*(f32(jax.vjp(f, x, kernel, bias)[0]) for f in (fused, steps)))


def test_dense_has_nn_dense_parameters_and_values():
    x = _rand((2, 3, 8))
    ours, theirs = jaxvit.Dense(5, name="fc"), nn.Dense(5, name="fc")
    params = ours.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(params, theirs.init(jax.random.key(0), x))
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6, atol=1e-6)


def test_bf16_model_trains_on_the_fast_kernels_with_the_plain_gradients():
    """Every product of a bfloat16 model's training gradient takes the fast form, and the
    gradients are those of plain ``lax.dot_general`` up to bfloat16 rounding."""
    model = tiny(dtype=jnp.bfloat16, representation_size=16)
    x = images()
    params = perturb(model.init(jax.random.key(0), x)["params"])
    grad = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x).astype(jnp.float32) ** 2))
    types = _dot_types(grad, params)
    assert set(types) == {FAST} and types[FAST] >= 3 * 4 * TINY["depth"], types
    fast = grad(params)
    with ops.product_impl("plain"):
        plain = grad(params)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(plain), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=0.1, atol=0.05 * float(jnp.abs(b).max()) + 1e-6)


def test_bf16_products_have_reverse_mode_of_any_order_and_forward_mode_when_plain():
    x, w = _rand((4, 8), scale=1.0).astype(jnp.bfloat16), _rand((8, 3), 1, scale=1.0).astype(jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    f = lambda w: jnp.sum(jnp.tanh(ops.dot_general(x, w, dims)).astype(jnp.float32))
    second = lambda w: jnp.sum(jax.grad(f)(w).astype(jnp.float32) ** 2)
    fast = jax.grad(second)(w)
    with ops.product_impl("plain"):
        plain = jax.grad(second)(w)
        jax.jvp(f, (w,), (w,))  # forward mode takes the plain products
    np.testing.assert_allclose(
        np.asarray(fast, np.float32), np.asarray(plain, np.float32), rtol=0.05, atol=0.05
    )
    with pytest.raises(TypeError):  # a custom VJP: jax says forward mode is not defined for it
        jax.jvp(f, (w,), (w,))


def test_product_impl_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown product impl 'fast'"):
        ops.set_product_impl("fast")


# -- bad input -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_variables():
    model = tiny()
    return model, model.init(jax.random.key(0), images())


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((16, 16, 3), jnp.float32, r"rank 4 \(N, H, W, C\), got shape \(16, 16, 3\)"),
        ((2, 18, 16, 3), jnp.float32, "image size 18x16 is not divisible by the patch size 4x4"),
        ((2, 16, 16, 1), jnp.float32, "1 channels but the model expects num_channels=3"),
        ((2, 3, 16, 16), jnp.float32, "image size 3x16 is not divisible"),
        ((2, 16, 16, 3), jnp.uint8, "must be floating point"),
    ],
)
def test_bad_images_raise_before_compiling(tiny_variables, shape, dtype, message):
    model, variables = tiny_variables
    with pytest.raises(ValueError, match=message):
        model.apply(variables, jnp.zeros(shape, dtype))
    with pytest.raises(ValueError, match=message):
        jax.jit(model.apply).lower(variables, jax.ShapeDtypeStruct(shape, dtype))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(width=30, num_heads=4), "width 30 is not divisible by num_heads=4"),
        (dict(pool="cls"), r"unknown pool 'cls': expected one of \('tok', 'gap', 'map', 'attn_pool'\)"),
        (
            dict(posemb="sincos"),
            r"unknown posemb 'sincos': expected one of \('learn', 'sincos2d', 'sincos2d_mae', 'rope', 'none'\)",
        ),
        (dict(remat_policy="all"), "unknown remat_policy 'all'.*nothing_saveable"),
        (dict(class_token=False), "pool='tok' needs class_token=True"),
        (dict(posemb="sincos2d", width=18, num_heads=2), "width divisible by 4"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)
    model = vit.VisionTransformer(**{**TINY, **overrides})
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), images())


def test_encoder_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="width 30 is not divisible by num_heads=4"):
        jaxvit.Encoder(depth=1, mlp_dim=8, num_heads=4).init(jax.random.key(0), jnp.zeros((1, 3, 30)))


# -- composability ---------------------------------------------------------


class PatchRegressor(nn.Module):
    """A user's model: our patch embedding and encoder under their own per-token head."""

    @nn.compact
    def __call__(self, images):
        tokens = jaxvit.PatchEmbed(width=16, patch_size=4)(images)
        tokens = tokens + self.param("pos", nn.initializers.normal(0.02), (1, tokens.shape[1], 16))
        tokens = jaxvit.Encoder(depth=2, mlp_dim=32, num_heads=2)(tokens)
        return nn.Dense(4 * 4 * 3)(tokens)  # reconstruct each patch


class TextClassifier(nn.Module):
    """The encoder on tokens that never were images."""

    @nn.compact
    def __call__(self, token_ids):
        x = nn.Embed(100, 16)(token_ids)
        x = jaxvit.ClassToken()(x)
        x = jaxvit.Encoder(depth=1, mlp_dim=32, num_heads=4, scan=True)(x)
        return jaxvit.Head(num_classes=3, pool="tok")(x)


def test_modules_compose_into_other_models():
    x = images(2, 16, 8)
    regressor = PatchRegressor()
    params = regressor.init(jax.random.key(0), x)
    patches = regressor.apply(params, x)
    assert patches.shape == (2, 8, 48)
    assert jaxvit.unpatchify(patches, 4, (4, 2)).shape == x.shape

    def loss(p):
        return jnp.mean((regressor.apply(p, x) - jaxvit.patchify(x, 4)) ** 2)

    grads = jax.grad(loss)(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))

    text = TextClassifier()
    ids = jnp.array([[1, 5, 7, 9], [2, 3, 4, 0]])
    params = text.init(jax.random.key(0), ids)
    assert text.apply(params, ids).shape == (2, 3)
    assert params["params"]["Encoder_0"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (1, 16, 32)


def test_fused_and_explicit_attention_paths_agree():
    """GPUs take jax.nn.dot_product_attention, the CPU the heads-major explicit path: same numbers."""
    model = tiny()
    x = images()
    variables = {"params": perturb(model.init(jax.random.key(0), x)["params"])}

    def loss_and_grads():
        return jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(variables["params"])

    with ops.attention_impl("explicit"):
        assert ops.use_explicit_attention()
        explicit = loss_and_grads()
    with ops.attention_impl("fused"):
        assert not ops.use_explicit_attention()
        fused = loss_and_grads()
    assert ops.get_attention_impl() == "auto"
    chex.assert_trees_all_close(explicit, fused, rtol=1e-4, atol=1e-5)  # fp32 summation order


def _products_lowered_for(platform: str, attention: str = "auto", product: str = "auto") -> list[str]:
    """The signatures (dimensions, operand and result types) of every product in a bfloat16 model's
    gradient lowered for ``platform``, under the given ``set_attention_impl``/``set_product_impl``."""
    model = tiny(dtype=jnp.bfloat16)
    x = images()
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=True).astype(jnp.float32))
    with ops.attention_impl(attention), ops.product_impl(product):
        text = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=(platform,)).as_text()
    return sorted(re.sub(r"%[\w#]+", "", line) for line in re.findall(r"stablehlo\.dot_general.*", text))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_the_kernels_follow_the_platform_compiled_for_not_the_default_backend(platform):
    """On this CPU-only process a step lowered for a TPU or GPU gets the accelerator paths
    (jax.nn.dot_product_attention, plain bfloat16 products), a step lowered for the CPU its own;
    a forced choice holds on every platform."""
    accelerator = _products_lowered_for(platform, "fused", "plain")
    cpu = _products_lowered_for("cpu", "explicit", "auto")
    assert accelerator != cpu
    # The CPU's bfloat16 products accumulate into float32 results; plain ones stay bfloat16.
    widened = lambda products: sum(bool(re.search(r"xbf16>\) -> tensor<[\dx]*xf32>$", p)) for p in products)
    assert widened(cpu) == len(cpu) > 4 * widened(accelerator)  # jax.nn's attention widens its logits
    assert _products_lowered_for(platform) == accelerator
    assert _products_lowered_for("cpu") == cpu
    assert _products_lowered_for(platform, "explicit", "auto") != accelerator


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_explicit_attention_normalizing_after_the_product_changes_nothing(dtype):
    """Without ``weights_fn`` the forward pass normalizes after ``@ v``: same values and the same
    derivatives (forward and reverse mode, taken from the softmax-first form) as with it."""
    q, k, v = (_rand((2, 3, 7, 4), seed, scale=2.0).astype(dtype) for seed in range(3))
    g = _rand((2, 3, 7, 4), 3).astype(dtype)
    after = lambda q, k, v: ops.explicit_attention(q, k, v)
    before = lambda q, k, v: ops.explicit_attention(q, k, v, weights_fn=lambda w: w)
    f32 = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree)

    assert after(q, k, v).dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)  # rounding only
    chex.assert_trees_all_close(f32(after(q, k, v)), f32(before(q, k, v)), **tol)
    # the derivatives are the softmax-first form's, bit for bit
    np.testing.assert_array_equal(*(f32(jax.vjp(f, q, k, v)[1](g)) for f in (after, before)))
    with ops.product_impl("plain"):  # forward mode: bfloat16 products on the CPU have custom VJPs
        np.testing.assert_array_equal(*(f32(jax.jvp(f, (q, k, v), (g, g, g))[1]) for f in (after, before)))
    # and both match jax's own attention (tokens-major)
    t = lambda a: jnp.swapaxes(a, 1, 2)
    reference = lambda q, k, v: t(jax.nn.dot_product_attention(t(q), t(k), t(v)))
    if dtype == jnp.float32:
        chex.assert_trees_all_close(f32(after(q, k, v)), f32(reference(q, k, v)), rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(
            f32(jax.vjp(after, q, k, v)[1](g)), f32(jax.vjp(reference, q, k, v)[1](g)), rtol=1e-5, atol=1e-5
        )


def test_fused_qkv_starts_as_three_xavier_projections():
    attn = jaxvit.SelfAttention(num_heads=6)
    kernel = attn.init(jax.random.key(0), jnp.zeros((1, 2, 384)))["params"]["qkv"]["kernel"]
    assert kernel.shape == (384, 1152)
    for part in jnp.split(kernel, 3, axis=1):  # xavier on (384, 384): std sqrt(1/384)
        assert abs(float(jnp.std(part)) / np.sqrt(1 / 384) - 1) < 0.03


# ---------------------------------------------------------------------------
# Memory-lean derivatives: same values and gradients as jax, fewer saved arrays
# ---------------------------------------------------------------------------


def _rand(shape, seed=0, scale=3.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("name", sorted(REFERENCE_ACTIVATIONS))
def test_activation_matches_the_formula_in_value_and_derivatives(name):
    x = _rand((64,))
    ours = lambda x: ops.activation(x, name)
    ref = REFERENCE_ACTIVATIONS[name]
    chex.assert_trees_all_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    d1 = lambda f: jax.vmap(jax.grad(f))
    chex.assert_trees_all_close(d1(ours)(x), d1(ref)(x), rtol=1e-5, atol=1e-6)
    d2 = lambda f: jax.vmap(jax.grad(jax.grad(f)))  # the custom JVP differentiates again
    chex.assert_trees_all_close(d2(ours)(x), d2(ref)(x), rtol=1e-4, atol=1e-5)
    assert ops.activation(x.astype(jnp.bfloat16), name).dtype == jnp.bfloat16
    assert _distinct_residuals(ours, x.reshape(8, 8), shape=(8, 8)) == 1


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_matches_jax(approximate):
    x = _rand((64,))
    chex.assert_trees_all_close(
        ops.gelu(x, approximate), jax.nn.gelu(x, approximate=approximate), rtol=1e-6, atol=1e-6
    )


def test_softmax_matches_jax_in_value_jvp_and_vjp():
    x, t, g = _rand((3, 5, 7)), _rand((3, 5, 7), 1), _rand((3, 5, 7), 2)
    x = x.at[0, 0, :3].set(-jnp.inf)  # masked entries: weight 0, gradient 0
    ref = lambda x: jax.nn.softmax(x, axis=-1)
    chex.assert_trees_all_close(ops.softmax(x), ref(x), rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(
        jax.jvp(ops.softmax, (x,), (t,)), jax.jvp(ref, (x,), (t,)), rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(jax.vjp(ops.softmax, x)[1](g), jax.vjp(ref, x)[1](g), rtol=1e-5, atol=1e-6)


def _distinct_residuals(f, *args, shape):
    """How many different arrays of ``shape`` the backward pass of ``f`` keeps (public ``jax.vjp``)."""
    _, backward = jax.vjp(f, *args)
    kept = [np.asarray(a) for a in jax.tree_util.tree_leaves(backward) if a.shape == shape]
    distinct = []
    for a in kept:  # eager autodiff may hold one array twice
        if not any(np.array_equal(a, b) for b in distinct):
            distinct.append(a)
    return len(distinct)


def test_gelu_and_softmax_keep_one_array_each_for_the_backward_pass():
    x = _rand((4, 6, 7))
    assert _distinct_residuals(ops.gelu, x, shape=x.shape) == 1
    assert _distinct_residuals(ops.softmax, x, shape=x.shape) == 1
    # jax's own keep more: what this saves
    assert _distinct_residuals(lambda x: jax.nn.gelu(x, approximate=False), x, shape=x.shape) == 3
    assert _distinct_residuals(jax.nn.softmax, x, shape=x.shape) == 1  # plus two (.., 1) arrays


def test_encoder_block_keeps_one_attention_and_two_mlp_arrays_for_the_backward_pass():
    """In a whole block: the softmax output (N, H, T, T) once; GELU's slope and output (N, T, mlp_dim)."""
    n, t, d, m, h = 2, 5, 8, 32, 2
    block = jaxvit.EncoderBlock(mlp_dim=m, num_heads=h)
    x = _rand((n, t, d))
    params = block.init(jax.random.key(0), x, jnp.zeros(()))

    def f(params, x):
        return jnp.sum(block.apply(params, x, jnp.zeros(()))[0])

    with ops.attention_impl("explicit"):  # the path with our softmax
        assert _distinct_residuals(f, params, x, shape=(n, h, t, t)) == 1
        assert _distinct_residuals(f, params, x, shape=(n, t, m)) == 2


def test_old_names_still_work_for_one_release():
    model = tiny()
    shape = jax.ShapeDtypeStruct((2, 16, 8, 3), jnp.float32)
    with pytest.warns(DeprecationWarning, match="patch_grid"):
        assert model.check_images(shape) == (4, 2)
    head = jaxvit.Head(num_classes=3, pool="gap", bias_init=-2.0)
    with pytest.warns(DeprecationWarning, match="classifier_bias"):
        params = head.init(jax.random.key(0), jnp.zeros((1, 4, 8)))
    np.testing.assert_array_equal(params["params"]["classifier"]["bias"], [-2.0] * 3)
    with pytest.warns(DeprecationWarning, match="jaxvit.layers.scan.scan_to_unrolled"):
        assert vit.scan_to_unrolled is jaxvit.scan_to_unrolled
    with pytest.warns(DeprecationWarning, match="jaxvit.ops.use_explicit_attention"):
        assert vit.use_explicit_attention is ops.use_explicit_attention
    with pytest.warns(DeprecationWarning, match="jaxvit.training.configs"):
        from jaxvit import configs as old_configs
    from jaxvit.training import configs as new_configs

    assert old_configs is new_configs


def test_attention_impl_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"unknown attention impl 'flash': expected one of \('auto'"):
        ops.set_attention_impl("flash")
    assert ops.get_attention_impl() == "auto"


def test_unrolled_parameters_train_as_one_scan_with_the_same_values_and_gradients():
    """block_loop='auto' scans the stacked block_i params when training; the numbers are the unrolled loop's."""
    model = tiny(depth=3)
    x = images()
    params = perturb(model.init(jax.random.key(0), x)["params"])
    assert "block_2" in params["encoder"] and "blocks" not in params["encoder"]

    def loss_and_grads(m, train):
        return jax.value_and_grad(lambda p: jnp.sum(m.apply({"params": p}, x, train=train) ** 2))(params)

    reference = loss_and_grads(model.clone(block_loop="unrolled", remat_policy="none"), True)
    # fp32 summation order differs between the loop and the scan: 2e-6 at most here
    chex.assert_trees_all_close(loss_and_grads(model, True), reference, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(
        loss_and_grads(model.clone(remat_policy="none"), True), reference, rtol=1e-4, atol=1e-5
    )
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x, train=True))(params))
    assert jaxpr.count("scan[") == 1 and "remat" in jaxpr  # one loop, with the dots-only remat
    assert "scan[" not in str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x))(params))  # inference


def test_scanned_training_with_dropout_draws_per_block_and_keeps_intermediates_unrolled():
    model = tiny(depth=2, dropout=0.2, drop_path_rate=0.2, num_classes=0)  # features: the head starts at zero
    x = images()
    params = model.init(jax.random.key(0), x)["params"]
    run = lambda key: model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(key)})
    assert not np.allclose(run(1), run(2)) and np.array_equal(run(1), run(1))
    out, state = model.apply(
        {"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["intermediates"]
    )
    assert "block_1" in state["intermediates"]["encoder"]  # collected: the blocks ran as submodules
    with pytest.raises(
        ValueError, match=r"unknown block_loop 'fast': expected one of \('auto', 'scan', 'unrolled'\)"
    ):
        tiny(block_loop="fast")
