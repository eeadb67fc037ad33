"""Hostile and malformed checkpoints, workdirs, configs and images.

A checkpoint is a file people download from strangers. Each case below
writes a crafted file (or folder) and demands a ``ValueError`` naming the
file and the problem: never a hang, never memory out of proportion to the
file, never a file opened outside the folder, never a wrong answer. The cases
come in the classes of the reliability section of the README:

1. memory and time out of proportion to the file (``MEMORY``, also run in a
   subprocess under an address-space limit, measured with ``getrusage``);
2. reads outside the folder and special files (``OUTSIDE``, ``FIFOS``, and an
   audit hook that records every file opened);
3. silent wrong answers (``WRONG``);
4. raw tracebacks where a one-line error is owed (``TRACEBACKS``, and
   ``train.py`` itself);
5. errors without context (``CONTEXT``);
6. the rest (1-channel exports, a workdir whose config does not fit, file modes).

Property tests (hypothesis) generate safetensors and ``.npz`` headers and
config values.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import jaxvit
from jaxvit import predict
from jaxvit.model import param_shapes
from jaxvit.safety import files
from jaxvit.training import configs

ROOT = Path(__file__).resolve().parents[1]
FIELDS = dict(num_classes=3, width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4)
SIZE = 8
PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _params(model, seed=0):
    rng = np.random.default_rng(seed)
    shapes = param_shapes(model, SIZE)
    return jax.tree_util.tree_map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), dict(shapes))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny model exported as .npz, timm safetensors and an HF folder, and a training workdir."""
    root = tmp_path_factory.mktemp("good")
    model = jaxvit.create_model(None, **FIELDS)
    params = _params(model)
    out = {
        "npz": jaxvit.export(params, root / "tiny.npz", "npz", model=model),
        "timm": jaxvit.export(params, root / "tiny.safetensors", "timm", model=model, labels=["a", "b", "c"]),
        "hf": jaxvit.export(params, root / "hf", "hf", model=model, labels=["a", "b", "c"]),
        "workdir": _workdir(root / "workdir", params),
        "image": root / "x.png",
        "root": root,
        "params": params,
    }
    Image.new("RGB", (10, 12), (40, 90, 200)).save(out["image"])
    return out


def _workdir(path: Path, params) -> Path:
    import orbax.checkpoint as ocp

    path.mkdir()
    manager = ocp.CheckpointManager(str(path / "checkpoints"))
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
    manager.wait_until_finished()
    manager.close()
    config = {
        "model": {"variant": None, **{k: v for k, v in FIELDS.items() if k != "num_classes"}},
        "num_classes": 3,
        "num_channels": 3,
        "image_size": SIZE,
        "data": {"mean": [0.5], "std": [0.5], "crop_fraction": 1.0},
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "labels.txt").write_text("a\nb\nc\n")
    return path


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        dst.mkdir()
        for item in src.iterdir():
            if item.is_dir():
                _copy(item, dst / item.name)
            else:
                (dst / item.name).write_bytes(item.read_bytes())
        return dst
    dst.write_bytes(src.read_bytes())
    return dst


def _npz(path: Path, arrays: dict, compress: bool = False) -> Path:
    with open(path, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)
    return path


def _good_npz(good) -> dict:
    return dict(files.read_npz(good["npz"]))


def _edit_json(path: Path, **changes) -> Path:
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


_DELETE = object()


def _hf(good, tmp, **changes) -> Path:
    folder = _copy(good["hf"], tmp / "hf")
    _edit_json(folder / "config.json", **changes)
    return folder


def _timm_meta(good, tmp, edit) -> Path:
    arrays, metadata = files.read_safetensors(good["timm"])
    meta = json.loads(metadata["jaxvit_model"])
    edit(meta)
    path = tmp / "meta.safetensors"
    files.write_safetensors(arrays, path, {"jaxvit_model": json.dumps(meta)})
    return path


def _safetensors_raw(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _with_array(good, tmp, key, value, name="x.npz") -> Path:
    arrays = _good_npz(good)
    arrays[key] = value
    return _npz(tmp / name, arrays)


# -- class 1: memory and time out of proportion to the file ---------------------------------------


def _deep_key(good, tmp):
    return _with_array(
        good, tmp, "Transformer/encoderblock_1000000/LayerNorm_0/scale", np.ones(16, np.float32)
    )


def _scanned_zero_width(good, tmp):
    arrays = {k: v for k, v in _good_npz(good).items() if not k.startswith("Transformer/encoderblock_")}
    arrays["Transformer/encoderblock/LayerNorm_0/scale"] = np.zeros((10**7, 0), np.float32)
    return _npz(tmp / "scanned.npz", arrays)


def _zip_bomb(good, tmp):
    arrays = _good_npz(good)
    arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = np.zeros((16, 32), np.float32)
    arrays["zeros"] = np.zeros(30 * 2**20, np.uint8)  # 30 MiB of zeros, about 30 KiB compressed
    return _npz(tmp / "bomb.npz", arrays, compress=True)


def _thin_png(good, tmp):
    path = tmp / "thin.png"
    Image.new("L", (100_000, 1)).save(path)
    return path


def _huge_png(good, tmp):
    path = tmp / "huge.png"
    Image.new("1", (12_000, 12_000)).save(path)  # 144 M pixels in about 20 KB
    return path


MEMORY = {
    "npz key names block 1000000": (_deep_key, "names encoder block 1000000"),
    "metadata depth=10**6": (
        lambda g, t: _timm_meta(g, t, lambda m: m["model"].update(depth=10**6)),
        "depth=1000000 must be in",
    ),
    "HF num_hidden_layers=10**6": (
        lambda g, t: _hf(g, t, num_hidden_layers=10**6),
        "num_hidden_layers=1000000 must be in",
    ),
    "scanned zero-width array of 10**7 blocks": (_scanned_zero_width, "stacks 10000000 encoder blocks"),
    "HF num_labels=2*10**7": (
        lambda g, t: _hf(g, t, num_labels=2 * 10**7, id2label=_DELETE, label2id=_DELETE),
        "num_labels=20000000 must be in",
    ),
    "npz member expanding 1000:1": (_zip_bomb, "expand to .* more than 16x"),
}
IMAGES = {
    "PNG of 100000x1 pixels (timm crop)": (_thin_png, "too extreme to resize"),
    "PNG of 144 M pixels": (_huge_png, "12000x12000 pixels is more than"),
}


def _expect_error(path, pattern, call=None):
    """``call(path)`` raises ValueError naming the file (its name) and matching ``pattern``, within 20 s."""
    call = call or jaxvit.load_for_inference
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError(f"{path}: still running")))
    signal.alarm(20)
    try:
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            call(path)
    finally:
        signal.alarm(0)
    message = str(info.value)
    assert Path(path).name in message, message
    assert re.search(pattern, message), message
    return message


@pytest.mark.parametrize("case", sorted(MEMORY))
def test_memory_cases_fail_naming_the_file(good, tmp_path, case):
    build, pattern = MEMORY[case]
    _expect_error(build(good, tmp_path), pattern)


@pytest.mark.parametrize("case", sorted(IMAGES))
def test_image_bombs_fail_naming_the_file(good, tmp_path, case):
    build, pattern = IMAGES[case]
    # timm: crop_pct < 1 scales the short side up to 224 / 0.875 pixels
    bundle = jaxvit.load_for_inference(good["timm"], image_size=224)
    _expect_error(build(good, tmp_path), pattern, lambda p: predict.predict(bundle, [p]))


# Peak memory of one call: the kernel's high-water mark of resident memory (VmHWM), reset
# before the call through /proc/self/clear_refs; where that cannot be reset, the growth of
# getrusage's ru_maxrss (which can only under-count).
_MEASURE = r"""
import resource, time

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def measure(call):
    before, maxrss = status("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = True
    except OSError:
        exact = False
    start = time.perf_counter()
    try:
        call()
        error = None
    except MemoryError:
        error = "MemoryError"
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    if exact:
        growth = status("VmHWM") - before
    else:
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - maxrss
    return {"error": error, "seconds": seconds, "growth": growth, "exact": exact}
"""


def test_training_images_are_bounded_too(good, tmp_path):
    from jaxvit.data import pipeline as data

    path = _huge_png(good, tmp_path)
    with pytest.raises(ValueError, match=r"cannot decode image .*huge\.png.*12000x12000 pixels is more than"):
        data.decode_image(str(path), 3, str(path))


_PROBE = (
    _MEASURE
    + r"""
import json, sys
import jaxvit
from jaxvit import predict
cases, good, timm = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]

# Warm up: everything a good load touches is imported and compiled once.
bundle = jaxvit.load_for_inference(timm, image_size=224)
predict.predict(bundle, [sys.argv[4]])
jaxvit.load_for_inference(good)
cap = status("VmSize") + int(sys.argv[5])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
out = []
for kind, path in cases:
    if kind == "image":
        result = measure(lambda: predict.predict(bundle, [path]))
    else:
        result = measure(lambda: jaxvit.load_for_inference(path))
    out.append({"path": path, **result})
print(json.dumps(out))
"""
)
# A hostile case may grow the peak resident memory of the loader by at most this much, and
# its address space by at most AS_MARGIN; each case may take at most SECONDS.
GROWTH = 16 << 20
AS_MARGIN = 1 << 30
SECONDS = 10.0


def test_memory_and_time_stay_bounded_under_an_address_space_limit(good, tmp_path):
    cases = []
    for i, (build, _) in enumerate(MEMORY.values()):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        cases.append(("checkpoint", str(build(good, folder))))
    for i, (build, _) in enumerate(IMAGES.values()):
        folder = tmp_path / f"i{i}"
        folder.mkdir()
        cases.append(("image", str(build(good, folder))))
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _PROBE,
            json.dumps(cases),
            str(good["npz"]),
            str(good["timm"]),
            str(good["image"]),
            str(AS_MARGIN),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for result in results:
        print(f"{Path(result['path']).name}: +{result['growth'] >> 20} MiB, {result['seconds']:.3f} s")
        assert result["error"] and result["error"].startswith("ValueError"), result
        assert Path(result["path"]).name in result["error"], result
        assert result["growth"] < GROWTH, result
        assert result["seconds"] < SECONDS, result


_LEGIT = (
    _MEASURE
    + r"""
import json, sys
import jaxvit
print(json.dumps(measure(lambda: jaxvit.load_for_inference(sys.argv[1]))))
"""
)
# A good load (the first in its process) may grow the peak resident memory by at most this many
# times the bytes of its weights file (the loaded params themselves are one of them), plus
# LEGIT_SLACK for what tracing the model costs once.
LEGIT_FACTOR = 3
LEGIT_SLACK = 32 << 20


def test_a_good_load_allocates_a_few_times_its_file(good, tmp_path):
    model = jaxvit.create_model(
        None, num_classes=10, width=384, depth=6, num_heads=6, mlp_dim=1536, patch_size=4
    )
    params = _params(model)
    for fmt, name in (("npz", "big.npz"), ("timm", "big.safetensors"), ("hf", "big_hf")):
        path = jaxvit.export(params, tmp_path / name, fmt, model=model)
        weights = path / "model.safetensors" if path.is_dir() else path
        run = subprocess.run(
            [sys.executable, "-c", _LEGIT, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
        )
        assert run.returncode == 0, run.stderr[-3000:]
        result, size = json.loads(run.stdout.strip().splitlines()[-1]), weights.stat().st_size
        assert result["error"] is None, result
        growth = result["growth"]
        print(f"{name}: {size >> 20} MiB file, peak +{growth >> 20} MiB ({growth / size:.2f}x), {result}")
        assert growth <= LEGIT_FACTOR * size + LEGIT_SLACK, (name, growth, size)


# -- class 2: reads outside the folder, special files ---------------------------------------------


def _sharded(good, tmp, shard_name: str) -> Path:
    folder = _copy(good["hf"], tmp / "hf")
    weights = folder / "model.safetensors"
    keys = list(files.read_safetensors(weights)[0])
    weights.unlink()
    index = {"metadata": {}, "weight_map": {k: shard_name for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _elsewhere(good, tmp) -> Path:
    outside = tmp / "elsewhere"
    outside.mkdir()
    _copy(good["hf"] / "model.safetensors", outside / "model.safetensors")
    return outside / "model.safetensors"


def _dotdot(good, tmp):
    _elsewhere(good, tmp)
    return _sharded(good, tmp, "../elsewhere/model.safetensors")


def _absolute(good, tmp):
    return _sharded(good, tmp, str(_elsewhere(good, tmp)))


def _link_out(good, tmp):
    target = _elsewhere(good, tmp)
    folder = _sharded(good, tmp, "shard.safetensors")
    (folder / "shard.safetensors").symlink_to(target)
    return folder


OUTSIDE = {
    "index shard ../elsewhere": (_dotdot, "points outside the checkpoint folder"),
    "index shard absolute path": (_absolute, "points outside the checkpoint folder"),
    "index shard linking out": (_link_out, "resolves to .* outside the checkpoint folder"),
}


class _Opened:
    """Every path opened by this process while active (``open`` audit events)."""

    active = False
    paths: list[str] = []
    installed = False

    @classmethod
    def install(cls):
        if not cls.installed:
            sys.addaudithook(cls._hook)
            cls.installed = True

    @classmethod
    def _hook(cls, event, args):
        if cls.active and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            cls.paths.append(os.fsdecode(args[0]))


@pytest.mark.parametrize("case", sorted(OUTSIDE))
def test_a_checkpoint_never_opens_a_file_outside_its_folder(good, tmp_path, case):
    build, pattern = OUTSIDE[case]
    folder = build(good, tmp_path)
    _Opened.install()
    _Opened.paths = []
    _Opened.active = True
    try:
        _expect_error(folder, pattern)
    finally:
        _Opened.active = False
    outside = str(tmp_path / "elsewhere")
    assert not [p for p in _Opened.paths if os.path.realpath(p).startswith(outside)], _Opened.paths


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs(good, tmp_path):
    blobs, snapshot = tmp_path / "repo" / "blobs", tmp_path / "repo" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for item in good["hf"].iterdir():
        _copy(item, blobs / item.name)
        (snapshot / item.name).symlink_to(Path("../../blobs") / item.name)
    assert jaxvit.load_for_inference(snapshot).model.num_classes == 3


def _fifo_in(good, tmp, which: str) -> Path:
    if which in ("labels.txt", "workdir config.json"):
        folder = _copy(good["workdir"], tmp / "workdir")
        which = which.split()[-1]
    elif which == "shard":
        folder = _sharded(good, tmp, "shard.safetensors")
        which = "shard.safetensors"
    else:
        folder = _copy(good["hf"], tmp / "hf")
    (folder / which).unlink(missing_ok=True)
    os.mkfifo(folder / which)
    return folder


FIFOS = ["config.json", "model.safetensors", "shard", "labels.txt", "workdir config.json", "file"]


@pytest.mark.parametrize("which", FIFOS)
def test_special_files_fail_at_once(good, tmp_path, which):
    if which == "file":
        path = tmp_path / "model.npz"
        os.mkfifo(path)
        _expect_error(path, "is a FIFO, not a regular file")
        _expect_error(Path("/dev/zero"), "is a character device, not a regular file")
        return
    _expect_error(_fifo_in(good, tmp_path, which), "is a FIFO, not a regular file")


def test_pillows_own_bomb_check_is_an_error_naming_the_image(good, tmp_path, monkeypatch):
    from jaxvit.data import pipeline as data
    from jaxvit.data import preprocess

    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 pixels is more than twice that
    with pytest.raises(ValueError, match=r"cannot read image .*big\.png: .*decompression bomb"):
        preprocess.load_image(path)
    with pytest.raises(ValueError, match=r"cannot decode image .*big\.png.*decompression bomb"):
        data.decode_image(str(path), 3, str(path))


# -- class 3: silent wrong answers ----------------------------------------------------------------


def _dtype_case(dtype):
    def build(good, tmp):
        arrays = _good_npz(good)
        key = "Transformer/encoder_norm/scale"
        arrays[key] = np.ones(16).astype(dtype)
        return _npz(tmp / f"{np.dtype(dtype).name}.npz", arrays)

    return build


def _nonfinite(value, fmt):
    def build(good, tmp):
        if fmt == "npz":
            arrays = _good_npz(good)
            arrays["head/bias"] = arrays["head/bias"].copy()
            arrays["head/bias"][1] = value
            return _npz(tmp / "nan.npz", arrays)
        arrays, metadata = files.read_safetensors(good["timm"])
        arrays = dict(arrays)
        arrays["head.bias"] = arrays["head.bias"].copy()
        arrays["head.bias"][0] = value
        files.write_safetensors(arrays, tmp / "inf.safetensors", metadata)
        return tmp / "inf.safetensors"

    return build


def _workdir_with(good, tmp, **data):
    folder = _copy(good["workdir"], tmp / "workdir")
    config = json.loads((folder / "config.json").read_text())
    config["data"].update(data)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


WRONG = {
    "HF id2label of 5 for a classifier of 3": (
        lambda g, t: _hf(g, t, id2label={str(i): f"c{i}" for i in range(5)}, label2id=_DELETE),
        "declares 5 classes but the classifier has 3",
    ),
    "metadata num_classes=5 for a classifier of 3": (
        lambda g, t: _timm_meta(g, t, lambda m: m["model"].update(num_classes=5)),
        "declares 5 classes but the classifier has 3",
    ),
    "NaN weight (npz)": (_nonfinite(np.nan, "npz"), "head/classifier/bias .* NaN or infinite"),
    "inf weight (safetensors)": (_nonfinite(np.inf, "timm"), "head/classifier/bias .* NaN or infinite"),
    "uint64 weight": (_dtype_case(np.uint64), "has dtype uint64; jaxvit loads only"),
    "int8 weight": (_dtype_case(np.int8), "has dtype int8; jaxvit loads only"),
    "bool weight": (_dtype_case(np.bool_), "has dtype bool; jaxvit loads only"),
    "complex weight": (_dtype_case(np.complex64), "has dtype complex64; jaxvit loads only"),
    "datetime64 weight": (_dtype_case("datetime64[s]"), "has dtype datetime64\\[s\\]; jaxvit loads only"),
    "HF negative layer_norm_eps": (
        lambda g, t: _hf(g, t, layer_norm_eps=-1e-12),
        "layer_norm_eps=-1e-12 must be > 0",
    ),
    "workdir data.std=0": (lambda g, t: _workdir_with(g, t, std=[0.0]), "std=0.0 must be > 0"),
    'metadata labels="abc"': (
        lambda g, t: _timm_meta(g, t, lambda m: m.update(labels="abc")),
        "labels must be a list of strings",
    ),
    "HF image_size that does not fit the position embedding": (
        lambda g, t: _hf(g, t, image_size=64),
        "image size 64x64 gives 256 patches but the position embedding",
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_wrong_answers_become_errors(good, tmp_path, case):
    build, pattern = WRONG[case]
    _expect_error(build(good, tmp_path), pattern)


LOAD_PRETRAINED = [
    *(MEMORY[k] for k in sorted(MEMORY)),
    *(WRONG[k] for k in ("NaN weight (npz)", "inf weight (safetensors)", "uint64 weight", "bool weight")),
    *(OUTSIDE[k] for k in sorted(OUTSIDE)),
]


@pytest.mark.parametrize("index", range(len(LOAD_PRETRAINED)))
def test_load_pretrained_into_a_given_model_runs_the_same_checks(good, tmp_path, index):
    build, pattern = LOAD_PRETRAINED[index]
    model = jaxvit.create_model(None, **FIELDS)
    _expect_error(build(good, tmp_path), pattern, lambda p: jaxvit.load_pretrained(p, model, SIZE))


def test_replacing_the_head_stays_an_explicit_choice(good):
    model = jaxvit.create_model(None, **{**FIELDS, "num_classes": 5})
    params = jaxvit.load_pretrained(good["npz"], model, SIZE)
    assert params["head"]["classifier"]["kernel"].shape == (16, 5)


def test_predict_refuses_non_finite_outputs(good):
    bundle = jaxvit.load_for_inference(good["npz"])
    bad = jax.tree_util.tree_map(lambda a: a * np.nan, bundle.params)
    import dataclasses

    with pytest.raises(ValueError, match=r"not finite .*x\.png"):
        predict.predict(dataclasses.replace(bundle, params=bad), [good["image"]])


# -- class 4: raw tracebacks ----------------------------------------------------------------------


def _zip_with(tmp, name, members: dict) -> Path:
    path = tmp / name
    with zipfile.ZipFile(path, "w") as z:
        for member, data in members.items():
            z.writestr(member, data)
    return path


def _npz_plus_member(good, tmp):
    path = _copy(good["npz"], tmp / "extra.npz")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("notes.txt", b"hello")
    return path


def _unknown_dtype(good, tmp):
    header = {"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}
    return _safetensors_raw(tmp / "f8.safetensors", header, b"\x00\x00")


def _workdir_config(good, tmp, text):
    folder = _copy(good["workdir"], tmp / "workdir")
    (folder / "config.json").write_text(text)
    return folder


TRACEBACKS = {
    'HF num_attention_heads "2"': (
        lambda g, t: _hf(g, t, num_attention_heads="2"),
        "num_attention_heads must be an integer, got '2'",
    ),
    "HF hidden_size 16.0": (
        lambda g, t: _hf(g, t, hidden_size=16.0),
        "hidden_size must be an integer, got 16.0",
    ),
    'metadata num_heads "2"': (
        lambda g, t: _timm_meta(g, t, lambda m: m["model"].update(num_heads="2")),
        "num_heads must be an integer, got '2'",
    ),
    "HF num_channels=0": (lambda g, t: _hf(g, t, num_channels=0), "num_channels=0 must be in"),
    "non-.npy member in an .npz": (_npz_plus_member, "member 'notes.txt' is not an .npy array"),
    "zip without data.pkl named .pth": (
        lambda g, t: _zip_with(t, "model.pth", {"archive/version": b"3"}),
        "member 'archive/version' is not an .npy array",
    ),
    "safetensors of an unknown dtype": (
        _unknown_dtype,
        "tensor 'x' has dtype 'F8_E4M3', which jaxvit does not read",
    ),
    "workdir config.json that is a list": (
        lambda g, t: _workdir_config(g, t, "[1, 2]"),
        "config.json must hold a JSON object, got list",
    ),
    "workdir config.json without model": (
        lambda g, t: _workdir_config(g, t, '{"num_classes": 3}'),
        "config.json: expected a JSON object with a 'model' object",
    ),
}


@pytest.mark.parametrize("case", sorted(TRACEBACKS))
def test_tracebacks_become_one_line_errors(good, tmp_path, case):
    build, pattern = TRACEBACKS[case]
    _expect_error(build(good, tmp_path), pattern)


def _train_config(**overrides):
    config = configs.load_config_file(str(ROOT / "tests" / "configs" / "tiny.py")).to_dict()
    config.update(overrides)
    return ml_collections.ConfigDict(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"grad_accum_steps": 0}, "grad_accum_steps=0 must be >= 1"),
        ({"image_size": -8}, "image_size=-8 must be in"),
        ({"batch_size": "8"}, "batch_size must be an integer, got '8'"),
        ({"data": {"mean": (0.1, 0.2), "std": (0.5,)}}, "data.mean has 2 values"),
    ],
)
def test_train_config_values_are_checked_first(overrides, message):
    from jaxvit.training.trainer import validate_config

    config = _train_config(**overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_config(config, 1)


def test_a_missing_config_file_is_named_without_overrides():
    with pytest.raises(ValueError, match="config file 'no/such/config.py' does not exist"):
        configs.check_overrides(["--config=no/such/config.py"], "unused.py")


def test_train_py_config_errors_are_one_line_with_status_2(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"--config={ROOT / 'tests' / 'configs' / 'tiny.py'}",
            f"--workdir={tmp_path / 'w'}",
            "--config.grad_accum_steps=0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "error: config: grad_accum_steps=0 must be >= 1" in run.stderr
    assert "Traceback" not in run.stderr, run.stderr[-2000:]


def test_the_command_lines_print_one_error_line(good, tmp_path, capsys):
    from jaxvit import summary, visualize

    bad = _hf(good, tmp_path, num_attention_heads="2")
    assert predict.main(["--checkpoint", str(bad), str(good["image"])]) == 2
    assert visualize.main(["attention", str(good["image"]), "--checkpoint", str(bad), "--out", "x.png"]) == 2
    assert summary.main(["S/16", "--no-xla", "--depth", "abc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err] == ["error"] * 3, err
    assert "num_attention_heads must be an integer" in err[0] and str(bad) in err[0]
    assert "num_attention_heads must be an integer" in err[1]
    assert "depth must be an integer, got 'abc'" in err[2]


def test_a_safetensors_header_length_starting_with_0x80_is_not_a_pickle(good, tmp_path):
    arrays, metadata = files.read_safetensors(good["timm"])
    blob = json.dumps({"__metadata__": metadata, **_header_of(good["timm"])}).encode()
    blob += b" " * ((0x80 - len(blob)) % 256)  # JSON allows trailing spaces
    data = good["timm"].read_bytes()[8 + struct.unpack("<Q", good["timm"].read_bytes()[:8])[0] :]
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    assert path.read_bytes()[0] == 0x80
    assert files.sniff(path) == "safetensors"
    assert jaxvit.load_for_inference(path).model.num_classes == 3


def _header_of(path: Path) -> dict:
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    header.pop("__metadata__", None)
    return header


# -- class 5: errors with context -----------------------------------------------------------------


def _bad_kernel_rank(good, tmp):
    arrays = _good_npz(good)
    arrays["embedding/kernel"] = arrays["embedding/kernel"][0]
    return _npz(tmp / "rank.npz", arrays)


def _bad_metadata_json(good, tmp):
    arrays, _ = files.read_safetensors(good["timm"])
    files.write_safetensors(arrays, tmp / "json.safetensors", {"jaxvit_model": "{"})
    return tmp / "json.safetensors"


CONTEXT = {
    "kernel of the wrong rank": (_bad_kernel_rank, "patch_embed/kernel has shape .* expected 4 dimensions"),
    'HF hidden_size "abc"': (
        lambda g, t: _hf(g, t, hidden_size="abc"),
        "config.json: hidden_size must be an integer",
    ),
    "HF id2label with a non-integer key": (
        lambda g, t: _hf(g, t, id2label={"a": "x", "1": "y", "2": "z"}),
        "config.json: id2label must map class indices",
    ),
    "metadata that is not JSON": (_bad_metadata_json, "metadata jaxvit_model is not valid JSON"),
    "workdir config.json that is not JSON": (
        lambda g, t: _workdir_config(g, t, "{"),
        "could not parse .*config.json as JSON",
    ),
    "workdir mean of 2 values for 3 channels": (
        lambda g, t: _workdir_with(g, t, mean=[0.1, 0.2]),
        "config.json: data: mean has 2 values",
    ),
}


@pytest.mark.parametrize("case", sorted(CONTEXT))
def test_errors_name_the_file_and_key(good, tmp_path, case):
    build, pattern = CONTEXT[case]
    _expect_error(build(good, tmp_path), pattern)


# -- class 6: found along the way -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npz", "timm", "hf"])
def test_predict_reads_its_own_one_channel_exports(tmp_path, fmt):
    model = jaxvit.create_model(None, **{**FIELDS, "num_channels": 1})
    images = jax.ShapeDtypeStruct((1, SIZE, SIZE, 1), np.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    name = {"npz": "g.npz", "timm": "g.safetensors", "hf": "g"}[fmt]
    path = jaxvit.export(params, tmp_path / name, fmt, model=model)
    Image.new("RGB", (9, 11), (10, 200, 30)).save(tmp_path / "x.png")
    bundle = jaxvit.load_for_inference(path)
    assert len(bundle.mean) == len(bundle.std) == 1
    [result] = predict.predict(bundle, [tmp_path / "x.png"])
    assert abs(sum(t["probability"] for t in result["top_k"]) - 1.0) < 1e-5


def test_a_workdir_whose_config_does_not_fit_its_params(good, tmp_path):
    folder = _copy(good["workdir"], tmp_path / "workdir")
    config = json.loads((folder / "config.json").read_text())
    config["model"]["mlp_dim"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    _expect_error(folder, r"config.json does not describe the parameters stored at step 1")


def test_export_writes_files_with_the_usual_permissions(good):
    umask = os.umask(0)
    os.umask(umask)
    for path in (good["timm"], good["hf"] / "model.safetensors", good["npz"]):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path


# -- properties -----------------------------------------------------------------------------------

_DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U64", "BOOL", "F8_E5M2", "C64", "", "f32"]
_ITEM = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U64": 8, "BOOL": 1}


@PROPERTY
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_DTYPES),
            st.lists(st.integers(0, 10**9), max_size=3),
            st.integers(-8, 64),
            st.integers(-8, 64),
        ),
        max_size=4,
    ),
    st.integers(0, 96),
)
def test_safetensors_headers_never_read_past_their_file(tmp_path, entries, data_len):
    header = {
        f"t{i}": {"dtype": d, "shape": s, "data_offsets": [b, e]} for i, (d, s, b, e) in enumerate(entries)
    }
    path = _safetensors_raw(tmp_path / "h.safetensors", header, bytes(data_len))
    try:
        arrays, _ = files.read_safetensors(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert sum(a.nbytes for a in arrays.values()) <= data_len
    for key, entry in header.items():
        assert arrays[key].shape == tuple(entry["shape"])
        assert entry["dtype"] in _ITEM


@PROPERTY
@given(
    st.lists(st.integers(0, 10**8), max_size=3),
    st.sampled_from(["<f4", "<f2", "|u1", "<i8", "|b1", "<c8"]),
    st.integers(0, 64),
)
def test_npz_headers_never_allocate_more_than_their_bytes(tmp_path, shape, dtype, data_len):
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    path = _zip_with(tmp_path, "h.npz", {"a.npy": buffer.getvalue() + bytes(data_len)})
    try:
        arrays = files.read_npz(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert arrays["a"].shape == tuple(shape)
    assert arrays["a"].nbytes <= data_len


_VALUES = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, 64), max_size=3),
)


@PROPERTY
@given(
    st.sampled_from(
        [
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_channels",
            "patch_size",
            "image_size",
            "layer_norm_eps",
            "num_labels",
            "hidden_act",
            "qkv_bias",
        ]
    ),
    _VALUES,
)
def test_hf_config_values_load_exactly_or_fail_naming_the_key(good, tmp_path_factory, key, value):
    tmp = tmp_path_factory.mktemp("prop")
    folder = _hf(good, tmp, **{key: value})
    from jaxvit.checkpoints.architecture import model_from_checkpoint
    from jaxvit.checkpoints.pretrained import read_checkpoint

    try:
        model, size = model_from_checkpoint(read_checkpoint(folder))
    except ValueError as e:
        assert str(folder) in str(e), str(e)
        return
    # It loaded: then the value is the one the weights need.
    assert (model.width, model.depth, model.num_heads, model.num_classes) == (16, 2, 2, 3)
    assert size == (SIZE, SIZE) and model.layer_norm_eps > 0
