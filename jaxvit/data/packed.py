"""Packed image shards: the on-disk format that ``jaxvit.pack`` writes, and a source that reads it.

A packed folder ``OUT`` holds, per split, ArrayRecord shards
``<split>-<k>-of-<n>.array_record`` (written with ``group_size:1``, so any
record is one random read) and one ``manifest.json``::

    {"format": "jaxvit-packed", "version": 1,
     "splits": {"train": {"class_names": [...], "num_examples": N,
                          "counts": [examples of class 0, ...],
                          "skipped": [unreadable files, relative to the split folder],
                          "shards": [{"file": ..., "num_records": n, "bytes": b, "sha256": hex}, ...]},
                "val": {...}}}

A record is ``label`` (uint32, little endian), ``len(name)`` (uint16), the
file's name relative to its split folder (UTF-8), then the file's bytes as
they were (JPEG, PNG, ...): nothing is re-encoded.

``PackedSource`` checks everything it is given before it is used: the
manifest's fields and types, that every shard is there with its size,
record count and SHA-256, and that train and val name the same classes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

FORMAT = "jaxvit-packed"
VERSION = 1
MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1"  # random access: a record is read without its neighbours
_HEADER = struct.Struct("<IH")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.array_record$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def encode_record(label: int, name: str, payload: bytes) -> bytes:
    """One example as a record: label, the file's relative name and its encoded bytes."""
    raw_name = name.encode("utf-8")
    return _HEADER.pack(label, len(raw_name)) + raw_name + payload


def decode_record(record: bytes) -> tuple[int, str, memoryview]:
    """A record -> ``(label, name, encoded image bytes)``; ``ValueError`` if it is cut short."""
    if len(record) < _HEADER.size:
        raise ValueError(f"a packed record of {len(record)} bytes is shorter than its header")
    label, name_len = _HEADER.unpack_from(record)
    end = _HEADER.size + name_len
    if len(record) < end:
        raise ValueError(
            f"a packed record of {len(record)} bytes is shorter than its name ({name_len} bytes)"
        )
    view = memoryview(record)
    return label, bytes(view[_HEADER.size : end]).decode("utf-8", "replace"), view[end:]


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------


def _expect(condition: bool, manifest_path: str, what: str) -> None:
    if not condition:
        raise ValueError(f"packed manifest {manifest_path!r} is not valid: {what}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_manifest(root: str) -> dict[str, Any]:
    """Reads and checks ``root/manifest.json``: every field's type, and that the counts add up.

    Raises ``FileNotFoundError`` when it is missing and ``ValueError`` naming the
    field that is wrong. Shard files are not opened here (see ``check_shards``).
    """
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no packed manifest at {path!r}: data.root must be a folder written by"
            " 'python -m jaxvit.pack ROOT OUT' (an interrupted pack writes the manifest only when it finishes)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"packed manifest {path!r} is not valid JSON: {err}") from err
    _expect(isinstance(manifest, dict), path, "expected a JSON object")
    _expect(
        manifest.get("format") == FORMAT and manifest.get("version") == VERSION,
        path,
        f"expected format {FORMAT!r} version {VERSION}, got {manifest.get('format')!r}"
        f" version {manifest.get('version')!r}",
    )
    splits = manifest.get("splits")
    _expect(isinstance(splits, dict) and splits, path, "'splits' must be a non-empty object")
    for split, info in splits.items():
        where = f"split {split!r}"
        _expect(isinstance(info, dict), path, f"{where} must be an object")
        names = info.get("class_names")
        _expect(
            isinstance(names, list) and names and all(isinstance(n, str) for n in names),
            path,
            f"{where}: 'class_names' must be a non-empty list of strings",
        )
        _expect(len(set(names)) == len(names), path, f"{where}: 'class_names' has duplicates")
        counts = info.get("counts")
        _expect(
            isinstance(counts, list) and len(counts) == len(names) and all(map(_is_int, counts)),
            path,
            f"{where}: 'counts' must hold one count per class ({len(names)})",
        )
        shards = info.get("shards")
        _expect(isinstance(shards, list) and shards, path, f"{where}: 'shards' must be a non-empty list")
        for shard in shards:
            _expect(
                isinstance(shard, dict)
                and isinstance(shard.get("file"), str)
                and _SHARD_NAME.match(shard["file"]) is not None
                and _is_int(shard.get("num_records"))
                and _is_int(shard.get("bytes"))
                and isinstance(shard.get("sha256"), str)
                and _SHA256.match(shard["sha256"]) is not None,
                path,
                f"{where}: shard entry {shard!r} needs 'file' (a name inside the folder, *.array_record),"
                " 'num_records', 'bytes' and 'sha256' (64 hex digits)",
            )
        total = sum(s["num_records"] for s in shards)
        _expect(
            info.get("num_examples") == total == sum(counts),
            path,
            f"{where}: num_examples {info.get('num_examples')!r}, the shards' records ({total}) and"
            f" the class counts ({sum(counts)}) differ",
        )
        _expect(
            isinstance(info.get("skipped", []), list), path, f"{where}: 'skipped' must be a list of names"
        )
    return manifest


def check_shards(root: str, split_info: dict[str, Any], verify_checksums: bool = True) -> list[str]:
    """The shard paths of one split, after checking that each exists with its size, record count and
    (``verify_checksums``) SHA-256. Raises ``FileNotFoundError`` / ``ValueError`` naming the shards."""
    from array_record.python.array_record_module import ArrayRecordReader

    shards = split_info["shards"]
    paths = [os.path.join(root, s["file"]) for s in shards]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} packed shard(s) named in the manifest are missing: {shown}")
    for shard, path in zip(shards, paths, strict=True):
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            raise ValueError(
                f"packed shard {path!r} has {size} bytes, the manifest says {shard['bytes']}:"
                " the file was changed or cut short; pack again"
            )
    if verify_checksums:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib frees the GIL
            digests = list(pool.map(file_sha256, paths))
        for shard, path, digest in zip(shards, paths, digests, strict=True):
            if digest != shard["sha256"]:
                raise ValueError(
                    f"packed shard {path!r} has SHA-256 {digest}, the manifest says {shard['sha256']}:"
                    " the file is damaged or from another pack; pack again"
                )
    for shard, path in zip(shards, paths, strict=True):
        reader = ArrayRecordReader(path)
        try:
            records = reader.num_records()
        finally:
            reader.close()
        if records != shard["num_records"]:
            raise ValueError(
                f"packed shard {path!r} holds {records} records, the manifest says {shard['num_records']}"
            )
    return paths


class PackedSource:
    """One split of a packed folder, read with random access through grain's ``ArrayRecordDataSource``.

    ``source[i] -> (uint8 (H, W, channels), label)``: the record is read and its
    image decoded when asked for, so with ``data.workers > 0`` both happen in
    grain's worker processes (the source pickles as paths; each worker opens the
    shards itself). ``other_split`` names a split whose class list must be the
    same (train against val). ``verify_checksums=False`` skips hashing the shards
    (their sizes and record counts are still checked).
    """

    def __init__(
        self,
        root: str,
        split: str,
        channels: int = 3,
        *,
        other_split: str | None = None,
        verify_checksums: bool = True,
    ):
        import grain

        manifest = load_manifest(root)
        splits = manifest["splits"]
        for name in (split, other_split):
            if name is not None and name not in splits:
                raise ValueError(
                    f"split {name!r} is not in the packed folder {root!r} (it has {sorted(splits)})"
                )
        info = splits[split]
        if other_split is not None:
            other = splits[other_split]["class_names"]
            if other != info["class_names"]:
                only_here = sorted(set(info["class_names"]) - set(other))
                only_there = sorted(set(other) - set(info["class_names"]))
                raise ValueError(
                    f"the packed manifest in {root!r} names other classes for {split!r} than for"
                    f" {other_split!r}: only in {split} {only_here}, only in {other_split} {only_there}"
                    + ("" if only_here or only_there else " (same names, other order)")
                )
        paths = check_shards(root, info, verify_checksums)
        self.root, self.split, self.channels = root, split, channels
        self.class_names: list[str] = list(info["class_names"])
        self.counts: list[int] = list(info["counts"])
        self.shard_paths = paths
        self._records = grain.sources.ArrayRecordDataSource(paths)
        if len(self._records) != info["num_examples"]:
            raise ValueError(
                f"packed split {split!r} in {root!r} holds {len(self._records)} records,"
                f" the manifest says {info['num_examples']}"
            )

    def __len__(self) -> int:
        return len(self._records)

    def read(self, index: int) -> tuple[int, str, memoryview]:
        """The raw record ``index``: ``(label, name, encoded bytes)``, with the label checked."""
        label, name, payload = decode_record(self._records[index])
        if label >= len(self.class_names):
            raise ValueError(
                f"record {index} ({name!r}) of the packed split {self.split!r} in {self.root!r} has label"
                f" {label}, but the manifest names {len(self.class_names)} classes"
            )
        return label, name, payload

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        from jaxvit.data.images import decode_image

        label, name, payload = self.read(index)
        where = f"{self.split}/{name} in {self.root}"
        return decode_image(io.BytesIO(payload), self.channels, where), label
