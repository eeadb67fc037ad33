"""Tests of the model summary: parameters per module, FLOPs by formula and by XLA, the CLI."""

import json
import re

import pytest

import jaxvit
from jaxvit import summary as sm

SMALL = dict(width=128, depth=2, mlp_dim=512, num_heads=4, patch_size=4)


def small(**overrides):
    return jaxvit.create_model(None, **{"num_classes": 10, **SMALL, **overrides})


# -- parameters -----------------------------------------------------------------


def test_b16_rows_and_total():
    summary = sm.summarize(jaxvit.create_model("B/16"), 224, xla=False)
    names = [name for name, _, _ in summary.modules]
    blocks = [f"encoder/block_{i}" for i in range(12)]
    assert names == ["patch_embed", "cls_token", "pos_embed", *blocks, "encoder/norm", "head/classifier"]
    counts = {name: params for name, params, _ in summary.modules}
    d, m = 768, 3072
    # qkv + out + fc1 + fc2 + two LayerNorms, each with its bias.
    assert counts["encoder/block_7"] == (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + 4 * d
    assert counts["patch_embed"] == 16 * 16 * 3 * d + d
    assert counts["pos_embed"] == 197 * d
    assert counts["head/classifier"] == d * 1000 + 1000
    assert summary.total_params == 86_567_656 == jaxvit.count_params(jaxvit.create_model("B/16"))
    assert summary.tokens == 197


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(pool="gap", class_token=False, posemb="sincos2d"),
        dict(pool="map", class_token=False, representation_size=64),
        dict(scan=True, num_classes=0),
        dict(depth=12),  # block_10 and block_11 sort after block_9
    ],
)
def test_module_params_sum_to_count_params(overrides):
    model = small(**overrides)
    rows = sm.module_params(sm.param_shapes(model, (32, 48)))
    assert sum(count for _, count in rows) == jaxvit.count_params(model, (32, 48))
    names = [name for name, _ in rows]
    assert names[0] == "patch_embed" and len(set(names)) == len(names)
    if model.scan:
        assert "encoder/blocks" in names and "encoder/block_0" not in names
    else:
        assert [n for n in names if n.startswith("encoder/block_")] == [
            f"encoder/block_{i}" for i in range(model.depth)
        ]


# -- FLOPs by formula ---------------------------------------------------------


def test_b16_formula_matches_hand_computation():
    t, d, m, classes = 197, 768, 3072, 1000
    per_block_macs = (
        t * d * 3 * d  # qkv
        + t * t * d  # q k^T over all heads
        + t * t * d  # weights @ v
        + t * d * d  # output projection
        + t * d * m  # fc1
        + t * m * d  # fc2
    )
    macs = 196 * (16 * 16 * 3) * d + 12 * per_block_macs + d * classes
    flops = sm.formula_flops(jaxvit.create_model("B/16"), 224)
    assert sum(flops.values()) == 2 * macs
    assert flops["encoder/block_0"] == 2 * per_block_macs
    # The published "17.6 GFLOPs" of ViT-B/16 at 224 counts multiply-adds.
    assert macs == pytest.approx(17.56e9, rel=1e-3)
    assert sum(flops.values()) == pytest.approx(35.13e9, rel=1e-3)


def test_formula_scales_with_image_size_and_variants():
    b16 = jaxvit.create_model("B/16")
    at_384 = sum(sm.formula_flops(b16, 384).values())
    assert at_384 == pytest.approx(2 * 55.5e9, rel=1e-2)  # the published 55.5 G multiply-adds at 384
    s16 = sum(sm.formula_flops(jaxvit.create_model("S/16"), 224).values())
    assert s16 == pytest.approx(2 * 4.6e9, rel=1e-2)


def test_formula_map_head_and_no_class_token():
    model = small(pool="map", class_token=False, representation_size=64)
    flops = sm.formula_flops(model, 32)
    t, d, m = 64, 128, 512  # no class token: 8x8 patches
    assert flops["head/map"] == 2 * (2 * d * d + 2 * t * d * d + 2 * t * d + 2 * d * m)
    assert flops["head/pre_logits"] == 2 * d * 64
    assert flops["head/classifier"] == 2 * 64 * 10
    assert flops["encoder/block_1"] == 2 * (4 * t * d * d + 2 * t * t * d + 2 * t * d * m)


# -- FLOPs by XLA -------------------------------------------------------------


def test_xla_agrees_with_formula_for_a_small_model():
    # tanh GELU: the exact one expands erf into a polynomial that adds ~10% at this width.
    model = small(gelu_approximate=True)
    formula = sum(sm.formula_flops(model, 32).values())
    xla = sm.xla_flops(model, 32)
    assert formula <= xla <= 1.05 * formula  # XLA adds the elementwise work on top


def test_xla_agrees_with_formula_for_b16():
    model = jaxvit.create_model("B/16")
    assert sm.xla_flops(model, 224) == pytest.approx(sum(sm.formula_flops(model, 224).values()), rel=0.03)


def test_xla_counts_every_layer_of_a_scanned_model():
    scanned, unrolled = small(scan=True, depth=3), small(depth=3)
    assert sm.xla_flops(scanned, 32) == pytest.approx(sm.xla_flops(unrolled, 32), rel=1e-3)


# -- CLI ----------------------------------------------------------------------


def test_cli_json_parses(capsys):
    assert sm.main(["B/16", "--image-size", "384", "--num-classes", "10", "--json", "--no-xla"]) == 0
    data = json.loads(capsys.readouterr().out)
    model = jaxvit.create_model("B/16", num_classes=10)
    assert data["total_params"] == jaxvit.count_params(model, 384)
    assert data["tokens"] == 24 * 24 + 1 and data["image_size"] == [384, 384]
    assert data["formula_flops"] == sum(sm.formula_flops(model, 384).values())
    assert data["formula_multiply_adds"] * 2 == data["formula_flops"]
    assert data["xla_flops"] is None and data["model"]["num_classes"] == 10
    assert sum(row["params"] for row in data["modules"]) == data["total_params"]


def test_cli_overrides_and_table(capsys):
    argv = ["Ti/16", "--image-size", "32x64", "--pool", "gap", "--class-token=false", "--patch-size", "8x16"]
    assert sm.main([*argv, "--num-classes", "5"]) == 0
    out = capsys.readouterr().out
    model = jaxvit.create_model("Ti/16", num_classes=5, pool="gap", class_token=False, patch_size=(8, 16))
    assert f"{jaxvit.count_params(model, (32, 64)):,}" in out
    assert "cls_token" not in out and "16 tokens" in out
    assert "formula (2*m*n*k" in out and "XLA cost analysis" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["B/16", "--poool", "gap"], "unknown option '--poool'.*pool"),
        (["B/16", "--pool"], "--pool needs a value"),
        (["Q/16"], "unknown variant"),
        (["B/16", "--image-size", "200", "--no-xla"], "not divisible by the patch"),
        (["B/16", "--image-size", "2x2x2"], "image size '2x2x2'"),
    ],
)
def test_cli_errors(capsys, argv, match):
    assert sm.main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
