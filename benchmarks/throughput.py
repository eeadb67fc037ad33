"""Training and inference throughput of jaxvit against timm, measured in the same run.

    python benchmarks/throughput.py --variant Ti/16 --batch 32 --image-size 224 --repeats 5
    python benchmarks/throughput.py --variant S/16 --scan --remat dots_with_no_batch_dims_saveable
    python benchmarks/throughput.py --ablation            # ViT-B/16: scan x remat (jaxvit only)

Per variant it reports, for jaxvit (JAX/Flax) and timm (PyTorch, eager, fp32):

* training img/s of a full optimizer step (forward, backward, AdamW update;
  the JAX step is jitted with the state donated),
* inference img/s (JAX: jitted apply; timm: ``eval()`` under ``inference_mode``),
* compile time (JAX: lower + compile of each function; timm runs eagerly),
* peak memory, measured in a fresh subprocess per framework as the growth of
  the resident set size from just before the model is built to the largest
  value sampled during two training steps (for JAX this includes the XLA
  compiler's own memory), and for JAX also XLA's buffer assignment for the
  step (``compiled.memory_analysis()``: arguments + outputs - aliased + temps),
* model FLOPs utilisation: the model's matmul FLOPs (by formula; training =
  3x forward) per second over the fp32 matmul peak measured in the same run.

The two frameworks are timed alternately (jaxvit, timm, jaxvit, timm, ...)
after warm-up; the table gives medians and the median of the per-round ratios.
Both use ``--threads`` threads (default: all CPUs the process may use); see
``common.pin_threads`` for how XLA's thread count is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NUM_CLASSES = 1000


# ---------------------------------------------------------------------------
# FLOPs by formula
# ---------------------------------------------------------------------------


def forward_matmul_flops(variant: str, image_size: int, num_classes: int = NUM_CLASSES) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward pass on one image, class-token ViT.

    Counts the patch embedding, per block the qkv, q.k, attention.v, output
    and two MLP matmuls, and the classifier; elementwise work is left out.
    """
    import jaxvit

    cfg = jaxvit.decode_variant(variant)
    p = cfg.get("patch_size", 16)
    p, q = (p, p) if isinstance(p, int) else p
    d, m, depth = cfg["width"], cfg["mlp_dim"], cfg["depth"]
    s = (image_size // p) * (image_size // q)
    t = s + 1
    patch = 2 * s * (p * q * 3) * d
    block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * m
    return patch + depth * block + 2 * d * num_classes


# ---------------------------------------------------------------------------
# jaxvit
# ---------------------------------------------------------------------------


def memory_bytes(compiled: Any) -> int:
    """XLA's buffer assignment for one call: arguments + outputs - aliased (donated) + temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:
        return -1
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )


def build_jaxvit(args: argparse.Namespace, scan: bool, remat: str) -> dict[str, Any]:
    """Compiles the training step and inference of jaxvit; returns callables and their costs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxvit

    dtype = jnp.dtype(args.dtype)
    model = jaxvit.create_model(
        args.variant, num_classes=NUM_CLASSES, scan=scan, remat_policy=remat, dtype=dtype
    )
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.batch, args.image_size, args.image_size, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, args.batch), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]
    tx = optax.adamw(1e-3, weight_decay=0.05)
    state = (params, tx.init(params))

    def train_step(state, images, labels):
        params, opt_state = state

        def loss_fn(params):
            logits = model.apply({"params": params}, images, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    def infer(params, images):
        return model.apply({"params": params}, images, train=False)

    start = time.perf_counter()
    train_c = jax.jit(train_step, donate_argnums=0).lower(state, images, labels).compile()
    train_compile_s = time.perf_counter() - start
    start = time.perf_counter()
    infer_c = jax.jit(infer).lower(params, images).compile()
    infer_compile_s = time.perf_counter() - start

    holder = {"state": state}

    def train() -> None:
        holder["state"], loss = train_c(holder["state"], images, labels)
        loss.block_until_ready()

    def inference() -> None:
        infer_c(holder["state"][0], images).block_until_ready()

    return dict(
        train=train,
        infer=inference,
        train_compile_s=train_compile_s,
        infer_compile_s=infer_compile_s,
        train_xla_bytes=memory_bytes(train_c),
        infer_xla_bytes=memory_bytes(infer_c),
    )


# ---------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------


def build_timm(args: argparse.Namespace) -> dict[str, Any]:
    """The same model in timm (random init, no download) with ``torch.optim.AdamW``."""
    import timm
    import torch

    common.torch_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(
        common.timm_name(args.variant), pretrained=False, num_classes=NUM_CLASSES, img_size=args.image_size
    )
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast = args.dtype == "bfloat16"

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model(images).float(), labels)
        loss.backward()
        opt.step()

    def inference() -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(images)

    return dict(train=train, infer=inference)


# ---------------------------------------------------------------------------
# Matmul peak, memory probe
# ---------------------------------------------------------------------------


def matmul_fns(n: int = 2048, dtype: str = "float32") -> dict[str, Any]:
    """Callables for an ``n x n @ n x n`` matmul of ``dtype`` in JAX (jitted) and PyTorch, and its FLOPs.

    They run inside the timed rounds, so the peak (the best round) is taken
    under the same conditions as the models. JAX's product goes through
    ``jaxvit.ops.dot_general``, as the model's do: in bfloat16 on the CPU that
    is a float32 accumulator, the form XLA:CPU runs on its AMX / AVX512_BF16
    kernels (a bfloat16 result would multiply in float32; benchmarks/README.md).
    """
    import jax
    import jax.numpy as jnp
    import torch

    from jaxvit import ops

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x: ops.dot_general(x, x, (((1,), (0,)), ((), ()))))
    ta = torch.randn(n, n).to(getattr(torch, dtype))
    return {
        "matmul/jax": lambda: mm(a).block_until_ready(),
        "matmul/torch": lambda: torch.mm(ta, ta),
        "flops": 2 * n**3,
    }


def memory_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh subprocess: RSS growth from before building the model to the peak of 2 steps."""
    if args.memory_probe == "timm":
        import timm  # noqa: F401  (imports count towards the baseline, not the model)
        import torch  # noqa: F401
    else:
        import jax  # noqa: F401
        import optax  # noqa: F401

        import jaxvit  # noqa: F401
    baseline = common.rss_bytes()
    with common.PeakRSS() as peak:
        if args.memory_probe == "timm":
            fns = build_timm(args)
        else:
            fns = build_jaxvit(args, args.scan, args.remat)
        for _ in range(2):
            fns["train"]()
    out = {"rss_peak_delta": peak.peak - baseline}
    if "train_xla_bytes" in fns:
        out["train_xla_bytes"] = fns["train_xla_bytes"]
    return out


def run_memory_probe(framework: str, argv: list[str]) -> dict[str, Any]:
    """Starts ``memory_probe`` for ``framework`` in a subprocess with the same options."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--memory-probe", framework]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory probe for {framework} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------

MiB = 2**20


def compare(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """jaxvit against timm for one configuration."""
    jx = build_jaxvit(args, args.scan, args.remat)
    tm = build_timm(args)
    mm = matmul_fns(dtype=args.dtype)
    fns = {"jaxvit/train": jx["train"], "timm/train": tm["train"]}
    fns |= {"jaxvit/infer": jx["infer"], "timm/infer": tm["infer"]}
    fns |= {"matmul/jax": mm["matmul/jax"], "matmul/torch": mm["matmul/torch"]}
    times = common.interleaved(fns, args.repeats, warmup=args.warmup, iters=args.iters)
    peak = {fw: mm["flops"] / min(times[f"matmul/{fw}"]) for fw in ("jax", "torch")}
    memory = {} if args.no_memory else {fw: run_memory_probe(fw, argv) for fw in ("jaxvit", "timm")}

    flops = forward_matmul_flops(args.variant, args.image_size)
    peak_flops = max(peak.values())
    rows = []
    for fw in ("jaxvit", "timm"):
        train_ips = args.batch / common.median(times[f"{fw}/train"])
        infer_ips = args.batch / common.median(times[f"{fw}/infer"])
        row = {
            "framework": fw,
            "train img/s": train_ips,
            "infer img/s": infer_ips,
            "train MFU": 3 * flops * train_ips / peak_flops,
            "infer MFU": flops * infer_ips / peak_flops,
            "compile train s": jx["train_compile_s"] if fw == "jaxvit" else None,
            "compile infer s": jx["infer_compile_s"] if fw == "jaxvit" else None,
        }
        if memory:
            row["train peak RSS MiB"] = memory[fw]["rss_peak_delta"] / MiB
        if fw == "jaxvit":
            row["train XLA buffers MiB"] = jx["train_xla_bytes"] / MiB
        rows.append(row)
    train_ratios = common.pair_ratios(times["timm/train"], times["jaxvit/train"])
    infer_ratios = common.pair_ratios(times["timm/infer"], times["jaxvit/infer"])
    return {
        "config": {k: v for k, v in vars(args).items() if k != "memory_probe"},
        "machine": common.machine_info(args.threads),
        "forward_matmul_gflops_per_image": flops / 1e9,
        "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
        "times_s": times,
        "rows": rows,
        # speed ratio jaxvit/timm in img/s = timm time / jaxvit time, per round
        "train_ratio_per_round": train_ratios,
        "infer_ratio_per_round": infer_ratios,
        "train_ratio_median": common.median(train_ratios),
        "infer_ratio_median": common.median(infer_ratios),
        # the same from each framework's best round, less sensitive to bursts of other work
        "train_ratio_best": min(times["timm/train"]) / min(times["jaxvit/train"]),
        "infer_ratio_best": min(times["timm/infer"]) / min(times["jaxvit/infer"]),
    }


def ablation(args: argparse.Namespace) -> dict[str, Any]:
    """jaxvit training step with and without scan and remat: step time, compile time, XLA memory."""
    configs = [(scan, remat) for scan in (False, True) for remat in ("none", args.ablation_remat)]
    built = {cfg: build_jaxvit(args, *cfg) for cfg in configs}
    times = common.interleaved(
        {f"{s}/{r}": built[(s, r)]["train"] for s, r in configs}, args.repeats, warmup=args.warmup
    )
    rows = []
    for scan, remat in configs:
        b = built[(scan, remat)]
        step = common.median(times[f"{scan}/{remat}"])
        rows.append(
            {
                "scan": scan,
                "remat": remat,
                "step s": step,
                "train img/s": args.batch / step,
                "compile train s": b["train_compile_s"],
                "train XLA buffers MiB": b["train_xla_bytes"] / MiB,
            }
        )
    return {
        "config": {k: v for k, v in vars(args).items() if k != "memory_probe"},
        "machine": common.machine_info(args.threads),
        "times_s": times,
        "rows": rows,
    }


def memory_table(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Peak training memory of timm and of jaxvit (as configured), one fresh subprocess each."""
    argv = [a for a in argv if a != "--memory-only"]
    rows = []
    for fw in ("timm", "jaxvit"):
        probe = run_memory_probe(fw, argv)
        rows.append(
            {
                "framework": fw,
                "scan": args.scan if fw == "jaxvit" else None,
                "remat": args.remat if fw == "jaxvit" else None,
                "train peak RSS MiB": probe["rss_peak_delta"] / MiB,
                "train XLA buffers MiB": probe["train_xla_bytes"] / MiB if fw == "jaxvit" else None,
            }
        )
    return {
        "config": {k: v for k, v in vars(args).items() if k != "memory_probe"},
        "machine": common.machine_info(args.threads),
        "rows": rows,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="Ti/16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (A B A B ...)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each function first")
    ap.add_argument("--iters", type=int, default=1, help="calls per timed round")
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: all CPUs)")
    ap.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--remat", default="none", help="a jaxvit remat_policy, e.g. nothing_saveable")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-memory", action="store_true", help="skip the per-framework memory subprocesses")
    ap.add_argument(
        "--ablation",
        action="store_true",
        help="jaxvit only: scan x remat for --variant (use B/16), step time, compile time, memory",
    )
    ap.add_argument("--ablation-remat", default="nothing_saveable")
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="only the peak-memory subprocesses: timm, and jaxvit with --scan/--remat as given",
    )
    ap.add_argument("--json", action="store_true", help="print the full results as JSON")
    ap.add_argument("--memory-probe", choices=["jaxvit", "timm"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("batch", "image_size", "repeats", "iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.threads = common.pin_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return
    if args.memory_only:
        result = memory_table(args, argv)
    else:
        result = ablation(args) if args.ablation else compare(args, argv)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.variant}, batch {args.batch}, {args.image_size} px, {args.dtype},"
        f" {common.describe_machine(result['machine'])}"
    )
    print(common.markdown_table(result["rows"]))
    if not (args.ablation or args.memory_only):
        print(
            f"\njaxvit/timm speed ratio, median of {args.repeats} rounds: train"
            f" {result['train_ratio_median']:.2f} (per round:"
            f" {', '.join(f'{r:.2f}' for r in result['train_ratio_per_round'])}), infer"
            f" {result['infer_ratio_median']:.2f} (per round:"
            f" {', '.join(f'{r:.2f}' for r in result['infer_ratio_per_round'])});"
            f" best round against best round: train {result['train_ratio_best']:.2f},"
            f" infer {result['infer_ratio_best']:.2f}"
        )
        peak = result["matmul_peak_gflops"]
        print(
            f"MFU = model matmul FLOPs/s (median round) over the {args.dtype} 2048^3 matmul peak"
            f" (best round; jax {peak['jax']:.0f},"
            f" torch {peak['torch']:.0f} GFLOP/s; the larger is used);"
            f" {result['forward_matmul_gflops_per_image']:.2f} GFLOPs per image forward, training = 3x"
        )


if __name__ == "__main__":
    main()
