"""Patch embedding in JAX: strided conv against patchify + one matmul, and transpose against einops.

    python benchmarks/patch_embed.py --batch 32 --image-size 224 --patch 16 --width 768 --repeats 15

Both forms compute the same VALID conv with stride = kernel = patch (the
script checks that their outputs and gradients agree before timing). Timed,
jitted, interleaved A B A B after warm-up:

* forward: ``(N, H, W, C) -> (N, h*w, D)``;
* backward: the gradient of ``sum(out * g)`` with respect to kernel, bias
  and images (what a training step needs, plus the input gradient);
* token layout alone: ``jaxvit.patchify`` (``reshape`` + ``jnp.transpose``)
  against ``einops.rearrange(x, "n (h p) (w q) c -> n (h w) (p q c)")``.

The table gives the median time of each and the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def conv_embed(images: Any, kernel: Any, bias: Any) -> Any:
    """``(N, H, W, C), (p, q, C, D), (D,) -> (N, h*w, D)`` with ``lax.conv_general_dilated``."""
    import jax

    p, q = kernel.shape[:2]
    out = jax.lax.conv_general_dilated(
        images, kernel, window_strides=(p, q), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    n, h, w, d = out.shape
    return (out + bias).reshape(n, h * w, d)


def matmul_embed(images: Any, kernel: Any, bias: Any) -> Any:
    """``(N, H, W, C), (p, q, C, D), (D,) -> (N, h*w, D)`` as ``patchify`` and one matmul."""
    import jaxvit

    p, q, c, d = kernel.shape
    return jaxvit.patchify(images, (p, q)) @ kernel.reshape(p * q * c, d) + bias


def einops_patchify(images: Any, p: int) -> Any:
    """``(N, H, W, C) -> (N, h*w, p*p*C)`` with einops."""
    from einops import rearrange

    return rearrange(images, "n (h p) (w q) c -> n (h w) (p q c)", p=p, q=p)


def grad_of(embed: Callable[..., Any]) -> Callable[..., Any]:
    """The gradient of ``sum(embed(x, k, b) * g)`` with respect to ``(x, k, b)``."""
    import jax
    import jax.numpy as jnp

    return jax.grad(lambda x, k, b, g: jnp.vdot(embed(x, k, b), g), argnums=(0, 1, 2))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np

    import jaxvit

    if args.image_size % args.patch:
        raise ValueError(f"--image-size {args.image_size} is not divisible by --patch {args.patch}")
    rng = np.random.default_rng(0)
    s = (args.image_size // args.patch) ** 2
    x = rng.standard_normal((args.batch, args.image_size, args.image_size, 3), np.float32)
    k = rng.standard_normal((args.patch, args.patch, 3, args.width), np.float32) * 0.02
    b = rng.standard_normal((args.width,), np.float32)
    g = rng.standard_normal((args.batch, s, args.width), np.float32)
    x, k, b, g = map(jax.numpy.asarray, (x, k, b, g))

    fwd = {"conv": jax.jit(conv_embed), "matmul": jax.jit(matmul_embed)}
    bwd = {"conv": jax.jit(grad_of(conv_embed)), "matmul": jax.jit(grad_of(matmul_embed))}
    layout = {
        "transpose": jax.jit(lambda x: jaxvit.patchify(x, args.patch)),
        "einops": jax.jit(lambda x: einops_patchify(x, args.patch)),
    }
    # Same numbers first, so the timing compares equal work.
    np.testing.assert_allclose(fwd["conv"](x, k, b), fwd["matmul"](x, k, b), rtol=1e-4, atol=1e-4)
    for a, c in zip(bwd["conv"](x, k, b, g), bwd["matmul"](x, k, b, g), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(layout["transpose"](x), layout["einops"](x))

    cases = {
        "forward": ({n: (lambda f=f: f(x, k, b).block_until_ready()) for n, f in fwd.items()}),
        "backward (d images, d kernel, d bias)": (
            {n: (lambda f=f: jax.block_until_ready(f(x, k, b, g))) for n, f in bwd.items()}
        ),
        "token layout only": ({n: (lambda f=f: f(x).block_until_ready()) for n, f in layout.items()}),
    }
    rows, raw = [], {}
    for case, fns in cases.items():
        times = common.interleaved(fns, args.repeats, warmup=args.warmup)
        raw[case] = times
        (a, ta), (c, tc) = times.items()
        ratios = common.pair_ratios(ta, tc)
        rows.append(
            {
                "op": case,
                "A": a,
                "A ms": 1e3 * common.median(ta),
                "B": c,
                "B ms": 1e3 * common.median(tc),
                "A/B time (median of rounds)": common.median(ratios),
                "A/B min..max": f"{min(ratios):.2f}..{max(ratios):.2f}",
            }
        )
    machine = common.machine_info(args.threads)
    return {
        "config": vars(args),
        "machine": machine,
        "matmul_peak_gflops": common.matmul_peaks(),
        "rows": rows,
        "times_s": raw,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for XLA (default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.threads = common.pin_threads(args.threads)
    common.print_report(
        run(args),
        f"batch {args.batch}, {args.image_size} px, patch {args.patch}, width {args.width}, fp32",
        args.json,
    )


if __name__ == "__main__":
    main()
