"""The four batched matmuls of attention, alone: JAX (``jnp.einsum``, heads-major) against PyTorch.

    python benchmarks/attention_matmuls.py --heads 3 --tokens 197,200,208,224 --repeats 5

For ``batch x heads`` independent heads with ``tokens`` tokens of ``head_dim``:

* ``q k^T``: ``(T, Dh) x (T, Dh)^T -> (T, T)`` (forward; again for the backward pass under remat);
* ``p v``: ``(T, T) x (T, Dh) -> (T, Dh)`` (forward; also ``dS k`` of the backward pass);
* ``p^T dO``: ``(T, T)^T x (T, Dh) -> (T, Dh)`` (``dV`` and ``dK``: contracts the query axis);
* ``dO v^T``: ``(T, Dh) x (T, Dh)^T -> (T, T)`` (``dP``).

Each product is jitted (JAX) or called as ``torch.matmul`` on contiguous
tensors (PyTorch), timed interleaved (JAX, PyTorch, JAX, ...) after
warm-up; the table gives the best round's time and GFLOP/s. Token counts
other than 197 show what padding the sequence would buy.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

PRODUCTS = {
    # name: (jax einsum, how PyTorch computes it from (a, b))
    "q k^T": ("nhqd,nhkd->nhqk", lambda a, b: a @ b.transpose(-1, -2)),
    "p v": ("nhqk,nhkd->nhqd", lambda a, b: a @ b),
    "p^T dO": ("nhqk,nhqd->nhkd", lambda a, b: a.transpose(-1, -2) @ b),
    "dO v^T": ("nhqd,nhkd->nhqk", lambda a, b: a @ b.transpose(-1, -2)),
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    common.torch_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for tokens in args.tokens:
        per_token = rng.standard_normal((args.batch, args.heads, tokens, args.head_dim), np.float32)
        square = rng.standard_normal((args.batch, args.heads, tokens, tokens), np.float32)
        operands = {
            "q k^T": (per_token, per_token),
            "p v": (square, per_token),
            "p^T dO": (square, per_token),
            "dO v^T": (per_token, per_token),
        }
        flops = 2 * args.batch * args.heads * tokens * tokens * args.head_dim
        for name, (spec, torch_fn) in PRODUCTS.items():
            a, b = operands[name]
            ja, jb = jnp.asarray(a), jnp.asarray(b)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            product = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y))
            np.testing.assert_allclose(  # the same product in both
                np.asarray(product(ja, jb)), torch_fn(ta, tb).numpy(), rtol=1e-4, atol=1e-3
            )
            times = common.interleaved(
                {
                    "jax": lambda product=product, ja=ja, jb=jb: product(ja, jb).block_until_ready(),
                    "torch": lambda torch_fn=torch_fn, ta=ta, tb=tb: torch_fn(ta, tb),
                },
                repeats=args.repeats,
                warmup=2,
                iters=args.iters,
            )
            best = {k: min(v) for k, v in times.items()}
            rows.append(
                {
                    "tokens": tokens,
                    "product": name,
                    "jax ms": 1e3 * best["jax"],
                    "jax GFLOP/s": flops / best["jax"] / 1e9,
                    "torch ms": 1e3 * best["torch"],
                    "torch GFLOP/s": flops / best["torch"] / 1e9,
                }
            )
    return {
        "machine": common.machine_info(args.threads),
        "matmul_peak_gflops": common.matmul_peaks(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=3, help="3: Ti/16, 6: S/16, 12: B/16")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[197])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5, help="calls per timed round")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.threads = common.pin_threads(args.threads)
    common.print_report(
        run(args), f"batch {args.batch} x {args.heads} heads, head_dim {args.head_dim}, fp32", args.json
    )


if __name__ == "__main__":
    main()
