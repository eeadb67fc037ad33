"""Bad inputs across the public surface: configs, workdirs and checkpoints, image files,
model inputs. Each must give a clear error naming the value, or the documented handling.

Property tests generate shapes, names and config values and compare against an
independent list of the rules (which of them a case breaks); nothing in the
hypothesis loops compiles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from faultkit import ROOT, TINY, TOTAL_STEPS, assert_params_identical, final_params, finalized_steps
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import jaxvit
from jaxvit import predict, schema
from jaxvit.checkpoints import workdir as workdir_lib
from jaxvit.data import pipeline as data
from jaxvit.data import preprocess
from jaxvit.schema import POOLINGS, POSEMBS, REMAT_POLICIES
from jaxvit.training import checkpointing, configs, optim, train_lib
from jaxvit.training.trainer import validate_config

FAST = settings(max_examples=60, deadline=None)


def _message_is_one_of(err: Exception, patterns: list[str]) -> bool:
    return any(re.search(p, str(err)) for p in patterns)


# -- configs -------------------------------------------------------------------

VALID_KEYS = configs.flat_keys(configs.load_config_file(TINY))
KEY_PARTS = st.sampled_from(["batch", "size", "lr", "optimizer", "model", "widht", "augment", "x"])


@FAST
@given(st.lists(KEY_PARTS, min_size=1, max_size=3).map(".".join))
def test_unknown_override_keys_are_listed_with_the_valid_ones(key):
    argv = [f"--config={TINY}", f"--config.{key}=1"]
    sections = {k.rsplit(".", 1)[0] for k in VALID_KEYS if "." in k}
    if key in VALID_KEYS or key in sections:
        configs.check_overrides(argv, TINY)
        return
    with pytest.raises(ValueError) as info:
        configs.check_overrides(argv, TINY)
    message = str(info.value)
    assert f"unknown config key(s) ['{key}']" in message
    assert "valid keys: " + ", ".join(VALID_KEYS) in message


def test_valid_override_keys_pass():
    configs.check_overrides([f"--config={TINY}", *(f"--config.{k}=1" for k in VALID_KEYS)], TINY)


def test_missing_config_file():
    with pytest.raises(ValueError, match="config file 'no/such/config.py' does not exist"):
        configs.check_overrides(["--config=no/such/config.py", "--config.seed=1"], TINY)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.batch_size=abc", "flag --config.batch_size=abc: invalid literal for int"),
        ("--config.total_steps=1.5", "flag --config.total_steps=1.5: invalid literal for int"),
    ],
)
def test_wrong_types_on_the_command_line_fail_at_parsing(tmp_path, flag, message):
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            f"--config={TINY}",
            f"--workdir={tmp_path / 'w'}",
            flag,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "w").exists(), "nothing is written before the flags parse"


def _config(**overrides) -> ml_collections.ConfigDict:
    values = configs.load_config_file(TINY).to_dict()
    model = {**values["model"], **overrides.pop("model", {})}
    return ml_collections.ConfigDict({**values, **overrides, "model": model})


@FAST
@given(
    batch=st.integers(-2, 40),
    devices=st.sampled_from([1, 2, 3, 4, 8]),
    size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    patch=st.integers(1, 9),
)
def test_validate_config_over_batch_devices_and_image_size(batch, devices, size, patch):
    config = _config(batch_size=batch, image_size=size, model={"patch_size": patch})
    broken = []
    if batch < 1 or batch % devices:
        broken.append(
            rf"batch_size={batch} \(the global batch\) must be a positive multiple of the {devices} devices"
        )
    if size[0] % patch or size[1] % patch:
        broken.append(
            rf"image_size=\({size[0]}, {size[1]}\) is not divisible by the model's patch size {patch}"
        )
    if not broken:
        validate_config(config, devices)
        return
    with pytest.raises(ValueError) as info:
        validate_config(config, devices)
    assert _message_is_one_of(info.value, broken), (str(info.value), broken)


def test_batch_12_on_8_devices():
    # The command-line run with 8 forced host devices is in tests/test_training_runs.py.
    with pytest.raises(
        ValueError, match=r"batch_size=12 \(the global batch\) must be a positive multiple of the 8"
    ):
        validate_config(_config(batch_size=12), 8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(total_steps=0), "total_steps must be >= 1, got 0"),
        (dict(log_every=-1), "log_every must be >= 0, got -1"),
        (dict(checkpoint_every=-5), "checkpoint_every must be >= 0, got -5"),
        (dict(num_classes=0), "num_classes must be >= 1, got 0"),
        (
            dict(model={"pool": "cls"}),
            r"unknown pool 'cls': expected one of \('tok', 'gap', 'map', 'attn_pool'\)",
        ),
        (dict(model={"num_heads": 3}), "width 16 is not divisible by num_heads=3"),
        (dict(model={"variant": "Q/4"}), "unknown variant 'Q/4'"),
    ],
)
def test_config_values_that_cannot_train(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(_config(**overrides), 1)


def test_mesh_that_does_not_match_the_devices():
    with pytest.raises(ValueError, match="mesh fsdp=3 does not divide the 8 devices"):
        train_lib.make_mesh(fsdp=3, devices=list(range(8)))
    with pytest.raises(ValueError, match="mesh data=3 x fsdp=2 does not match the 8 devices"):
        train_lib.make_mesh(data=3, fsdp=2, devices=list(range(8)))


# -- model configs and inputs ---------------------------------------------------------


@FAST
@given(
    pool=st.sampled_from([*POOLINGS, "cls"]),
    posemb=st.sampled_from([*POSEMBS, "sincos"]),
    remat=st.sampled_from([*REMAT_POLICIES, "all"]),
    class_token=st.booleans(),
    width=st.integers(-1, 40),
    depth=st.integers(-1, 3),
    heads=st.integers(0, 6),
    patch=st.tuples(st.integers(0, 5), st.integers(0, 5)),
)
def test_check_config_raises_exactly_for_broken_rules(
    pool, posemb, remat, class_token, width, depth, heads, patch
):
    model = jaxvit.VisionTransformer(
        num_classes=3,
        pool=pool,
        posemb=posemb,
        remat_policy=remat,
        class_token=class_token,
        width=width,
        depth=depth,
        num_heads=heads,
        patch_size=patch,
    )
    broken = []
    if pool not in POOLINGS:
        broken.append("unknown pool 'cls'")
    if posemb not in POSEMBS:
        broken.append("unknown posemb 'sincos'")
    if remat not in REMAT_POLICIES:
        broken.append("unknown remat_policy 'all'")
    if pool == "tok" and not class_token:
        broken.append("pool='tok' needs class_token=True")
    # Each field's range comes from the schema, so its message names that field alone.
    for name, value, low in (("width", width, 1), ("depth", depth, 0), ("num_heads", heads, 1)):
        if value < low:
            broken.append(f"{name} must be >= {low} and <= {schema.SPECS[name].hi}, got {value}")
    if width >= 1 and depth >= 0 and heads >= 1 and width % heads:
        broken.append(f"width {width} is not divisible by num_heads={heads}")
    if posemb in ("sincos2d", "sincos2d_mae") and width % 4:
        broken.append(f"posemb={posemb!r} needs a width divisible by 4, got {width}")
    if posemb == "rope" and width >= 1 and heads >= 1 and not width % heads and (width // heads) % 4:
        broken.append(f"posemb='rope' needs a head dimension divisible by 4, got {width // heads}")
    if min(patch) < 1:
        broken.append(re.escape(f"patch_size must be positive, got {patch}"))
    if not broken:
        model.check_config()
        return
    with pytest.raises(ValueError) as info:
        model.check_config()
    assert _message_is_one_of(info.value, broken), (str(info.value), broken)


@FAST
@given(
    size=st.sampled_from([*jaxvit.VARIANTS, "b", "XL", ""]),
    patch=st.one_of(st.just(None), st.text(alphabet="0123456789x-/a", max_size=6)),
)
def test_decode_variant_over_generated_names(size, patch):
    name = size if patch is None else f"{size}/{patch}"
    numbers = re.fullmatch(r"(\d+)(?:x(\d+))?", patch or "")
    sizes = tuple(int(n) for n in numbers.groups() if n is not None) if numbers else ()
    if size not in jaxvit.VARIANTS:
        with pytest.raises(ValueError, match=re.escape(f"unknown variant {name!r}: the size must be one of")):
            jaxvit.decode_variant(name)
    elif patch and not (sizes and min(sizes) >= 1):
        with pytest.raises(ValueError, match="the patch after '/' must be a positive integer"):
            jaxvit.decode_variant(name)
    else:
        expected = dict(jaxvit.VARIANTS[size])
        if patch:
            expected["patch_size"] = sizes[0] if len(sizes) == 1 else sizes
        assert jaxvit.decode_variant(name) == expected


@FAST
@given(
    shape=st.lists(st.integers(0, 24), min_size=0, max_size=5).map(tuple),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint8, jnp.bool_]),
    patch=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    channels=st.integers(1, 4),
)
def test_check_images_over_generated_shapes_and_dtypes(shape, dtype, patch, channels):
    model = jaxvit.VisionTransformer(
        num_classes=3, width=8, depth=1, num_heads=2, patch_size=patch, num_channels=channels
    )
    images = jax.ShapeDtypeStruct(shape, dtype)  # no array is allocated
    broken = []
    if len(shape) != 4:
        broken.append(re.escape(f"images must be rank 4 (N, H, W, C), got shape {shape}"))
    if not jnp.issubdtype(dtype, jnp.floating):
        broken.append("images must be floating point")
    if len(shape) == 4:
        _, h, w, c = shape
        (p, q) = patch
        if h % p or w % q:
            broken.append(f"image size {h}x{w} is not divisible by the patch size {p}x{q}")
        if h < p or w < q:
            broken.append(f"image size {h}x{w} is smaller than the patch size {p}x{q}")
        if c != channels:
            broken.append(f"images have {c} channels but the model expects num_channels={channels}")
    if not broken:
        assert model.patch_grid(images) == (shape[1] // patch[0], shape[2] // patch[1])
        return
    with pytest.raises(ValueError) as info:
        model.patch_grid(images)
    assert _message_is_one_of(info.value, broken), (str(info.value), broken)


# -- workdirs and checkpoints -------------------------------------------------------------
# File-level checkpoint errors (truncated .npz/.safetensors, wrong shapes, missing keys,
# object arrays, pickles) are tested in tests/test_pretrained.py.


def _unreadable_copy(reference, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(reference.workdir, workdir)
    for step in finalized_steps(workdir):
        os.remove(os.path.join(workdir, checkpointing.LATEST_DIR, str(step), "state", "_METADATA"))
    return workdir


def test_restore_params_on_a_directory_that_is_not_a_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a training workdir: .*config.json' is missing"):
        checkpointing.restore_params(tmp_path)
    with pytest.raises(ValueError, match="which must be 'latest' or 'best', got 'worst'"):
        checkpointing.restore_params(tmp_path, which="worst")


def test_no_readable_checkpoint_anywhere(reference, tmp_path):
    workdir = _unreadable_copy(reference, tmp_path)
    with pytest.raises(FileNotFoundError, match="no readable checkpoint in .*checkpoints'"):
        checkpointing.restore_params(workdir)
    # Resuming refuses too, rather than silently starting over.
    config = configs.load_config_file(TINY)
    model = workdir_lib.model_from_config(config.to_dict())
    tx = optim.make_optimizer(config, config.total_steps)[0]
    abstract = jax.eval_shape(
        lambda: train_lib.create_train_state(model, tx, jax.random.key(0), (8, 8, 1), False)
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
    )
    manager = checkpointing.Checkpointer(workdir, best_metric=None)
    with pytest.raises(RuntimeError, match="no checkpoint in .* could be restored; newest error"):
        manager.restore_latest(abstract, jax.random.key(0))
    manager.close()
    assert finalized_steps(workdir) == finalized_steps(reference.workdir)


def test_predict_on_an_unreadable_workdir_is_an_error_message(reference, tmp_path, capsys):
    workdir = _unreadable_copy(reference, tmp_path)
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    assert predict.main(["--checkpoint", str(workdir), str(tmp_path / "x.png")]) == 2
    assert "error: no readable checkpoint in" in capsys.readouterr().err


def test_a_config_that_does_not_fit_the_checkpoints_leaves_the_workdir_as_it_was(
    trainer, reference, tmp_path
):
    workdir = tmp_path / "w"
    shutil.copytree(reference.workdir, workdir)
    before = (workdir / "config.json").read_text()
    run = trainer.run(workdir, "--config.model.width=32")
    assert run.returncode != 0
    assert "no checkpoint in" in run.stderr and "is not compatible with the stored shape" in run.stderr
    assert (workdir / "config.json").read_text() == before
    assert finalized_steps(workdir) == [8, TOTAL_STEPS]
    assert not (workdir / checkpointing.UNREADABLE_DIR).exists()
    assert_params_identical(final_params(workdir), reference.params)


# -- image files -----------------------------------------------------------------------------


def _pixels(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_images(folder) -> dict[str, tuple]:
    """One file per awkward kind: ``name -> (path, expected RGB uint8 (H, W, 3))``."""
    os.makedirs(folder, exist_ok=True)
    rgb = _pixels(6, 10)
    gray = rgb[..., 0]
    sixteen = gray.astype(np.uint16) * 257  # 16-bit with the same 8-bit values
    cases = {
        "rgb.png": (Image.fromarray(rgb), rgb),
        "gray.png": (Image.fromarray(gray), np.repeat(gray[..., None], 3, -1)),
        "rgba.png": (Image.fromarray(np.dstack([rgb, gray])), rgb),
        "gray_alpha.png": (Image.fromarray(np.dstack([gray, gray])).convert("LA"), None),
        "palette.png": (Image.fromarray(rgb).convert("P"), None),
        "bilevel.png": (Image.fromarray(gray).convert("1"), None),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), None),
        "one_pixel.png": (Image.fromarray(rgb[:1, :1]), rgb[:1, :1]),
        "sixteen_bit.png": (Image.fromarray(sixteen), np.repeat(gray[..., None], 3, -1)),
    }
    written = {}
    for name, (image, expected) in cases.items():
        path = os.path.join(folder, name)
        image.save(path)
        written[name] = (
            path,
            expected if expected is not None else np.asarray(Image.open(path).convert("RGB")),
        )
    return written


def _truncated_jpeg(path) -> str:
    Image.fromarray(_pixels(64, 64)).save(path, quality=95)
    payload = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(payload[: len(payload) // 2])
    return str(path)


@pytest.mark.parametrize("channels", [3, 1])
def test_image_folder_decodes_every_mode_to_the_model_channels(tmp_path, channels):
    written = _write_images(tmp_path / "train" / "a")
    source = data.ImageFolderSource(str(tmp_path), "train", channels=channels)
    assert source.skipped == []
    for index, path in enumerate(source.files):
        image, label = source[index]
        expected = written[os.path.basename(path)][1]
        if channels == 1:
            expected = np.asarray(Image.fromarray(expected).convert("L"))[..., None]
        assert label == 0
        assert image.dtype == np.uint8 and image.shape == expected.shape, path
        # 16-bit files are scaled, not clipped to 255.
        np.testing.assert_array_equal(image, expected, err_msg=path)


def test_image_folder_one_pixel_image_through_train_and_eval_preprocessing(tmp_path):
    written = _write_images(tmp_path / "train" / "a")
    source = data.ImageFolderSource(str(tmp_path), "train", channels=3)
    one = source[source.files.index(written["one_pixel.png"][0])][0]
    prep = data.Preprocess(image_size=(8, 8), crop_padding=1, random_resized_crop=True, flip=True)
    colour = (one[0, 0].astype(np.float32) / 255 - 0.5) / 0.5
    evaluated = prep.eval(one)
    assert evaluated.shape == (8, 8, 3) and evaluated.dtype == np.float32
    np.testing.assert_allclose(evaluated, np.broadcast_to(colour, (8, 8, 3)), atol=1e-6)
    trained = prep.train(one, np.random.default_rng(0))
    assert trained.shape == (8, 8, 3) and trained.dtype == np.float32
    # the colour, or the zero padding (-1) of the random shift
    is_colour = np.all(np.abs(trained - colour) < 1e-6, axis=-1)
    assert np.all(is_colour | np.all(trained == -1.0, axis=-1)) and is_colour.any()


def test_image_folder_truncated_file_that_passes_the_scan_is_named_when_read(tmp_path):
    _write_images(tmp_path / "train" / "a")
    bad = _truncated_jpeg(tmp_path / "train" / "a" / "truncated.jpg")
    source = data.ImageFolderSource(str(tmp_path), "train")
    assert bad in source.files  # the header is fine; the pixels are not
    with pytest.raises(ValueError, match=f"cannot decode image '{re.escape(bad)}': image file is truncated"):
        source[source.files.index(bad)]


def test_image_folder_refuses_float_images_naming_them(tmp_path):
    os.makedirs(tmp_path / "train" / "a")
    path = str(tmp_path / "train" / "a" / "float.tif")
    Image.fromarray(np.linspace(0, 1, 60, dtype=np.float32).reshape(6, 10)).save(path)
    source = data.ImageFolderSource(str(tmp_path), "train")
    with pytest.raises(ValueError, match=f"cannot decode image '{re.escape(path)}': mode 'F' pixels"):
        source[0]


def test_image_folder_empty_and_non_image_files(tmp_path):
    _write_images(tmp_path / "train" / "a")
    (tmp_path / "train" / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "train" / "a" / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"2 unreadable file\(s\) in .*empty.png, .*notes.png"):
        data.ImageFolderSource(str(tmp_path), "train", on_corrupt="error")
    assert len(data.ImageFolderSource(str(tmp_path), "train").skipped) == 2


@pytest.mark.parametrize("channels", [3, 1])
def test_predict_preprocessing_of_every_mode(tmp_path, channels):
    written = _write_images(tmp_path)
    bundle = jaxvit.InferenceBundle(
        model=jaxvit.VisionTransformer(
            num_classes=2, num_channels=channels, patch_size=4, width=8, depth=1, num_heads=2
        ),
        params=None,
        image_size=(8, 12),
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        labels=None,
        origin="workdir",
        crop_pct=1.0,
        interpolation="bilinear",
    )
    images = preprocess.preprocess_files([p for p, _ in written.values()], bundle)
    assert images.shape == (len(written), 8, 12, channels) and images.dtype == np.float32
    assert np.all(np.abs(images) <= 1.0)
    bundle.model.patch_grid(images)
    gray = list(written).index("gray.png")
    if channels == 3:  # grayscale becomes three equal channels
        np.testing.assert_array_equal(images[gray, ..., 0], images[gray, ..., 2])
    # 16-bit files are scaled to 8 bits, not clipped to 255
    np.testing.assert_array_equal(images[list(written).index("sixteen_bit.png")], images[gray])


def test_predict_command_on_awkward_files(reference, tmp_path, capsys):
    written = _write_images(tmp_path)
    paths = [p for p, _ in written.values()]
    assert predict.main(["--checkpoint", reference.workdir, "--json", "--top-k", "3", *paths]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == paths
    for r in results:
        probs = [t["probability"] for t in r["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6

    bad = _truncated_jpeg(tmp_path / "truncated.jpg")
    assert predict.main(["--checkpoint", reference.workdir, paths[0], bad]) == 2
    assert f"error: cannot read image {bad}: image file is truncated" in capsys.readouterr().err
    (tmp_path / "empty.png").write_bytes(b"")
    assert predict.main(["--checkpoint", reference.workdir, str(tmp_path / "empty.png")]) == 2
    assert f"error: cannot read image {tmp_path / 'empty.png'}" in capsys.readouterr().err
    assert predict.main(["--checkpoint", reference.workdir, str(tmp_path / "missing.png")]) == 2
    assert f"error: image {tmp_path / 'missing.png'} does not exist" in capsys.readouterr().err
