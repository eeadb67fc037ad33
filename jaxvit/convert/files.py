"""Reading and writing checkpoint files without unpickling anything.

The file kind is told from the first bytes, not the name: a zip archive of
``.npy`` members is an ``.npz``; a zip holding ``data.pkl`` or a bare pickle is
a PyTorch file (read only with ``torch.load(weights_only=True)``, and only when
PyTorch is installed); an 8-byte length followed by ``{`` is safetensors.
Every failure is a ``ValueError`` naming the file and what went wrong.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxvit.convert.checkpoint import Flat


def sniff(path: str | os.PathLike) -> str:
    """``"npz"``, ``"torch"``, ``"pickle"`` or ``"safetensors"`` from the file's first bytes."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(
                f"could not read {path}: the zip archive is truncated or corrupt ({type(e).__name__}: {e})"
            ) from None
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch"
        return "npz"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and header_len < os.path.getsize(path):
            return "safetensors"
    raise ValueError(
        f"{path} is not a checkpoint jaxvit can read: expected an .npz archive, a safetensors file,"
        " a PyTorch .pth/.bin file or a Hugging Face folder"
    )


def _fix_dtype(array: np.ndarray) -> np.ndarray:
    # bfloat16 arrays saved by np.savez come back as raw 2-byte voids.
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        import ml_dtypes

        return array.view(ml_dtypes.bfloat16)
    return array


def read_npz(path: str | os.PathLike) -> Flat:
    """All arrays of an ``.npz``, read with ``allow_pickle=False``."""
    path = Path(path)
    kind = sniff(path)
    if kind in ("pickle", "torch"):
        raise ValueError(
            f"{path} is a pickle ({'PyTorch ' if kind == 'torch' else ''}file), not an .npz archive;"
            " jaxvit never unpickles .npz files (np.load(allow_pickle=False))"
        )
    if kind != "npz":
        raise ValueError(f"{path} is a {kind} file, not an .npz archive")
    out: Flat = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                try:
                    out[key] = _fix_dtype(archive[key])
                except ValueError as e:
                    if "allow_pickle" in str(e) or "Object arrays" in str(e):
                        raise ValueError(
                            f"{path} holds an object array under key {key!r}; jaxvit refuses to unpickle"
                            " it (np.load(allow_pickle=False)). Save plain numeric arrays instead."
                        ) from None
                    raise
    except (zipfile.BadZipFile, EOFError, OSError, struct.error, zipfile.LargeZipFile) as e:
        raise ValueError(
            f"could not read {path}: the .npz is truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"could not read {path}: the .npz is truncated or corrupt ({e})") from None
    return out


def read_safetensors(path: str | os.PathLike) -> tuple[Flat, dict[str, str]]:
    """``(arrays, metadata)`` of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            arrays = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        # bfloat16 tensors cannot become NumPy arrays through safetensors; go through torch.
        if "bfloat16" in str(e) or "BF16" in str(e):
            return _read_safetensors_via_torch(path)
        raise ValueError(
            f"could not read {path}: the safetensors file is truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    return arrays, metadata


def _read_safetensors_via_torch(path: Path) -> tuple[Flat, dict[str, str]]:
    torch = _import_torch(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        arrays = {key: f.get_tensor(key).to(torch.float32).numpy() for key in f.keys()}  # noqa: SIM118
    return arrays, metadata


def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{path} is a PyTorch file; reading it needs PyTorch (pip install torch), which is not installed."
            " Convert it to safetensors to read it without PyTorch."
        ) from None
    return torch


def read_torch(path: str | os.PathLike) -> Flat:
    """A PyTorch state dict, read with ``torch.load(weights_only=True)``.

    A dict wrapping the state dict under ``"state_dict"``, ``"model"`` or
    ``"state_dict_ema"`` is unwrapped.
    """
    path = Path(path)
    torch = _import_torch(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"could not read {path} with torch.load(weights_only=True): it is truncated, corrupt or holds"
            f" objects other than tensors, which jaxvit refuses to unpickle ({type(e).__name__}: {message})"
        ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "state_dict_ema"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}


def read_weights(path: str | os.PathLike) -> tuple[str, Flat, dict[str, str]]:
    """``(kind, arrays, metadata)`` of one weights file of any supported kind."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty")
    kind = sniff(path)
    if kind == "npz":
        return kind, read_npz(path), {}
    if kind == "safetensors":
        arrays, metadata = read_safetensors(path)
        return kind, arrays, metadata
    if path.suffix == ".npz":
        read_npz(path)  # raises the pickle-in-an-npz error
    return "torch", read_torch(path), {}


def write_safetensors(arrays: Mapping[str, np.ndarray], path: str | os.PathLike, metadata=None) -> None:
    """Write float arrays as safetensors; ``metadata`` values must be strings."""
    from safetensors.numpy import save_file

    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    save_file(contiguous, str(path), metadata={"format": "pt", **(metadata or {})})


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``, with a clear error for broken files."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"could not parse {path} as JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_hf_folder(folder: str | os.PathLike) -> tuple[Flat, dict]:
    """``(arrays, config)`` of a Hugging Face ``save_pretrained`` folder.

    The weights are ``model.safetensors``, its shards (named in
    ``model.safetensors.index.json``) or ``pytorch_model.bin``.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{folder} is a folder without config.json: expected a Hugging Face folder"
            " (config.json + model.safetensors, as save_pretrained writes them)"
        )
    config = read_json(config_path)
    arrays: Flat = {}
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        for shard in shards:
            arrays.update(read_safetensors(folder / shard)[0])
    elif (folder / "model.safetensors").exists():
        arrays = read_safetensors(folder / "model.safetensors")[0]
    elif (folder / "pytorch_model.bin").exists():
        arrays = read_torch(folder / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{folder} has config.json but no model.safetensors (nor pytorch_model.bin)")
    return arrays, config
