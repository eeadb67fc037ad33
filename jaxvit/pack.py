"""Pack an image folder into ArrayRecord shards: ``python -m jaxvit.pack ROOT OUT``.

``ROOT/<split>/<class>/*`` (splits ``train`` and ``val`` by default) become
``OUT/<split>-<k>-of-<n>.array_record`` shards plus ``OUT/manifest.json``
(format in ``jaxvit.data.packed``); train with ``--config.dataset=arrayrecord
--config.data.root=OUT``. Files are stored as they are (no re-encoding);
files Pillow cannot read are skipped and counted in one warning, or stop the
pack with ``--on-corrupt=error``, as with ``dataset="imagefolder"``.

Streaming: files are read one at a time, and the file list is never held
whole (each class folder is listed when it is reached), so memory does not
grow with the number of images.

Resumable: shard ``k`` always holds the ``k``-th run of ``--shard-size``
files in sorted (class, file) order. Each shard is written to a temporary
file, renamed when complete, and then recorded in ``OUT/.pack/``; a rerun of
the same command skips the recorded shards and writes the rest, so an
interrupted pack ends with exactly the shards of an uninterrupted one. The
manifest is written last. A rerun on a ``ROOT`` whose file list changed (or
with another ``--shard-size``) fails instead of mixing two packs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from jaxvit.data import packed
from jaxvit.data import pipeline as data

log = logging.getLogger(__name__)
STATE_DIR = ".pack"


def _candidates(split_dir: str, class_names: Sequence[str]) -> Iterator[tuple[int, str, str]]:
    """``(label, name relative to split_dir, path)`` for every file, in sorted (class, file) order."""
    for label, name in enumerate(class_names):
        for path in data.list_class_files(os.path.join(split_dir, name)):
            yield label, f"{name}/{os.path.basename(path)}", path


def _plan_split(split_dir: str) -> dict[str, Any]:
    """Class names, file count and a hash of the file list: what a resumed pack must find again."""
    class_names = data.list_classes(split_dir)
    digest = hashlib.sha256()
    per_class = [0] * len(class_names)
    for label, name, _ in _candidates(split_dir, class_names):
        digest.update(f"{label}\t{name}\n".encode())
        per_class[label] += 1
    for name, count in zip(class_names, per_class, strict=True):
        if count == 0:
            raise ValueError(f"class {name!r} has no readable images in {os.path.join(split_dir, name)!r}")
    return {"class_names": class_names, "num_files": sum(per_class), "listing_sha256": digest.hexdigest()}


def _write_json(path: str, value: Any) -> None:
    """Writes ``value`` as JSON so that ``path`` is either the old file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(
    out: str, file_name: str, items: Sequence[tuple[int, str, str]], num_classes: int, bar: tqdm
) -> dict[str, Any]:
    """Writes one shard from ``items`` (label, name, path); returns its record for the state dir."""
    from array_record.python.array_record_module import ArrayRecordWriter

    final = os.path.join(out, file_name)
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    counts, skipped = [0] * num_classes, []
    writer = ArrayRecordWriter(tmp, packed.WRITER_OPTIONS)
    try:
        for label, name, path in items:
            with open(path, "rb") as f:
                payload = f.read()
            if data.is_image(io.BytesIO(payload)):
                writer.write(packed.encode_record(label, name, payload))
                counts[label] += 1
            else:
                skipped.append(name)
            bar.update(1)
    finally:
        writer.close()
    size = os.path.getsize(tmp)
    digest = packed.file_sha256(tmp)
    os.replace(tmp, final)
    return {
        "file": file_name,
        "num_records": sum(counts),
        "bytes": size,
        "sha256": digest,
        "counts": counts,
        "skipped": skipped,
    }


def _chunks(items: Iterator[tuple[int, str, str]], size: int) -> Iterator[list[tuple[int, str, str]]]:
    chunk: list[tuple[int, str, str]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_plan(root: str, out: str, splits: Sequence[str], shard_size: int) -> dict[str, Any]:
    """The file list of each split, checked against the other splits and against an unfinished pack."""
    plans = {split: _plan_split(os.path.join(root, split)) for split in splits}
    first = splits[0]
    for split in splits[1:]:
        a, b = plans[first]["class_names"], plans[split]["class_names"]
        if a != b:
            raise ValueError(
                f"{first} and {split} classes differ in {root!r}: only in {first} {sorted(set(a) - set(b))},"
                f" only in {split} {sorted(set(b) - set(a))}"
            )
    plan = {"shard_size": shard_size, "splits": plans}

    state_dir = os.path.join(out, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    plan_path = os.path.join(state_dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous != plan:
            raise ValueError(
                f"{out!r} holds a pack of another file list or shard size (the files under {root!r}"
                " changed since it started, or --shard-size differs); remove it or choose another OUT"
            )
    else:
        _write_json(plan_path, plan)
    return plans


def _pack_split(
    root: str, out: str, split: str, plan: dict[str, Any], shard_size: int, on_corrupt: str, bar: Any
) -> dict[str, Any]:
    """Writes (or, after an interruption, keeps) the shards of one split; returns its manifest entry."""
    split_dir = os.path.join(root, split)
    class_names = plan["class_names"]
    num_shards = math.ceil(plan["num_files"] / shard_size)
    shards = []
    items = _candidates(split_dir, class_names)
    for index, chunk in enumerate(_chunks(items, shard_size)):
        file_name = packed.shard_name(split, index, num_shards)
        record_path = os.path.join(out, STATE_DIR, file_name + ".json")
        if os.path.exists(record_path) and os.path.exists(os.path.join(out, file_name)):
            with open(record_path, encoding="utf-8") as f:
                shards.append(json.load(f))
            bar.update(len(chunk))
            continue
        record = _write_shard(out, file_name, chunk, len(class_names), bar)
        if on_corrupt == "error" and record["skipped"]:
            os.remove(os.path.join(out, file_name))
            data.report_skipped([os.path.join(split_dir, s) for s in record["skipped"]], split_dir, "error")
        _write_json(record_path, record)
        shards.append(record)
    counts = [sum(c) for c in zip(*(s["counts"] for s in shards), strict=True)]
    for name, count in zip(class_names, counts, strict=True):
        if count == 0:
            raise ValueError(f"class {name!r} has no readable images in {os.path.join(split_dir, name)!r}")
    skipped = [name for s in shards for name in s["skipped"]]
    data.report_skipped([os.path.join(split_dir, s) for s in skipped], split_dir, "skip")
    return {
        "class_names": class_names,
        "num_examples": sum(counts),
        "counts": counts,
        "skipped": skipped,
        "shards": [{k: s[k] for k in ("file", "num_records", "bytes", "sha256")} for s in shards],
    }


def pack(
    root: str,
    out: str,
    splits: Sequence[str] = ("train", "val"),
    shard_size: int = 1024,
    on_corrupt: str = "skip",
    progress: bool = True,
) -> dict[str, Any]:
    """Packs ``root/<split>/<class>/*`` for each split into ``out``; returns the manifest.

    Raises before writing anything when a split folder is missing or empty, a
    class has no files, the splits name different classes, or ``out`` holds an
    unfinished pack of another file list or shard size.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if on_corrupt not in ("skip", "error"):
        raise ValueError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct names, got {list(splits)}")
    plans = _check_plan(root, out, splits, shard_size)
    total = sum(p["num_files"] for p in plans.values())
    manifest: dict[str, Any] = {"format": packed.FORMAT, "version": packed.VERSION, "splits": {}}
    with tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True, file=sys.stderr) as bar:
        for split in splits:
            bar.set_description(split)
            manifest["splits"][split] = _pack_split(
                root, out, split, plans[split], shard_size, on_corrupt, bar
            )
    _write_json(os.path.join(out, packed.MANIFEST), manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxvit.pack",
        description="Pack ROOT/<split>/<class>/* images into ArrayRecord shards in OUT (rerun to resume).",
    )
    parser.add_argument("root", help="folder with one sub-folder per split, each with one folder per class")
    parser.add_argument("out", help="output folder (created); rerunning the same command resumes")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="split folders to pack")
    parser.add_argument("--shard-size", type=int, default=1024, help="files per shard (default 1024)")
    parser.add_argument("--on-corrupt", choices=("skip", "error"), default="skip")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        manifest = pack(
            args.root, args.out, args.splits, args.shard_size, args.on_corrupt, not args.no_progress
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, info in manifest["splits"].items():
        print(
            f"{split}: {info['num_examples']} images of {len(info['class_names'])} classes in"
            f" {len(info['shards'])} shard(s), {len(info['skipped'])} unreadable file(s) skipped"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
