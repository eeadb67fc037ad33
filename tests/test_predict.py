"""Tests of the predict command and inference bundles, on real image files and exported tiny checkpoints."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxvit
from jaxvit import predict
from jaxvit.data import preprocess

NUM_CLASSES = 7
LABELS = [f"kind {i}" for i in range(NUM_CLASSES)]


def random_params(model, size, seed=0):
    images = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model exported as .npz, timm and HF, a labels file, and a folder of PNG/JPEG images."""
    root = tmp_path_factory.mktemp("predict")
    model = jaxvit.create_model(
        None, num_classes=NUM_CLASSES, width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4
    )
    params = random_params(model, (16, 16))
    paths = {
        "npz": jaxvit.export(params, root / "tiny.npz", "npz", model=model),
        "timm": jaxvit.export(params, root / "tiny.safetensors", "timm", model=model),
        "hf": jaxvit.export(params, root / "hf", "hf", model=model, labels=LABELS),
    }
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / "a_rgb.png")
    Image.fromarray(rng.integers(0, 256, (30, 18), dtype=np.uint8), mode="L").save(images / "b_gray.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), mode="RGBA").save(
        images / "c_rgba.png"
    )
    Image.fromarray(rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)).save(images / "d.jpg", quality=95)
    (images / "notes.txt").write_text("not an image")  # skipped: not an image extension
    return model, params, paths, root


def expected_probs(model, params, path, mean, std, crop_pct, interpolation):
    """Independent preprocessing with PIL and NumPy, then a softmax of model.apply."""
    image = Image.open(path).convert("RGB")
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[interpolation]
    if crop_pct == 1.0:
        image = image.resize((16, 16), resample)
    else:
        short = round(16 / crop_pct)
        scale = short / min(image.size)
        image = image.resize(
            (max(16, round(image.width * scale)), max(16, round(image.height * scale))), resample
        )
        left, top = (image.width - 16) // 2, (image.height - 16) // 2
        image = image.crop((left, top, left + 16, top + 16))
    x = (np.asarray(image, np.float32) / 255.0 - np.asarray(mean)) / np.asarray(std)
    logits = model.apply({"params": params}, jnp.asarray(x[None], jnp.float32))
    return np.asarray(jax.nn.softmax(logits, axis=-1))[0]


@pytest.mark.parametrize(
    "origin, mean, std, crop_pct, interpolation",
    [
        ("npz", (0.5,) * 3, (0.5,) * 3, 1.0, "bilinear"),
        ("timm", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, "bicubic"),
    ],
)
def test_main_json_matches_direct_softmax(setup, capsys, origin, mean, std, crop_pct, interpolation):
    model, params, paths, root = setup
    argv = ["--checkpoint", str(paths[origin]), "--labels", str(root / "labels.txt"), "--json"]
    assert predict.main([*argv, "--batch-size", "3", str(root / "images")]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"].rsplit("/", 1)[-1] for r in results] == [
        "a_rgb.png",
        "b_gray.png",
        "c_rgba.png",
        "d.jpg",
    ]
    for r in results:
        probs = expected_probs(model, params, r["image"], mean, std, crop_pct, interpolation)
        order = np.argsort(-probs)[:5]
        assert [t["class"] for t in r["top_k"]] == order.tolist()
        np.testing.assert_allclose([t["probability"] for t in r["top_k"]], probs[order], atol=1e-5)
        assert [t["label"] for t in r["top_k"]] == [LABELS[i] for i in order]


def test_bundles_say_how_to_preprocess(setup):
    _, _, paths, _ = setup
    vt = jaxvit.load_for_inference(paths["npz"])
    assert (vt.origin, vt.image_size, vt.mean, vt.crop_pct, vt.labels) == (
        "vt",
        (16, 16),
        (0.5,) * 3,
        1.0,
        None,
    )
    assert (vt.model.width, vt.model.depth, vt.model.num_heads, vt.model.num_classes) == (
        32,
        2,
        4,
        NUM_CLASSES,
    )
    timm = jaxvit.load_for_inference(paths["timm"])
    assert (timm.origin, timm.mean, timm.crop_pct, timm.model.num_heads) == (
        "timm",
        (0.485, 0.456, 0.406),
        0.875,
        4,
    )
    hf = jaxvit.load_for_inference(paths["hf"])
    assert (hf.origin, hf.labels, hf.model.layer_norm_eps) == ("hf", tuple(LABELS), 1e-6)
    bigger = jaxvit.load_for_inference(paths["npz"], image_size=24)
    assert bigger.image_size == (24, 24) and bigger.params["pos_embed"]["embedding"].shape == (1, 37, 32)


def test_hf_labels_and_text_output(setup, capsys):
    _, _, paths, root = setup
    assert (
        predict.main(["--checkpoint", str(paths["hf"]), "--top-k", "3", str(root / "images" / "d.jpg")]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("d.jpg") and len(lines) == 4
    probs = [float(line.split()[0]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and all(
        line.split("  ")[2].startswith("kind ") for line in lines[1:]
    )


def test_corrupt_image_names_the_file(setup, capsys, tmp_path):
    _, _, paths, _ = setup
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert predict.main(["--checkpoint", str(paths["npz"]), str(tmp_path / "broken.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        preprocess.load_image(tmp_path / "broken.png")


def test_labels_file_of_wrong_length(setup, capsys, tmp_path):
    _, _, paths, root = setup
    (tmp_path / "labels.txt").write_text("one\ntwo\n")
    argv = ["--checkpoint", str(paths["npz"]), "--labels", str(tmp_path / "labels.txt"), str(root / "images")]
    assert predict.main(argv) == 2
    assert "has 2 labels but the model has 7 classes" in capsys.readouterr().err


def test_resize_and_crop_shapes():
    image = Image.fromarray(np.zeros((40, 60, 3), np.uint8))
    assert preprocess.resize_and_crop(image, (32, 48)).size == (48, 32)
    cropped = preprocess.resize_and_crop(image, (16, 16), crop_pct=0.875, interpolation="bicubic")
    assert cropped.size == (16, 16)
    x = preprocess.normalize(np.full((2, 2, 3), 255, np.uint8), (0.5,) * 3, (0.5,) * 3)
    np.testing.assert_array_equal(x, np.ones((2, 2, 3), np.float32))


def test_command_line_subprocess(setup):
    _, _, paths, root = setup
    cmd = [sys.executable, "-m", "jaxvit.predict", "--checkpoint", str(paths["npz"]), "--json"]
    cmd += ["--labels", str(root / "labels.txt"), str(root / "images" / "a_rgb.png")]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert len(result["top_k"]) == 5 and result["top_k"][0]["label"] in LABELS
    assert abs(sum(t["probability"] for t in result["top_k"])) <= 1.0 + 1e-6
