"""Input pipeline throughput: jaxvit's imagefolder vs packed ArrayRecord shards vs timm's loader.

    python benchmarks/input_pipeline.py --images 3000 --repeats 5

Generates ``--images`` JPEGs (500x375, quality 90, 10 classes) in a temporary
folder (or uses ``--data DIR`` with ``DIR/train/<class>/*``), packs them with
``jaxvit.pack``, and times three loaders producing the same training batches
(``--batch`` images at 224 px: random resized crop, horizontal flip,
RandAugment 2 ops at magnitude 10, normalised float32):

* ``imagefolder``: the per-example map and batching of ``jaxvit.data.pipeline.train_batches`` over ``ImageFolderSource``,
* ``arrayrecord``: the same over ``PackedSource`` (the packed shards),
* ``timm``: ``timm.data.create_loader`` (``auto_augment="rand-m10-n2"``) over
  ``timm.data.ImageDataset`` on the same folder.

This process does exactly one worker's job for each loader (read, decode,
augment, collate: grain's per-example map and batching; timm's dataset
``__getitem__`` and ``default_collate``), and the loaders are timed
alternately in rounds of ``--batches-per-round`` batches after a warm-up
round. Worker processes are not timed: they prefetch far ahead in the
background, so a short interleaved timing would credit one loader with work
done while another was timed. The table reports
images/s per worker (median over rounds), and the bytes read per
image: ``rchar`` of ``/proc/self/io`` (bytes through read system calls) while
one process loads ``--io-images`` examples through each loader's read path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def make_jpegs(root: str, count: int, classes: int = 10, size: tuple[int, int] = (500, 375)) -> None:
    """``count`` photo-like JPEGs (smooth gradients plus noise, quality 90) in ``root/train/<class>/``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        label = i % classes
        folder = os.path.join(root, "train", f"class_{label:02d}")
        os.makedirs(folder, exist_ok=True)
        a, b, c = rng.uniform(0.005, 0.03, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b + label), np.sin((xx + yy) * c)], -1)
        pixels = (base * 90 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    for label in range(classes):  # pack needs a val split with the same classes
        folder = os.path.join(root, "val", f"class_{label:02d}")
        os.makedirs(folder, exist_ok=True)
        src = os.path.join(root, "train", f"class_{label:02d}", f"{label:06d}.jpg")
        with open(src, "rb") as f, open(os.path.join(folder, "0.jpg"), "wb") as g:
            g.write(f.read())


def rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def bytes_read_per_image(load_one, count: int, total: int) -> float:
    """Mean bytes through read() per example while ``load_one(i)`` loads ``count`` spread-out examples."""
    step = max(1, total // count)
    indices = [(i * step) % total for i in range(count)]
    load_one(indices[0])  # first-time opens and imports
    before = rchar()
    for i in indices:
        load_one(i)
    return (rchar() - before) / count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--data", default="", help="an existing ROOT with train/<class>/* (else generated)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches-per-round", type=int, default=4)
    parser.add_argument("--io-images", type=int, default=200)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    machine_load = os.getloadavg()[0]  # before anything of ours runs

    import numpy as np
    import timm
    import timm.data
    import torch

    from jaxvit import pack
    from jaxvit.data import packed
    from jaxvit.data import pipeline as data

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="input_pipeline_")
    root = args.data or os.path.join(tmp, "images")
    if not args.data:
        start = time.perf_counter()
        make_jpegs(root, args.images)
        print(f"generated {args.images} JPEGs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    out = os.path.join(tmp, "packed")
    start = time.perf_counter()
    manifest = pack.pack(root, out, progress=False)
    pack_s = time.perf_counter() - start
    train_info = manifest["splits"]["train"]
    num_images = train_info["num_examples"]

    folder_source = data.ImageFolderSource(root, "train")
    packed_source = packed.PackedSource(out, "train")
    pre = data.Preprocess(
        image_size=(224, 224),
        random_resized_crop=True,
        flip=True,
        randaugment_num_ops=2,
        randaugment_magnitude=10.0,
    )
    layout = data.BatchLayout(args.batch)
    timm_dataset = timm.data.ImageDataset(os.path.join(root, "train"))
    timm_loader = timm.data.create_loader(
        timm_dataset,
        input_size=(3, 224, 224),
        batch_size=args.batch,
        is_training=True,
        use_prefetcher=False,
        scale=(0.08, 1.0),
        hflip=0.5,
        auto_augment="rand-m10-n2",
        num_workers=0,
    )

    # This process does one worker's whole job (read, decode, augment, collate), with nothing
    # running in the background: grain's iterators prefetch in threads and worker processes far
    # ahead, which would credit one loader with work done while another is timed.
    examples = {
        name: data._TrainExample(source, layout, pre, seed=0)
        for name, source in (("imagefolder", folder_source), ("arrayrecord", packed_source))
    }
    names = ("imagefolder", "arrayrecord", "timm")
    position = {name: 0 for name in names}

    def worker_job(name: str):
        def run():
            for _ in range(args.batches_per_round):
                start = position[name]
                position[name] += args.batch
                indices = [i % num_images for i in range(start, start + args.batch)]
                if name == "timm":
                    batch = torch.utils.data.default_collate([timm_loader.dataset[i] for i in indices])
                    assert tuple(batch[0].shape) == (args.batch, 3, 224, 224)
                else:
                    items = [examples[name].map(i) for i in indices]
                    images = np.stack([item["image"] for item in items])
                    assert images.shape == (args.batch, 224, 224, 3)

        return run

    times = common.interleaved({n: worker_job(n) for n in names}, repeats=args.repeats, warmup=1)

    # bytes through read() per image, in this process, along each loader's read path
    timm_plain = timm.data.ImageDataset(os.path.join(root, "train"), transform=timm_loader.dataset.transform)
    io_bytes = {
        "imagefolder": bytes_read_per_image(lambda i: folder_source[i], args.io_images, num_images),
        "arrayrecord": bytes_read_per_image(lambda i: packed_source[i], args.io_images, num_images),
        "timm": bytes_read_per_image(lambda i: timm_plain[i], args.io_images, num_images),
    }
    file_bytes = np.mean([os.path.getsize(p) for p in folder_source.files])
    shard_bytes = sum(s["bytes"] for s in train_info["shards"]) / num_images
    stored = {"imagefolder": file_bytes, "arrayrecord": shard_bytes, "timm": file_bytes}

    rows = []
    for name, per_round in times.items():
        rate = args.batch * args.batches_per_round / common.median(per_round)
        rows.append(
            {
                "loader": name,
                "img/s per worker": rate,
                "min..max img/s": f"{args.batch * args.batches_per_round / max(per_round):.3g}.."
                f"{args.batch * args.batches_per_round / min(per_round):.3g}",
                "bytes read per image": round(io_bytes[name]),
                "bytes stored per image": round(stored[name]),
            }
        )
    cpu = common.cpu_model()
    cores = len(os.sched_getaffinity(0))
    peak = common.matmul_peaks()  # so this table can be set beside the step-time tables of the same host
    caption = (
        f"{num_images} JPEGs 500x375 q90, batch {args.batch}, 224 px, RRC + flip + RandAugment(2, 10),"
        f" in-process (one worker's job), {cpu}, {cores} cores, load {machine_load:.2f} at start,"
        f" fp32 2048^3 matmul peak jax {peak['jax']:.0f} / torch {peak['torch']:.0f} GFLOP/s,"
        f" {time.strftime('%Y-%m-%d')}"
    )
    print(caption)
    print()
    print(common.markdown_table(rows))
    print()
    print(
        f"pack: {num_images} images in {pack_s:.1f} s ({num_images / pack_s:.0f} img/s),"
        f" {len(train_info['shards'])} shard(s), {shard_bytes * num_images / 2**20:.1f} MiB"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"caption": caption, "rows": rows, "pack_s": pack_s}, f, indent=1)


if __name__ == "__main__":
    main()
