"""The options of today's backbones, one at a time: registers, LayerScale, SwiGLU, the
distillation token, PyTorch-exact bicubic resizing, family variants and dense features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

import jaxvit
from jaxvit.layers.mlp import SwiGLUMlp, swiglu_hidden_size
from jaxvit.layers.posemb import resize_matrix
from jaxvit.layers.tokens import RegisterTokens

TINY = dict(num_classes=5, width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4)
IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)


def tiny(**overrides):
    return jaxvit.create_model(None, **{**TINY, **overrides})


def random_variables(module, inputs=IMAGES[:1], seed=0):
    """init, then every parameter redrawn, so zero inits (tokens, heads) hide nothing."""
    variables = module.init(jax.random.key(seed), inputs)
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [0.3 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def run(model, variables, images=IMAGES):
    out, state = model.apply(variables, images, mutable=["intermediates"])
    return out, state["intermediates"]


# -- position-embedding resizing -----------------------------------------------------------


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(
    "old, new", [((4, 4), (7, 5)), ((7, 6), (3, 4)), ((37, 37), (16, 16)), ((5, 5), (5, 9))]
)
def test_bicubic_resample_equals_torch_interpolate(old, new, antialias):
    rng = np.random.default_rng(0)
    posemb = rng.normal(size=(1, 1 + old[0] * old[1], 8)).astype(np.float32)
    grid = torch.from_numpy(posemb[:, 1:].reshape(1, *old, 8)).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(
        grid, size=new, mode="bicubic", align_corners=False, antialias=antialias
    )
    expected = expected.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
    got = np.asarray(jaxvit.resample_posemb(posemb, new, old, 1, method="bicubic", antialias=antialias))
    np.testing.assert_array_equal(got[:, :1], posemb[:, :1])
    np.testing.assert_allclose(got[:, 1:], expected, atol=2e-6, rtol=0)


def test_cubic_resize_rows_sum_to_one_and_unknown_method_is_named():
    for antialias in (False, True):
        np.testing.assert_allclose(resize_matrix(5, 11, "bicubic", antialias).sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_allclose(resize_matrix(11, 5, "bicubic", antialias).sum(axis=1), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown resample method 'nearest'.*bicubic"):
        jaxvit.resample_posemb(np.zeros((1, 17, 4)), (2, 2), method="nearest")


# -- registers -------------------------------------------------------------------------------


def test_registers_follow_the_class_token_and_get_no_position_embedding():
    tokens = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    layer = RegisterTokens(num_tokens=2, num_prefix_tokens=1)
    variables = {"params": {"tokens": -jnp.ones((1, 2, 4))}}
    out = layer.apply(variables, tokens)
    np.testing.assert_array_equal(out[:, 0], tokens[:, 0])
    np.testing.assert_array_equal(out[:, 1:3], -jnp.ones((2, 2, 4)))
    np.testing.assert_array_equal(out[:, 3:], tokens[:, 1:])

    model = tiny(num_registers=3, depth=0)
    variables = random_variables(model)
    assert variables["params"]["pos_embed"]["embedding"].shape == (1, 1 + 16, 32)
    assert variables["params"]["registers"]["tokens"].shape == (1, 3, 32)
    _, inter = run(model, variables)
    assert inter["encoded"][0].shape == (2, 1 + 3 + 16, 32)
    # with no blocks, a register comes out as the normed register itself: no position added
    registers = variables["params"]["registers"]["tokens"][0]
    scale, bias = (variables["params"]["encoder"]["norm"][k] for k in ("scale", "bias"))
    mean = registers.mean(-1, keepdims=True)
    normed = (registers - mean) / jnp.sqrt(registers.var(-1, keepdims=True) + 1e-6) * scale + bias
    np.testing.assert_allclose(inter["encoded"][0][0, 1:4], normed, atol=1e-5)


def test_gap_pooling_skips_every_prefix_token():
    model = tiny(num_registers=2, distill_token=False, pool="gap", num_classes=0)
    variables = random_variables(model)
    features, inter = run(model, variables)
    np.testing.assert_allclose(features, inter["encoded"][0][:, 3:].mean(axis=1), atol=1e-6)


# -- LayerScale and SwiGLU -------------------------------------------------------------------


def test_layer_scale_params_and_a_zero_scale_makes_the_block_an_identity():
    model = tiny(layer_scale_init=0.25)
    params = model.init(jax.random.key(0), IMAGES[:1])["params"]["encoder"]["block_0"]
    np.testing.assert_array_equal(params["ls1"]["scale"], np.full((32,), 0.25, np.float32))
    np.testing.assert_array_equal(params["ls2"]["scale"], np.full((32,), 0.25, np.float32))
    assert "ls1" not in tiny().init(jax.random.key(0), IMAGES[:1])["params"]["encoder"]["block_0"]

    zero = tiny(layer_scale_init=0.0)
    variables = random_variables(zero)
    for name in ("ls1", "ls2"):
        variables["params"]["encoder"]["block_0"][name]["scale"] = jnp.zeros((32,))
    _, inter = run(zero, variables)
    no_blocks = dict(variables["params"], encoder={"norm": variables["params"]["encoder"]["norm"]})
    _, expected = run(zero.clone(depth=0), {"params": no_blocks})
    np.testing.assert_allclose(inter["encoded"][0], expected["encoded"][0], atol=1e-6)


def test_swiglu_gates_with_the_first_half_of_fc1():
    layer = SwiGLUMlp(mlp_dim=6)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4)), jnp.float32)
    variables = random_variables(layer, x)
    fc1, fc2 = variables["params"]["fc1"], variables["params"]["fc2"]
    assert fc1["kernel"].shape == (4, 12) and fc2["kernel"].shape == (6, 4)
    hidden = x @ fc1["kernel"] + fc1["bias"]
    gate, value = hidden[..., :6], hidden[..., 6:]
    expected = (gate * jax.nn.sigmoid(gate) * value) @ fc2["kernel"] + fc2["bias"]
    np.testing.assert_allclose(layer.apply(variables, x), expected, atol=1e-5)
    assert swiglu_hidden_size(4 * 1536) == 4096 and swiglu_hidden_size(4 * 32) == 88


# -- distillation token ----------------------------------------------------------------------


def test_distill_token_logits_average_the_two_classifiers():
    model = tiny(distill_token=True)
    variables = random_variables(model)
    params = variables["params"]
    assert params["pos_embed"]["embedding"].shape == (1, 2 + 16, 32)
    logits, inter = run(model, variables)
    tokens = inter["encoded"][0]
    head = params["head"]
    cls_logits = tokens[:, 0] @ head["classifier"]["kernel"] + head["classifier"]["bias"]
    dist_logits = tokens[:, 1] @ head["dist_classifier"]["kernel"] + head["dist_classifier"]["bias"]
    np.testing.assert_allclose(logits, (cls_logits + dist_logits) / 2, atol=1e-5)
    np.testing.assert_allclose(inter["head"]["features"][0], (tokens[:, 0] + tokens[:, 1]) / 2, atol=1e-6)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(mlp_type="geglu"), "unknown mlp_type 'geglu'.*swiglu"),
        (dict(distill_token=True, pool="gap"), "distill_token=True .*pool='tok'"),
        (dict(distill_token=True, representation_size=8), "distill_token=True needs"),
        (dict(num_registers=-1), "num_registers must be >= 0"),
        (
            dict(pool="attn_pool", pool_heads=3),
            "pool='attn_pool' needs a pooler width divisible by its heads",
        ),
        (dict(pool="attn_pool", pool_width=20, pool_heads=8), "pool_width=20, pool_heads=8"),
        (dict(pool="attn_pool", pool_queries=0), "pool_queries must be >= 1"),
        (dict(pool="attn_pool", distill_token=True), "distill_token=True .*pool='tok'"),
    ],
)
def test_bad_options_are_named(fields, message):
    with pytest.raises(ValueError, match=message) as info:
        tiny(**fields)
    assert "\n" not in str(info.value)


def test_every_option_keeps_params_fp32_and_runs_in_bf16_scanned():
    model = tiny(
        num_registers=2,
        layer_scale_init=1e-5,
        mlp_type="swiglu",
        distill_token=True,
        scan=True,
        depth=2,
        dtype=jnp.bfloat16,
    )
    variables = model.init(jax.random.key(0), IMAGES[:1])
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))
    logits = model.apply(variables, IMAGES)
    assert logits.dtype == jnp.bfloat16 and logits.shape == (2, 5)


# -- CoCa's attentional pooler ---------------------------------------------------------------


def _layer_norm(x, params, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * params["scale"] + params["bias"]


def test_attn_pool_pools_the_first_normed_query_over_tokens_without_the_final_norm():
    model = tiny(pool="attn_pool", pool_queries=3, pool_heads=4, pool_width=16)
    variables = random_variables(model)
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    pooler = params["head"]["attn_pool"]
    shapes = jax.tree_util.tree_map(np.shape, pooler)
    assert shapes["query"] == (3, 16) and shapes["norm_q"]["scale"] == (16,)
    assert shapes["norm_kv"]["scale"] == (32,) and shapes["norm_out"]["scale"] == (16,)
    assert shapes["attn"]["query"]["kernel"] == (16, 4, 4) and shapes["attn"]["key"]["kernel"] == (32, 4, 4)
    assert shapes["attn"]["out"]["kernel"] == (4, 4, 16)
    assert params["head"]["classifier"]["kernel"].shape == (16, 5)
    assert "norm" not in params["encoder"]
    # the gap model's count, less its final norm and classifier, plus the pooler and a classifier of 16
    pooler_count = 3 * 16 + 2 * 16 + 2 * 32 + (16 * 16 + 16) + 2 * (32 * 16 + 16) + (16 * 16 + 16) + 2 * 16
    expected = jaxvit.count_params(tiny(pool="gap"), 16) - 2 * 32 - (32 * 5 + 5) + pooler_count + 16 * 5 + 5
    assert jaxvit.count_params(model, 16) == expected

    logits, inter = run(model, variables)
    tokens = np.asarray(inter["encoded"][0])
    np.testing.assert_array_equal(tokens, inter["encoder"]["block_0"]["out"][0])
    attn = pooler["attn"]
    q = np.einsum("qe,ehd->qhd", _layer_norm(pooler["query"], pooler["norm_q"]), attn["query"]["kernel"])
    context = _layer_norm(tokens, pooler["norm_kv"])
    k, v = (
        np.einsum("nte,ehd->nthd", context, attn[n]["kernel"]) + attn[n]["bias"] for n in ("key", "value")
    )
    weights = jax.nn.softmax(np.einsum("qhd,nthd->nhqt", q + attn["query"]["bias"], k) / 2.0, axis=-1)
    y = np.einsum("nhqt,nthd,hde->nqe", weights, v, attn["out"]["kernel"]) + attn["out"]["bias"]
    features = _layer_norm(y, pooler["norm_out"])[:, 0]
    np.testing.assert_allclose(inter["head"]["features"][0], features, atol=1e-5)
    classifier = params["head"]["classifier"]
    np.testing.assert_allclose(logits, features @ classifier["kernel"] + classifier["bias"], atol=1e-5)


def test_attn_pool_fields_count_only_with_that_pool():
    from jaxvit import schema
    from jaxvit.summary import formula_flops, xla_flops

    pooler = {"pool_queries": 4, "pool_width": 16}
    assert not set(pooler) & set(schema.differs_from_default(tiny(**pooler)))
    assert set(pooler) <= set(schema.differs_from_default(tiny(pool="attn_pool", **pooler)))
    alone = tiny(pool="attn_pool", class_token=False, num_classes=0)
    out = jax.eval_shape(lambda x: alone.apply(alone.init(jax.random.key(0), x), x), IMAGES)
    assert out.shape == (2, 32)  # the pooler's heads and width are the model's
    # the sizes of the plain model's bound (tests/test_summary.py): XLA adds only elementwise work
    model = tiny(
        width=64, depth=2, mlp_dim=128, pool="attn_pool", pool_queries=8, pool_width=48, pool_heads=4
    )
    formula = sum(formula_flops(model, 32).values())
    assert formula <= xla_flops(model, 32) <= 1.05 * formula
    with pytest.raises(ValueError, match="pool='attn_pool' .* has no final LayerNorm"):
        jaxvit.intermediate_features(model, {}, IMAGES, layers=1)  # refused before the params are read


# -- variants --------------------------------------------------------------------------------


def test_family_variants_keep_dinov2_giant_apart_from_big_vision_g():
    giant = jaxvit.decode_variant("dinov2:g/14")
    assert giant == dict(
        width=1536,
        depth=40,
        mlp_dim=4096,
        num_heads=24,
        mlp_type="swiglu",
        patch_size=14,
        layer_scale_init=1e-5,
    )
    assert jaxvit.decode_variant("g/14")["width"] == 1408
    assert jaxvit.decode_variant("dinov2-reg4:S")["num_registers"] == 4
    assert jaxvit.decode_variant("deit-distilled:Ti")["distill_token"] is True
    assert jaxvit.decode_variant("deit3:B/16")["layer_scale_init"] == 1e-6
    assert jaxvit.decode_variant("dinov3:B")["posemb"] == "rope"
    with pytest.raises(ValueError, match="family:size must be one of.*dinov2"):
        jaxvit.decode_variant("dinov2:Ti/14")
    # the counts in the README's table
    assert jaxvit.count_params(jaxvit.create_model("dinov2:S/14", num_classes=0), 518) == 22_056_192
    assert jaxvit.count_params(jaxvit.create_model("deit-distilled:Ti/16"), 224) == 5_910_800


# -- dense features --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_dinov2_reg():
    peer = timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        num_classes=0,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=2,
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return peer.eval()


@pytest.mark.parametrize("layers, norm", [(2, True), ([0, -1], False)])
@pytest.mark.parametrize("scan", [False, True])
def test_intermediate_features_equal_timm_forward_intermediates(
    tmp_path, timm_dinov2_reg, layers, norm, scan
):
    from safetensors.torch import save_file

    save_file(timm_dinov2_reg.state_dict(), tmp_path / "reg.safetensors")
    bundle = jaxvit.load_for_inference(tmp_path / "reg.safetensors", num_heads=2, scan=scan)
    x = np.array(IMAGES)  # writable, for torch.from_numpy
    with torch.no_grad():
        expected = timm_dinov2_reg.forward_intermediates(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), indices=layers, norm=norm, intermediates_only=True
        )
    got = jaxvit.intermediate_features(
        bundle.model, {"params": bundle.params}, IMAGES, layers=layers, norm=norm
    )
    assert len(got) == len(expected) == 2
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.shape == (2, 4, 4, 32)
        np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), atol=2e-5)
    pairs = jaxvit.intermediate_features(
        bundle.model, {"params": bundle.params}, IMAGES, layers=[-1], return_prefix_tokens=True
    )
    assert pairs[0][1].shape == (2, 1 + 4, 32)
    with pytest.raises(ValueError, match="block index 3 is out of range for depth=3"):
        jaxvit.intermediate_features(bundle.model, {"params": bundle.params}, IMAGES, layers=[3])


# -- rotary position embedding ---------------------------------------------------------------


@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_rope_tables_equal_transformers_dinov3(grid):
    from transformers import DINOv3ViTConfig
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

    config = DINOv3ViTConfig(hidden_size=64, num_attention_heads=2, patch_size=4, rope_theta=50.0)
    rope = DINOv3ViTRopePositionEmbedding(config).eval()
    with torch.no_grad():
        cos, sin = rope(torch.zeros(1, 3, 4 * grid[0], 4 * grid[1]))
    ours = jaxvit.model.rope_2d_tables(grid, 32, 50.0)
    np.testing.assert_allclose(ours[0], cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours[1], sin.numpy(), atol=1e-6)


def test_a_key_bias_is_invisible_without_rope_and_visible_with_it():
    """Why a loaded DINOv3 gets a zero key bias (exact) rather than any constant: rotation breaks the invariance."""
    outputs = {}
    for posemb in ("learn", "rope"):
        model = tiny(posemb=posemb, num_classes=0)
        variables = random_variables(model)
        qkv = variables["params"]["encoder"]["block_0"]["attn"]["qkv"]
        base = run(model, variables)[0]
        qkv["bias"] = qkv["bias"].at[32:64].add(1.0)  # the key's part
        outputs[posemb] = float(jnp.max(jnp.abs(run(model, variables)[0] - base)))
    assert outputs["learn"] < 1e-5 < 1e-2 < outputs["rope"], outputs


def test_rope_and_none_have_no_position_table_and_rope_needs_head_dim_by_4():
    for posemb in ("rope", "none"):
        params = tiny(posemb=posemb, num_registers=1).init(jax.random.key(0), IMAGES[:1])["params"]
        assert "pos_embed" not in params
    with pytest.raises(ValueError, match="posemb='rope' needs a head dimension divisible by 4, got 6"):
        tiny(posemb="rope", width=36, num_heads=6)


def test_formula_flops_count_every_prefix_token_and_both_swiglu_halves():
    from jaxvit.summary import formula_flops, xla_flops

    # the bound of the plain model's test (tests/test_summary.py): XLA adds only elementwise work
    model = jaxvit.create_model(
        None,
        num_classes=5,
        width=64,
        depth=2,
        num_heads=2,
        mlp_dim=128,
        patch_size=4,
        num_registers=2,
        distill_token=True,
        mlp_type="swiglu",
    )
    formula = sum(formula_flops(model, 32).values())
    assert formula <= xla_flops(model, 32) <= 1.05 * formula


def test_attention_maps_leave_registers_and_the_distillation_token_off_the_grid():
    from jaxvit.visualize import attention_maps_for_image

    model = tiny(num_registers=2, distill_token=True)
    image = np.random.default_rng(0).uniform(size=(16, 16, 3)).astype(np.float32)
    maps = attention_maps_for_image(model, random_variables(model)["params"], image)
    assert maps["rollout"].shape == (4, 4) and maps["head_maps"].shape == (2, 4, 4)
