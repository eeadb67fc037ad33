"""NaFlex training against the fixed-size path at the same token count per step, on this host.

    python benchmarks/naflex.py --variant Ti/16 --max-tokens 4096 --seq-lens 64 144 256 --repeats 3

Both run jaxvit's own ``train_lib.train_step`` (AdamW, jitted, the state donated) on one model
with a 16x16 position table (``posemb_grid=16``):

* **fixed**: the same kind of photos squashed to the square of the longest length's grid (256
  patches: 256 px at /16), batch ``max_tokens // 256``, as ``(N, H, W, C)`` images;
* **NaFlex**: photos of common aspect ratios (4:3, 3:4, 16:9, 9:16, 3:2, 1:1; 160-640 px sides),
  each resized to the largest grid within the step's length (``jaxvit.data.naflex``), batches of
  ``max_tokens // L`` sequences; each length is timed on its own batches.

It reports training images/s, patch tokens/s (real patches, not padding), the share of padding
slots, and the host-side preparation time per batch (resize + patchify, one process), with the
machine and the fp32 matmul peak measured in the same run. Padding comes from the grid rounding
of each image: the search stops at the largest scale whose grid ``h x w`` fits in ``L``, and the
next scale adds a row, a column or both, which do not fit, so ``L - h*w <= h + w`` slots stay
empty: a share below ``(h + w) / L``, about ``2 / sqrt(L)`` for images near square, and zero
for square images at square lengths.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

ASPECTS = ((4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (1, 1))


def photos(count: int, seed: int):
    """``count`` random uint8 images of the common aspect ratios, PIL, 160-640 px on the long side."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = ASPECTS[i % len(ASPECTS)]
        long = int(rng.integers(160, 641))
        size = (long, max(1, long * h // w)) if w >= h else (max(1, long * w // h), long)
        out.append(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="Ti/16")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[64, 144, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    threads = common.pin_threads(args.threads)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    import jaxvit
    from jaxvit.data import naflex
    from jaxvit.data.augment import normalize
    from jaxvit.training import optim, train_lib
    from jaxvit.training.configs import base_config

    model = jaxvit.create_model(args.variant, num_classes=100, posemb_grid=16, class_token=False, pool="gap")
    patch = model.patch_size
    config = base_config()
    tx, schedule = optim.make_optimizer(config, 1000, depth=model.depth)
    step = jax.jit(
        functools.partial(
            train_lib.train_step,
            model=model,
            tx=tx,
            schedule=schedule,
            cfg=train_lib.StepConfig(num_classes=100),
        ),
        donate_argnums=(0,),
    )
    state = train_lib.create_train_state(model, tx, jax.random.key(0), (16 * patch, 16 * patch, 3), False)
    rng = jax.random.key(1)
    longest = max(args.seq_lens)
    side = int(round(longest**0.5)) * patch
    batches, prep = {}, {}
    fixed_n = args.max_tokens // longest
    pictures = photos(fixed_n, seed=0)
    start = time.perf_counter()  # the fixed path's preparation: the whole image squashed to the square
    images = np.stack(
        [normalize(np.asarray(p.resize((side, side), Image.Resampling.BILINEAR))) for p in pictures]
    )
    batches["fixed"] = {"image": jnp.asarray(images), "label": jnp.zeros((fixed_n,), jnp.int32)}
    prep["fixed"] = time.perf_counter() - start
    for length in args.seq_lens:
        n = args.max_tokens // length
        pictures = photos(n, seed=length)
        start = time.perf_counter()
        seq = naflex.stack([naflex.prepare(p, patch, length) for p in pictures])
        prep[f"naflex L={length}"] = time.perf_counter() - start
        batches[f"naflex L={length}"] = {
            "image": jnp.asarray(seq["patches"]),
            "grids": jnp.asarray(seq["grids"]),
            "patch_mask": jnp.asarray(seq["mask"]),
            "label": jnp.zeros((n,), jnp.int32),
        }

    def run(name: str) -> None:
        nonlocal state
        state, metrics = step(state, batches[name], rng)
        jax.block_until_ready(metrics)

    times = common.interleaved({name: functools.partial(run, name) for name in batches}, repeats=args.repeats)
    rows = []
    for name, batch in batches.items():
        n = batch["label"].shape[0]
        seconds = common.median(times[name])
        if "grids" in batch:
            real = int(np.asarray(batch["patch_mask"]).sum())
            slots = int(np.prod(batch["patch_mask"].shape))
        else:
            real = slots = n * (side // patch) ** 2
        rows.append(
            {
                "path": name,
                "batch": n,
                "patch slots": slots,
                "padding": f"{1 - real / slots:.1%}",
                "step s (median)": f"{seconds:.3f}",
                "images/s": f"{n / seconds:.1f}",
                "real patches/s": f"{real / seconds:.0f}",
                "host prep s/batch": f"{prep[name]:.3f}",
            }
        )
    result = {
        "machine": common.machine_info(threads),
        "matmul_peak_gflops": common.matmul_peaks(),
        "rows": rows,
    }
    common.print_report(
        result,
        f"{args.variant} NaFlex vs fixed, {args.max_tokens} patch slots per step, fp32 AdamW step",
        args.json,
    )


if __name__ == "__main__":
    main()
