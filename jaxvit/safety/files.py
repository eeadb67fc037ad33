"""Reading and writing checkpoint files without unpickling anything.

The file kind is told from the first bytes, not the name: a zip archive of
``.npy`` members is an ``.npz``; a zip holding ``data.pkl`` or a bare pickle is
a PyTorch file (read only with ``torch.load(weights_only=True)``, and only when
PyTorch is installed); an 8-byte length followed by ``{`` is safetensors.
Every failure is a ``ValueError`` naming the file and what went wrong.

Only regular files are opened (``validate.open_regular``). ``.npz`` members
and safetensors tensors are read from their headers first: a declared size
is checked against the bytes behind it and against ``validate.MAX_EXPANSION``
times the file's size before anything is allocated.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxvit.safety import validate

# A checkpoint's arrays by flat key.
Flat = dict[str, np.ndarray]


def _is_zip(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06")


def sniff(path: str | os.PathLike) -> str:
    """``"npz"``, ``"torch"``, ``"pickle"`` or ``"safetensors"`` from the file's first bytes."""
    path = Path(path)
    with validate.open_regular(path, "checkpoint") as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
        if _is_zip(head):
            try:
                with zipfile.ZipFile(f) as z:
                    names = z.namelist()
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise ValueError(
                    f"could not read {path}: the zip archive is truncated or corrupt ({type(e).__name__}: {e})"
                ) from None
            if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                return "torch"
            return "npz"
    # Safetensors first: its 8-byte header length may well start with the byte 0x80.
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and header_len < size:
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
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


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` member: header first, then exactly the bytes it declares."""
    key = info.filename[: -len(".npy")]
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f".npy format version {version} is not supported")
        except ValueError as e:
            raise ValueError(
                f"could not read {path}: member {info.filename!r} has no valid .npy header ({e})"
            ) from None
        if dtype.hasobject:
            raise ValueError(
                f"{path} holds an object array under key {key!r}; jaxvit refuses to unpickle"
                " it (np.load(allow_pickle=False)). Save plain numeric arrays instead."
            )
        nbytes = validate.array_bytes(shape, dtype.itemsize)
        if nbytes > info.file_size:
            raise ValueError(
                f"could not read {path}: member {info.filename!r} declares shape {shape} {dtype} ({nbytes} bytes)"
                f" but holds only {info.file_size} bytes: the .npz is truncated or corrupt"
            )
        buffer = bytearray(nbytes)
        got = member.readinto(buffer) if nbytes else 0
        while got < nbytes:
            more = member.readinto(memoryview(buffer)[got:])
            if not more:
                raise ValueError(
                    f"could not read {path}: member {info.filename!r} ends after {got} of its {nbytes} bytes:"
                    " the .npz is truncated or corrupt"
                )
            got += more
    array = np.frombuffer(buffer, dtype=dtype)
    array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    return _fix_dtype(array)


def read_npz(path: str | os.PathLike) -> Flat:
    """All arrays of an ``.npz``: only ``.npy`` members, never unpickled, sizes checked first."""
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
        with validate.open_regular(path, "checkpoint") as f, zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise ValueError(
                        f"{path}: member {info.filename!r} is not an .npy array; an .npz holds only .npy members"
                    )
            validate.check_zip_expansion(path, infos, os.fstat(f.fileno()).st_size)
            for info in infos:
                key = info.filename[: -len(".npy")]
                if key in out:
                    raise ValueError(f"{path}: member {info.filename!r} appears twice")
                out[key] = _read_member(path, archive, info)
    except (
        zipfile.BadZipFile,
        EOFError,
        OSError,
        struct.error,
        zipfile.LargeZipFile,
        NotImplementedError,
    ) as e:
        raise ValueError(
            f"could not read {path}: the .npz is truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"could not read {path}: the .npz is truncated or corrupt ({e})") from None
    return out


# safetensors dtype names -> NumPy dtypes (little-endian). Others (float8, complex, ...) are refused.
def _safetensors_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    names = {
        "F16": "<f2",
        "F32": "<f4",
        "F64": "<f8",
        "I8": "i1",
        "I16": "<i2",
        "I32": "<i4",
        "I64": "<i8",
        "U8": "u1",
        "U16": "<u2",
        "U32": "<u4",
        "U64": "<u8",
        "BOOL": "?",
    }
    out = {k: np.dtype(v) for k, v in names.items()}
    out["BF16"] = np.dtype(ml_dtypes.bfloat16)
    return out


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"could not read {path}: the safetensors file is truncated or corrupt ({why})")


def read_safetensors(path: str | os.PathLike) -> tuple[Flat, dict[str, str]]:
    """``(arrays, metadata)`` of a safetensors file, read from its header with every offset checked."""
    path = Path(path)
    dtypes = _safetensors_dtypes()
    with validate.open_regular(path, "checkpoint") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > validate.MAX_HEADER_BYTES:
            raise _corrupt(path, f"a header of {header_len} bytes in a file of {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise _corrupt(path, f"the header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise _corrupt(path, "the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise _corrupt(path, "__metadata__ is not a mapping of strings to strings")
        start, data_len = 8 + header_len, size - 8 - header_len
        spans = []
        for key, entry in header.items():
            if not isinstance(entry, dict):
                raise _corrupt(path, f"the entry of tensor {key!r} is not an object")
            name = entry.get("dtype")
            if name not in dtypes:
                raise ValueError(
                    f"{path}: tensor {key!r} has dtype {name!r}, which jaxvit does not read"
                    f" (expected one of {sorted(dtypes)})"
                )
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
            ):
                raise _corrupt(path, f"tensor {key!r} has shape {shape!r}")
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len
            ):
                raise _corrupt(path, f"tensor {key!r} has data_offsets {offsets!r} for {data_len} data bytes")
            dtype = dtypes[name]
            if offsets[1] - offsets[0] != validate.array_bytes(shape, dtype.itemsize):
                raise _corrupt(
                    path,
                    f"tensor {key!r} of shape {shape} {name} does not fill its {offsets[1] - offsets[0]} bytes",
                )
            spans.append((offsets[0], offsets[1], key, dtype, shape))
        spans.sort(key=lambda s: (s[0], s[1]))
        for (_, end, key, *_), (begin, _, other, *_) in zip(spans, spans[1:], strict=False):
            if begin < end:
                raise _corrupt(path, f"tensors {key!r} and {other!r} overlap")
        arrays: Flat = {}
        for begin, end, key, dtype, shape in spans:
            f.seek(start + begin)
            buffer = bytearray(end - begin)
            if f.readinto(buffer) != len(buffer):
                raise _corrupt(path, f"tensor {key!r} is cut off")
            arrays[key] = np.frombuffer(buffer, dtype=dtype).reshape(shape)
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


def _tensor_to_numpy(torch, path: Path, key: str, tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.to(torch.float32).numpy()
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError):  # a dtype NumPy has no counterpart for (float8, ...)
        raise ValueError(
            f"{path}: tensor {key!r} has dtype {tensor.dtype}, which jaxvit does not read"
        ) from None


def read_torch(path: str | os.PathLike) -> Flat:
    """A PyTorch state dict, read with ``torch.load(weights_only=True)``.

    A dict wrapping the state dict under ``"state_dict"``, ``"model"`` or
    ``"state_dict_ema"`` is unwrapped. Tensors keep their dtype (bfloat16
    becomes float32), so that ``jaxvit.checkpoints.fitting`` can refuse non-float weights.
    A TorchScript archive (``constants.pkl``) is refused from its zip listing.
    """
    path = Path(path)
    with validate.open_regular(path, "checkpoint") as f:
        size = os.fstat(f.fileno()).st_size
        if _is_zip(f.read(4)):
            try:
                f.seek(0)
                with zipfile.ZipFile(f) as z:
                    validate.check_zip_expansion(path, z.infolist(), size)
                    names = z.namelist()
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise ValueError(
                    f"could not read {path}: the zip archive is truncated or corrupt ({type(e).__name__}: {e})"
                ) from None
            # Told before PyTorch is asked: torch.load would hand such a file to torch.jit.load.
            if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
                raise ValueError(
                    f"{path} is a TorchScript archive (torch.jit.save: code/ and constants.pkl, as OpenAI's"
                    " CLIP .pt files are), which jaxvit refuses: loading it runs the code it holds. Save the"
                    " model's state_dict() as safetensors where you trust the file, then read that"
                )
        torch = _import_torch(path)
        f.seek(0)
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
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
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k: _tensor_to_numpy(torch, path, k, v) for k, v in obj.items()}


def read_weights(path: str | os.PathLike) -> tuple[str, Flat, dict[str, str]]:
    """``(kind, arrays, metadata)`` of one weights file of any supported kind."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if validate.is_regular_file(path) and path.stat().st_size == 0:
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


def read_folder_weights(
    folder: str | os.PathLike, names: Sequence[str]
) -> tuple[Path, Flat, dict[str, str]] | None:
    """``(path, arrays, metadata)`` of the first of ``names`` in ``folder`` (safetensors, else a
    PyTorch file), opened through ``validate.member_path``; None when there is none of them."""
    folder = Path(folder)
    for name in names:
        if (folder / name).exists():
            path = validate.member_path(folder, name, "weights file")
            if path.suffix == ".safetensors":
                return (path, *read_safetensors(path))
            return path, read_torch(path), {}
    return None


def write_safetensors(arrays: Mapping[str, np.ndarray], path: str | os.PathLike, metadata=None) -> None:
    """Write float arrays as safetensors; ``metadata`` values must be strings.

    The file gets the permissions of any new file (``0666`` less the umask).
    """
    from safetensors.numpy import save_file

    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    save_file(contiguous, str(path), metadata={"format": "pt", **(metadata or {})})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path`` (a regular file), with a clear error for broken files."""
    return validate.read_json_object(path)


def read_hf_folder(folder: str | os.PathLike) -> tuple[Flat, dict]:
    """``(arrays, config)`` of a Hugging Face ``save_pretrained`` folder.

    The weights are ``model.safetensors``, its shards (named in
    ``model.safetensors.index.json``) or ``pytorch_model.bin``. Every file is
    opened through ``validate.member_path``: a shard that the index names
    outside the folder (``..``, an absolute path, a link out of it) is refused
    before it is opened.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{folder} is a folder without config.json: expected a Hugging Face folder"
            " (config.json + model.safetensors, as save_pretrained writes them)"
        )
    config = read_json(validate.member_path(folder, "config.json", "config file"))
    arrays: Flat = {}
    index = folder / "model.safetensors.index.json"
    if index.exists():
        index_path = validate.member_path(folder, index.name, "index file")
        weight_map = read_json(index_path).get("weight_map", {})
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(
                f"{index_path}: weight_map must be a non-empty JSON object of tensor names to shards"
            )
        shards = sorted({validate.member_path(folder, s, "shard") for s in weight_map.values()})
        for shard in shards:
            for key, value in read_safetensors(shard)[0].items():
                if key in arrays:
                    raise ValueError(f"{shard}: tensor {key!r} is also in another shard")
                arrays[key] = value
    elif (folder / "model.safetensors").exists():
        arrays = read_safetensors(validate.member_path(folder, "model.safetensors", "weights file"))[0]
    elif (folder / "pytorch_model.bin").exists():
        arrays = read_torch(validate.member_path(folder, "pytorch_model.bin", "weights file"))
    else:
        raise FileNotFoundError(f"{folder} has config.json but no model.safetensors (nor pytorch_model.bin)")
    return arrays, validate.hf_config(config, str(config_path))
