"""Tests of attention rollout, the attention picture and the training curves."""

import json

import chex
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from PIL import Image

import jaxvit
from jaxvit import visualize as vz


def random_weights(depth=3, n=2, heads=4, tokens=7, seed=0):
    logits = jax.random.normal(jax.random.key(seed), (depth, n, heads, tokens, tokens)) * 2.0
    return jax.nn.softmax(logits, axis=-1)


def reference_rollout(weights):
    """The paper's recipe written out with numpy, one example and one layer at a time."""
    weights = np.asarray(weights, np.float64)
    depth, n, _, t, _ = weights.shape
    out = np.zeros((n, t, t))
    for i in range(n):
        result = np.eye(t)
        for layer in range(depth):
            a = weights[layer, i].mean(axis=0) + np.eye(t)
            a = a / a.sum(axis=1, keepdims=True)
            result = a @ result  # later layers multiply from the left
        out[i] = result
    return out


# -- attention_rollout --------------------------------------------------------


def test_rollout_matches_reference_and_rows_sum_to_one():
    weights = random_weights()
    rollout = vz.attention_rollout(weights, num_prefix_tokens=1)
    chex.assert_shape(rollout, (2, 7, 7))
    np.testing.assert_allclose(rollout, reference_rollout(weights), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, rtol=1e-5)


def test_rollout_layer_order_matters():
    # Reversing the layers changes a product of non-commuting matrices: the order is really tested.
    weights = random_weights()
    forward = vz.attention_rollout(weights)
    backward = vz.attention_rollout(weights[::-1])
    assert float(jnp.abs(forward - backward).max()) > 1e-3


@pytest.mark.parametrize("discard_ratio", [0.0, 0.5])
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rows_sum_to_one_for_every_fusion_and_discard(fusion, discard_ratio):
    rollout = vz.attention_rollout(random_weights(seed=3), 1, head_fusion=fusion, discard_ratio=discard_ratio)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, rtol=1e-5)
    assert float(rollout.min()) >= 0.0


def test_discard_drops_weakest_patch_columns_but_never_the_class_token():
    # One layer, one head: row weights known; discard half of the 4 patch columns.
    row = jnp.array([0.01, 0.4, 0.05, 0.5, 0.04])  # class token column is the weakest
    weights = jnp.broadcast_to(row, (1, 1, 1, 5, 5))
    rollout = vz.attention_rollout(weights, 1, discard_ratio=0.5, add_residual=False)
    kept = np.array([0.01, 0.4, 0.0, 0.5, 0.0])
    np.testing.assert_allclose(rollout[0, 0], kept / kept.sum(), rtol=1e-6)


def test_identity_attention_gives_identity_rollout():
    weights = jnp.broadcast_to(jnp.eye(5), (4, 2, 3, 5, 5))
    np.testing.assert_allclose(
        vz.attention_rollout(weights), np.broadcast_to(np.eye(5), (2, 5, 5)), atol=1e-7
    )


def test_uniform_attention_gives_uniform_map():
    t, grid = 1 + 6, (2, 3)
    weights = jnp.full((3, 1, 2, t, t), 1.0 / t)
    rollout = vz.attention_rollout(weights, 1)
    for pool in ("tok", "gap"):
        heat = vz.rollout_map(rollout, grid, 1, pool)
        chex.assert_shape(heat, (1, 2, 3))
        np.testing.assert_allclose(heat, heat[0, 0, 0], rtol=1e-6)
    # The exact value: row 0, column 1 of ((U + I) / 2)^3 with U the uniform matrix.
    a = 0.5 * (np.full((t, t), 1.0 / t) + np.eye(t))
    expected = np.linalg.matrix_power(a, 3)[0, 1]
    np.testing.assert_allclose(vz.rollout_map(rollout, grid, 1, "tok")[0, 0, 0], expected, rtol=1e-6)


def one_patch_weights(depth, target, tokens, n=1, heads=2):
    """Every query attends only to token ``target``."""
    weights = np.zeros((depth, n, heads, tokens, tokens), np.float32)
    weights[..., target] = 1.0
    return jnp.asarray(weights)


def test_one_attended_patch_gives_known_maps():
    depth, grid, prefix = 3, (2, 2), 1
    target = prefix + 2  # patch (1, 0)
    rollout = vz.attention_rollout(one_patch_weights(depth, target, prefix + 4), prefix)
    # A = (I + 1 e_k^T) / 2, so A^L = 2^-L I + (1 - 2^-L) 1 e_k^T off row k.
    tok = vz.rollout_map(rollout, grid, prefix, "tok")[0]
    np.testing.assert_allclose(tok, [[0.0, 0.0], [1.0 - 0.5**depth, 0.0]], atol=1e-7)
    gap = vz.rollout_map(rollout, grid, prefix, "gap")[0]
    s = 4
    on = (s - 1) / s * (1 - 0.5**depth) + 1 / s
    off = 0.5**depth / s
    np.testing.assert_allclose(gap, [[off, off], [on, off]], rtol=1e-6)


def test_rollout_map_without_class_token_and_nonsquare_grid():
    grid = (3, 5)
    weights = random_weights(depth=2, n=3, tokens=15)
    rollout = vz.attention_rollout(weights, 0)
    heat = vz.rollout_map(rollout, grid, 0, "gap")
    chex.assert_shape(heat, (3, 3, 5))
    # Row-major (h w) order: entry (r, c) is the mean over rows of column r * 5 + c.
    np.testing.assert_allclose(heat[1, 2, 4], rollout[1, :, 2 * 5 + 4].mean(), rtol=1e-6)
    np.testing.assert_allclose(heat.sum((1, 2)), 1.0, rtol=1e-5)  # no prefix: all mass on patches


def test_rollout_map_of_per_head_weights():
    weights = random_weights(depth=1, n=2, heads=3, tokens=1 + 6)[-1]
    maps = vz.rollout_map(weights, (2, 3), 1, "tok")
    chex.assert_shape(maps, (2, 3, 2, 3))
    np.testing.assert_allclose(maps[1, 2], weights[1, 2, 0, 1:].reshape(2, 3))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: vz.attention_rollout(jnp.zeros((2, 1, 1, 4, 5))), "depth, N, heads, T, T"),
        (lambda: vz.attention_rollout(jnp.zeros((0, 1, 1, 4, 4))), "depth 0"),
        (lambda: vz.attention_rollout(random_weights(), head_fusion="sum"), "'sum'.*mean"),
        (lambda: vz.attention_rollout(random_weights(), 7), r"num_prefix_tokens must be in \[0, 7\)"),
        (lambda: vz.attention_rollout(random_weights(), discard_ratio=1.0), "discard_ratio"),
        (lambda: vz.rollout_map(jnp.zeros((1, 7, 7)), (2, 2), 1), "7 tokens do not match grid"),
        (lambda: vz.rollout_map(jnp.zeros((1, 4, 4)), (2, 2), 0, "tok"), "class token"),
        (lambda: vz.rollout_map(jnp.zeros((1, 5, 5)), (2, 2), 1, "cls"), "'cls'.*tok"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- through a real tiny model whose attention is set by hand ---------------


WIDTH, HEADS, DEPTH = 32, 4, 2
HEAD_DIM = WIDTH // HEADS


def rigged_model(image_hw, target):
    """A tiny model whose every query attends to token ``target`` only: ``(model, params)``.

    Zero patch embedding, so tokens are the position embedding; attention
    output and MLP output are zero, so tokens never change. Each head's query
    is a large constant whose direction matches only the target's key.
    """
    model = jaxvit.create_model(
        None, num_classes=3, width=WIDTH, depth=DEPTH, mlp_dim=64, num_heads=HEADS, patch_size=4
    )
    images = jnp.zeros((1, *image_hw, 3))
    params = jax.tree_util.tree_map(jnp.zeros_like, model.init(jax.random.key(0), images)["params"])
    tokens = params["pos_embed"]["embedding"].shape[1]
    hot, cold = np.zeros(WIDTH, np.float32), np.zeros(WIDTH, np.float32)
    for h in range(HEADS):
        hot[h * HEAD_DIM], hot[h * HEAD_DIM + 1] = 1.0, -1.0
        cold[h * HEAD_DIM + 2], cold[h * HEAD_DIM + 3] = 1.0, -1.0
    pos = np.tile(cold, (1, tokens, 1))
    pos[0, target] = hot
    params["pos_embed"]["embedding"] = jnp.asarray(pos)
    for i in range(DEPTH):
        block = params["encoder"][f"block_{i}"]
        for norm in ("norm1", "norm2"):
            block[norm]["scale"] = jnp.ones(WIDTH)
        kernel = np.zeros((WIDTH, 3 * WIDTH), np.float32)
        kernel[:, WIDTH : 2 * WIDTH] = np.eye(WIDTH)  # keys = normalised tokens
        bias = np.zeros(3 * WIDTH, np.float32)
        bias[:WIDTH] = 100.0 * hot  # the same query everywhere
        block["attn"]["qkv"] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
    return model, params


@pytest.fixture(scope="module")
def rigged():
    target = 1 + 4  # patch (1, 1) of the 2x3 grid
    model, params = rigged_model((8, 12), target)
    return model, params, jnp.zeros((1, 8, 12, 3)), target


def test_rigged_model_attends_to_one_patch(rigged):
    model, params, images, target = rigged
    weights = jaxvit.attention_weights(model, {"params": params}, images)
    chex.assert_shape(weights, (DEPTH, 1, HEADS, 7, 7))
    np.testing.assert_allclose(weights, one_patch_weights(DEPTH, target, 7, heads=HEADS), atol=1e-6)
    maps = vz.attention_maps_for_image(model, params, np.zeros((8, 12, 3), np.float32))
    expected = np.zeros((2, 3))
    expected[1, 1] = 1.0 - 0.5**DEPTH
    np.testing.assert_allclose(maps["rollout"], expected, atol=1e-6)
    np.testing.assert_allclose(maps["head_maps"], np.broadcast_to(expected > 0, (HEADS, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(maps["probs"], np.full(3, 1 / 3), rtol=1e-6)  # zero head


def test_real_model_rows_sum_to_one_without_class_token():
    model = jaxvit.create_model(
        None,
        num_classes=0,
        width=16,
        depth=2,
        mlp_dim=32,
        num_heads=2,
        patch_size=4,
        pool="gap",
        class_token=False,
    )
    images = jax.random.normal(jax.random.key(1), (2, 8, 16, 3))
    variables = model.init(jax.random.key(2), images)
    rollout = vz.attention_rollout(jaxvit.attention_weights(model, variables, images), 0)
    chex.assert_shape(rollout, (2, 8, 8))
    np.testing.assert_allclose(rollout.sum(-1), 1.0, rtol=1e-5)
    chex.assert_shape(vz.rollout_map(rollout, (2, 4), 0, "gap"), (2, 2, 4))


# -- pictures -----------------------------------------------------------------


def test_overlay_colours_the_hot_patch():
    image = np.full((8, 12), 0.5, np.float32)
    heat = np.zeros((2, 3), np.float32)
    heat[1, 2] = 3.0
    out = vz.overlay(image, heat, alpha=1.0, cmap="viridis")
    chex.assert_shape(out, (8, 12, 3))
    cmap = matplotlib.colormaps["viridis"]
    hot = np.round(np.array(cmap(1.0)[:3]) * 255)
    cold = np.round(np.array(cmap(0.0)[:3]) * 255)
    np.testing.assert_allclose(out[4:, 8:].reshape(-1, 3), np.broadcast_to(hot, (16, 3)), atol=1)
    np.testing.assert_allclose(out[:4].reshape(-1, 3), np.broadcast_to(cold, (48, 3)), atol=1)
    with pytest.raises(ValueError, match="not a multiple of the map's grid"):
        vz.overlay(np.zeros((8, 10)), heat)


@pytest.mark.parametrize("heads, size", [(None, (2 * 192 + 3 * 4, 192 + 16 + 2 * 4)), (4, (788, 428))])
def test_attention_png_has_expected_size(tmp_path, heads, size):
    image = np.random.default_rng(0).random((16, 16, 3), np.float32)
    heat = np.arange(16, dtype=np.float32).reshape(4, 4)
    head_maps = None if heads is None else np.random.default_rng(1).random((heads, 4, 4), np.float32)
    figure = vz.attention_figure(image, heat, head_maps)
    assert figure.size == size == vz.attention_figure_size((16, 16), (4, 4), 2 + (heads or 0))
    path = tmp_path / "attention.png"
    figure.save(path)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == size


def test_nonsquare_image_panel():
    # 8x12 image, 2x3 grid, panel 192 -> scale 16 -> 128x192 panels.
    figure = vz.attention_figure(np.zeros((8, 12)), np.ones((2, 3)))
    assert figure.size == (2 * 192 + 3 * 4, 128 + 16 + 2 * 4)


# -- training curves ----------------------------------------------------------


def write_metrics(path, truncated=False):
    lines = []
    for step in range(1, 41):
        lines.append(
            {
                "step": step,
                "train/loss": 2.3 / step,
                "train/accuracy": 1 - 1 / step,
                "learning_rate": 1e-3 * min(1, step / 10),
                "images_per_sec": 100.0,
            }
        )
        if step % 10 == 0:
            lines.append({"step": step, "eval/loss": 2.0 / step, "eval/top1": 0.5, "eval/top5": 0.9})
    lines.append({"step": 41, "train/loss": 0.05})  # missing keys
    text = "\n".join(json.dumps(r) for r in lines) + "\n"
    if truncated:
        text += '{"step": 42, "train/lo'
    path.write_text(text)
    return lines


def test_read_metrics_skips_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = write_metrics(path, truncated=True)
    records = vz.read_metrics(path)
    assert records == lines
    steps, values = vz.metric_series(records, "eval/top1")
    np.testing.assert_array_equal(steps, [10, 20, 30, 40])
    steps, values = vz.metric_series(records, "train/loss")
    assert len(steps) == 41 and values[-1] == 0.05


def test_plot_curves_writes_png_of_expected_size(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", truncated=True)
    out = vz.plot_curves(tmp_path, tmp_path / "out" / "curves.png")
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.size == (1200, 360) == tuple(round(x * vz.CURVES_DPI) for x in vz.CURVES_FIGSIZE)


def test_curves_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        vz.plot_curves(tmp_path, tmp_path / "c.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "train/loss": 1.0}\n{oops\n{"step": 2, "train/loss": 0.5}\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        vz.read_metrics(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"step": 1, "other": 3}\n\n')
    with pytest.raises(ValueError, match="none of .*train/loss"):
        vz.plot_curves(empty, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_load_image_resizes_and_crops(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 10:30] = 255  # a white band in the middle half
    Image.fromarray(pixels).save(tmp_path / "band.png")
    whole = vz.load_image(tmp_path / "band.png", (10, 20))
    chex.assert_shape(whole, (10, 20, 3))
    np.testing.assert_allclose(whole[:, [0, 19]], 0.0)
    np.testing.assert_allclose(whole[:, 7:13], 1.0)
    # crop_pct 0.5: resize so 20x40 covers 8/0.5 x 8/0.5, i.e. to 16x32, then keep the central 8x8.
    cropped = vz.load_image(tmp_path / "band.png", (8, 8), 1, crop_pct=0.5, interpolation="bicubic")
    chex.assert_shape(cropped, (8, 8, 1))
    np.testing.assert_allclose(cropped, 1.0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        vz.load_image(tmp_path / "missing.png", (8, 8))
    with pytest.raises(ValueError, match="interpolation 'cubic'"):
        vz.load_image(tmp_path / "band.png", (8, 8), interpolation="cubic")


def test_attention_cli_end_to_end(tmp_path, capsys):
    """Export a rigged model, run the command, and find the attended patch in the picture."""
    target = 1 + 2 * 4 + 3  # patch (2, 3) of the 4x4 grid
    model, params = rigged_model((16, 16), target)
    checkpoint = jaxvit.export(params, tmp_path / "rigged.npz", format="npz", model=model)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "black.png")
    out = tmp_path / "pics" / "attention.png"
    argv = ["attention", str(tmp_path / "black.png"), "--checkpoint", str(checkpoint), "--out", str(out)]
    assert vz.main([*argv, "--head-maps"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as png:
        assert png.size == vz.attention_figure_size((16, 16), (4, 4), 2 + HEADS) == (788, 428)
        pixels = np.asarray(png.convert("RGB"), np.float32)
    # Panel 1 (the rollout) starts right of panel 0; patches are 192 / 4 = 48 pixels.
    x0, y0 = 4 + 192 + 4, 4 + 16
    panel = pixels[y0 : y0 + 192, x0 : x0 + 192].reshape(4, 48, 4, 48, 3)
    cmap = matplotlib.colormaps["inferno"]
    hot, cold = (0.6 * np.array(cmap(v)[:3]) * 255 for v in (1.0, 0.0))  # over a black image
    np.testing.assert_allclose(panel[2, :, 3], np.broadcast_to(hot, (48, 48, 3)), atol=1)
    np.testing.assert_allclose(panel[0, :, 0], np.broadcast_to(cold, (48, 48, 3)), atol=1)

    assert vz.main([*argv[:-1], str(tmp_path / "small.png")]) == 0
    with Image.open(tmp_path / "small.png") as png:
        assert png.size == vz.attention_figure_size((16, 16), (4, 4), 2)
    assert vz.main(["attention", "nope.png", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "image nope.png does not exist" in capsys.readouterr().err


def test_curves_cli(tmp_path, capsys):
    write_metrics(tmp_path / "metrics.jsonl")
    out = tmp_path / "curves.png"
    assert vz.main(["curves", str(tmp_path), "--out", str(out)]) == 0
    with Image.open(out) as png:
        assert png.size == (1200, 360)
    assert vz.main(["curves", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no metrics file" in capsys.readouterr().err
