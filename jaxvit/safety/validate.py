"""Checks on input that jaxvit did not write: checkpoint files and folders, configs, images.

A checkpoint is a file people download from strangers. Every reader in
``jaxvit.convert`` and every entry point (``load_pretrained``,
``load_for_inference``, ``predict``, ``visualize``, ``train.py``) goes
through this module, so that loading one

- opens only regular files (``open_regular``: a FIFO or a device never
  blocks a read), and inside a folder only the files under it
  (``member_path``: no ``..``, no absolute names, no link that leaves it);
- allocates memory in proportion to the arrays the file really holds: an
  archive may not expand to more than ``MAX_EXPANSION`` times its size, an
  array header must match the bytes behind it, and every size a config
  declares is checked against the weights (``jaxvit.checkpoints.fitting``) before a
  model is traced;
- never loads a weight that is not a finite float (``check_weight``);
- reads config values through typed readers (``int_field``,
  ``float_field``, ...) that name the file, the key, the value and what was
  expected.

Every refusal is a ``ValueError`` (``FileNotFoundError`` for a missing file)
naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

# Sizes no ViT checkpoint comes near; a config that declares more is refused before
# anything is built from it.
MAX_DEPTH = 1024
MAX_WIDTH = 1 << 16
MAX_MLP_DIM = 1 << 20
MAX_CLASSES = 1 << 22
MAX_PATCH = 1024
MAX_CHANNELS = 64
MAX_IMAGE_SIDE = 1 << 14
# A zip archive (.npz, PyTorch file) may expand to at most this many times its own size,
# plus ZIP_SLACK bytes: np.savez stores arrays uncompressed (1x), and compressing real
# weights gains little.
MAX_EXPANSION = 16
ZIP_SLACK = 1 << 20
# The JSON header of a safetensors file.
MAX_HEADER_BYTES = 100 << 20
# Pixels of a decoded image, and of the resized image on the way to the model's size.
MAX_IMAGE_PIXELS = 1 << 27
# JSON config and label files.
MAX_TEXT_BYTES = 64 << 20

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str | os.PathLike, what: str = "file") -> IO[bytes]:
    """``path`` opened for binary reading, only if it is a regular file.

    The file is opened without blocking and checked with ``fstat`` before a
    byte is read, so a FIFO, a device or a socket fails at once instead of
    hanging. Raises ``FileNotFoundError`` or ``ValueError`` naming ``path``.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"cannot open {what} {path}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(
                f"{what} {path} is a {_file_kind(mode)}, not a regular file: jaxvit reads only regular files"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_regular_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file (following links); never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_bytes(path: str | os.PathLike, what: str = "file", limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ValueError(f"{what} {path} has {size} bytes, more than the {limit} jaxvit reads for it")
        return f.read(limit + 1)


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file (regular, at most ``MAX_TEXT_BYTES``), with errors naming it."""
    try:
        return read_bytes(path, what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text ({e})") from None


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """A JSON object from a regular file, with errors naming the file."""
    text = read_text(path, what)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"could not parse {path} as JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"could not parse {path} as JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def allowed_roots(folder: str | os.PathLike) -> list[str]:
    """The real directories a checkpoint folder's files may resolve into.

    The folder itself; for a Hugging Face cache snapshot
    (``.../snapshots/<revision>/``), also its repository's ``blobs/``, where
    the snapshot's links point.
    """
    folder = Path(folder)
    roots = [os.path.realpath(folder)]
    absolute = Path(os.path.abspath(folder))
    if absolute.parent.name == "snapshots":
        roots.append(os.path.realpath(absolute.parent.parent / "blobs"))
    return roots


def member_path(folder: str | os.PathLike, name: Any, what: str = "file") -> Path:
    """``folder / name``, only if ``name`` stays inside ``folder``.

    ``name`` comes from the checkpoint (e.g. a shard of an index): it must be
    a relative path without ``..``, and the file it names, links followed,
    must lie under ``folder`` (see ``allowed_roots``). Nothing is opened.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{folder}: {what} name {name!r} is not a file name")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise ValueError(
            f"{folder}: {what} {name!r} points outside the checkpoint folder; jaxvit opens only files inside it"
        )
    path = folder / name
    real = os.path.realpath(path)
    for root in allowed_roots(folder):
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return path
    raise ValueError(
        f"{folder}: {what} {name!r} resolves to {real}, outside the checkpoint folder;"
        " jaxvit opens only files inside it"
    )


def check_zip_expansion(path: str | os.PathLike, infos: Sequence[Any], file_size: int) -> None:
    """Raises unless the members of a zip of ``file_size`` bytes expand to at most ``MAX_EXPANSION`` x it."""
    total = sum(max(int(i.file_size), 0) for i in infos)
    budget = MAX_EXPANSION * file_size + ZIP_SLACK
    if total > budget:
        raise ValueError(
            f"{path}: its members would expand to {total} bytes, more than {MAX_EXPANSION}x the file's"
            f" {file_size} bytes: refusing to decompress it"
        )


# ---------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------


def array_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of an array of ``shape``, in Python integers (no overflow)."""
    return math.prod(int(s) for s in shape) * int(itemsize)


def check_weight(key: str, array: Any, where: str) -> None:
    """Raises unless ``array`` is a finite float16/bfloat16/float32/float64 array."""
    dtype = np.asarray(array).dtype if not hasattr(array, "dtype") else array.dtype
    if str(dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"{where}: {key} has dtype {dtype}; jaxvit loads only {', '.join(FLOAT_DTYPES)} weights"
            " (anything else would be cast to float32 without a word)"
        )
    values = np.asarray(array)
    finite = np.isfinite(values.astype(np.float32) if str(dtype) == "bfloat16" else values)
    if not finite.all():
        bad = int(values.size - np.count_nonzero(finite))
        raise ValueError(f"{where}: {key} {tuple(values.shape)} holds {bad} NaN or infinite value(s)")


# ---------------------------------------------------------------------------
# Config values
# ---------------------------------------------------------------------------

_MISSING = object()


def _value(config: Mapping[str, Any], key: str, default: Any) -> Any:
    if key in config:
        return config[key]
    if default is _MISSING:
        raise ValueError(f"missing key {key!r}")
    return default


def int_field(
    config: Mapping[str, Any],
    key: str,
    where: str,
    *,
    default: Any = _MISSING,
    lo: int = 0,
    hi: int | None = None,
    allow_none: bool = False,
) -> Any:
    """``config[key]`` as an ``int`` in ``[lo, hi]``; a bool, float or string is refused."""
    try:
        value = _value(config, key, default)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where}: {key} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{where}: {key}={value} must be {bound}")
    return value


def float_field(
    config: Mapping[str, Any],
    key: str,
    where: str,
    *,
    default: Any = _MISSING,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    """``config[key]`` as a finite ``float`` above ``lo`` (strictly with ``lo_open``) and up to ``hi``."""
    try:
        value = _value(config, key, default)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: {key} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: {key}={value} must be finite")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{where}: {key}={value} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{where}: {key}={value} must be <= {hi}")
    return value


def bool_field(config: Mapping[str, Any], key: str, where: str, *, default: Any = _MISSING) -> bool:
    try:
        value = _value(config, key, default)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: {key} must be true or false, got {value!r} ({type(value).__name__})")
    return bool(value)


def str_field(config: Mapping[str, Any], key: str, where: str, *, default: Any = _MISSING) -> str:
    try:
        value = _value(config, key, default)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key} must be a string, got {value!r} ({type(value).__name__})")
    return value


def size_field(
    config: Mapping[str, Any], key: str, where: str, *, default: Any = _MISSING, hi: int = MAX_IMAGE_SIDE
) -> int | tuple[int, int]:
    """An ``int`` or a pair of ints in ``[1, hi]`` (an image or patch size)."""
    try:
        value = _value(config, key, default)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{where}: {key} must be an integer or a pair of integers, got {value!r}")
        pair = {"h": value[0], "w": value[1]}
        return (
            int_field(pair, "h", f"{where}: {key}", lo=1, hi=hi),
            int_field(pair, "w", f"{where}: {key}", lo=1, hi=hi),
        )
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"{where}: {key} must be an integer or a pair of integers, got {value!r} ({type(value).__name__})"
        )
    return int_field({key: value}, key, where, lo=1, hi=hi)


def str_list(value: Any, key: str, where: str) -> tuple[str, ...]:
    """A JSON list of strings (class names): a string is not a list of its characters."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {key} must be a list of strings, got {value!r:.80}")
    return tuple(value)


def channel_stats(
    mean: Any, std: Any, channels: int, where: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation ``(mean, std)`` with one value per image channel of the model.

    One value serves every channel; three (RGB statistics) serve a
    1-channel model through their average (grayscale); ``std`` must be
    positive and every value finite.
    """
    out = []
    for name, values in (("mean", mean), ("std", std)):
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = (values,)
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{where}: {name} must be a list of numbers, got {values!r}")
        checked = [
            float_field({name: v}, name, where, lo=0.0 if name == "std" else None, lo_open=name == "std")
            for v in values
        ]
        if len(checked) == 1:
            checked = checked * channels
        elif len(checked) == 3 and channels == 1:
            checked = [sum(checked) / 3]
        if len(checked) != channels:
            raise ValueError(
                f"{where}: {name} has {len(values)} values {tuple(values)} but the model's images have"
                f" {channels} channel(s): give 1 or {channels} values"
            )
        out.append(tuple(checked))
    return out[0], out[1]


def check_image_pixels(width: int, height: int, where: str, limit: int = MAX_IMAGE_PIXELS) -> None:
    """Raises before an image of ``width x height`` pixels is decoded or resized to it."""
    if width * height > limit:
        raise ValueError(
            f"{where}: {width}x{height} pixels is more than the {limit} jaxvit decodes or resizes to"
            " (a decompression bomb, or an aspect ratio too extreme to resize)"
        )


# Keys of a Hugging Face config.json that give sizes, with (lowest, highest) values.
_HF_INTS = {
    "hidden_size": (1, MAX_WIDTH),
    "num_hidden_layers": (0, MAX_DEPTH),
    "num_attention_heads": (1, MAX_WIDTH),
    "intermediate_size": (1, MAX_MLP_DIM),
    "num_channels": (1, MAX_CHANNELS),
    "num_labels": (0, MAX_CLASSES),
    "projection_dim": (1, MAX_WIDTH),
}


def hf_config(config: Any, where: str = "config.json") -> dict[str, Any]:
    """A Hugging Face ``config.json`` with every value jaxvit reads checked for type and range.

    Sizes are integers in sane ranges, ``layer_norm_eps`` a positive number,
    ``image_size``/``patch_size`` positive ints or pairs; the same holds in a
    two-tower config's ``vision_config``. ``id2label`` must map the class
    indices ``'0'..'n-1'`` to strings, and agree with ``num_labels`` when
    both are given. Every HF family's folder is read through this.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{where} must hold a JSON object, got {type(config).__name__}")
    out = dict(config)
    for key, (lo, hi) in _HF_INTS.items():
        if key in config:
            out[key] = int_field(config, key, where, lo=lo, hi=hi)
    if "patch_size" in config:
        out["patch_size"] = size_field(config, "patch_size", where, hi=MAX_PATCH)
    if "image_size" in config:
        out["image_size"] = size_field(config, "image_size", where)
    if "layer_norm_eps" in config:
        out["layer_norm_eps"] = float_field(config, "layer_norm_eps", where, lo=0.0, hi=1.0, lo_open=True)
    for key in ("hidden_act", "model_type"):
        if key in config:
            out[key] = str_field(config, key, where)
    if "qkv_bias" in config:
        out["qkv_bias"] = bool_field(config, "qkv_bias", where)
    if config.get("architectures") is not None:
        out["architectures"] = list(str_list(config["architectures"], "architectures", where))
    if isinstance(config.get("vision_config"), Mapping):
        out["vision_config"] = hf_config(config["vision_config"], f"{where}: vision_config")
    elif config.get("vision_config") is not None:
        raise ValueError(f"{where}: vision_config must be a JSON object")
    id2label = config.get("id2label")
    if id2label:
        if not isinstance(id2label, Mapping):
            raise ValueError(f"{where}: id2label must be a JSON object of class indices to names")
        indices = []
        for k, v in id2label.items():
            if not isinstance(k, str) or not k.isdigit() or not isinstance(v, str):
                raise ValueError(
                    f"{where}: id2label must map class indices ('0', '1', ...) to names; got {k!r}: {v!r}"
                )
            indices.append(int(k))
        if len(indices) > MAX_CLASSES:
            raise ValueError(f"{where}: id2label has {len(indices)} classes, more than {MAX_CLASSES}")
        if sorted(indices) != list(range(len(indices))):
            raise ValueError(
                f"{where}: id2label keys must be 0..{len(indices) - 1}, got {sorted(indices)[:10]}"
            )
        if "num_labels" in config and out["num_labels"] != len(indices):
            raise ValueError(
                f"{where}: num_labels={out['num_labels']} but id2label names {len(indices)} classes"
            )
    return out
