"""Where a training step's time goes: jaxvit against timm, op by op, in one table.

    python benchmarks/profile_step.py --variant Ti/16
    python benchmarks/profile_step.py --variant Ti/16 --top 25   # also jaxvit's 25 costliest ops

Both run the usual loop of ``defaults.py`` (``create_model`` defaults,
``jax.jit(value_and_grad)`` + ``optax.adamw``; timm's defaults with
``torch.optim.AdamW``), fp32, batch ``--batch``, 224 px, 1000 classes. After
warm-up each framework's profiler records ``--steps`` steps:

* jaxvit: ``jax.profiler.trace``; every event of an XLA:CPU worker thread
  is one executed operation (a thunk: a fusion, a library call, a copy). Its
  time is put in a group by the op's HLO metadata (the flax module path and
  primitive that produced it) and its kind. XLA's own per-op times add up to
  a little more than the step's wall time, since independent thunks may run
  side by side.
* timm: ``torch.profiler``'s self CPU time per ``aten`` op, grouped by name.

The groups: ``linear layers`` (qkv, attention out, fc1, fc2, head and patch
embedding matmuls, forward and backward, with whatever XLA fused into them,
e.g. LayerNorm statistics); ``attention`` (the two batched matmuls and the
softmax, forward and backward; timm's flash-attention kernels);
``layout copies`` (transposes and copies); ``optimizer and loss``
(outside the model); ``elementwise`` (everything else: activation, LayerNorm,
residual adds, scan bookkeeping). The machine line carries the matmul peak
of the same run.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import defaults  # noqa: E402

NUM_CLASSES = defaults.NUM_CLASSES
GROUPS = ("linear layers", "attention", "layout copies", "elementwise", "optimizer and loss")
_LINEAR = re.compile(r"/(qkv|out|fc1|fc2|head|patch_embed|pre_logits)/")


def _jaxvit_group(name: str, instruction: str) -> str:
    """The group of one executed XLA op, from its name and its line of the compiled HLO."""
    meta = re.search(r'op_name="([^"]+)"', instruction)
    path = meta.group(1) if meta else ""
    if "jvp(" not in path:
        return "optimizer and loss"
    is_matmul = name.startswith(("ynn_fusion", "xnn_fusion", "onednn", "dot")) or " dot(" in instruction
    if name.startswith(("copy", "transpose")) and not is_matmul:
        return "layout copies"
    if "/attn/" in path and not _LINEAR.search(path):
        return "attention"
    if is_matmul and _LINEAR.search(path):
        return "linear layers"
    return "elementwise"


def profile_jaxvit(args: argparse.Namespace) -> tuple[dict[str, float], list[tuple[str, float, str]], float]:
    """Milliseconds per step by group, the costliest ops, and the step's wall time in ms."""
    import jax

    import jaxvit

    loop = defaults.jax_usual_loop(jaxvit.create_model(args.variant, num_classes=NUM_CLASSES), args.batch)
    # The same program the loop runs (compiles are deterministic), for the ops' HLO metadata.
    hlo = loop.step.lower(*loop.step_args()).compile().as_text()
    loop.train()
    wall = min(common.time_call(loop.train) for _ in range(args.steps))
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            for _ in range(args.steps):
                loop.train()
        paths = [os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs if f.endswith(".xplane.pb")]
        data = jax.profiler.ProfileData.from_file(paths[0])
    per_op: collections.Counter[str] = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA:CPU's worker threads run the ops
                continue
            for event in line.events:
                if "ThunkExecutor" in event.name or "ThreadPool" in event.name:
                    continue
                per_op[event.name] += event.duration_ns
    groups = dict.fromkeys(GROUPS, 0.0)
    top = []
    for name, ns in per_op.most_common():
        match = re.search(r"^\s*(?:ROOT )?%" + re.escape(name) + r" = ([^\n]*)", hlo, re.M)
        instruction = match.group(1) if match else ""
        group = _jaxvit_group(name, instruction)
        ms = ns / 1e6 / args.steps
        groups[group] += ms
        meta = re.search(r'op_name="([^"]+)"', instruction)
        top.append((name, ms, f"{group}: {meta.group(1)[-80:] if meta else ''}"))
    return groups, top, wall * 1e3


def _timm_group(name: str) -> str | None:
    if name in (
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::mkldnn_convolution",
        "aten::convolution_backward",
    ):
        return "linear layers"
    if "scaled_dot_product" in name or "softmax" in name:
        return "attention"
    if name in ("aten::copy_", "aten::clone", "aten::cat", "aten::contiguous"):
        return "layout copies"
    if name.startswith(("aten::_foreach", "Optimizer.", "aten::lerp", "aten::addcdiv", "aten::sqrt")):
        return "optimizer and loss"
    if "cross_entropy" in name or "nll_loss" in name or "log_softmax" in name:
        return "optimizer and loss"
    if name.startswith("aten::"):
        return "elementwise"
    return None  # wrappers (autograd nodes, record_function ranges) hold no self time of their own


def profile_timm(args: argparse.Namespace) -> tuple[dict[str, float], float]:
    """Milliseconds per step by group (self CPU time of each aten op) and the step's wall time in ms."""
    from torch.profiler import ProfilerActivity, profile

    common.torch_threads(len(os.sched_getaffinity(0)))
    loop = defaults.timm_usual_loop(args.variant, args.batch)
    loop.train()
    wall = min(common.time_call(loop.train) for _ in range(args.steps))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            loop.train()
    groups = dict.fromkeys(GROUPS, 0.0)
    for event in prof.key_averages():
        group = _timm_group(event.key)
        if group is not None:
            groups[group] += event.self_cpu_time_total / 1e3 / args.steps
    return groups, wall * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="Ti/16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="profiled (and, before that, timed) steps")
    ap.add_argument("--top", type=int, default=0, help="also list jaxvit's N costliest ops")
    args = ap.parse_args(argv)

    machine = common.machine_info(len(os.sched_getaffinity(0)))
    peaks = common.matmul_peaks()
    started = time.strftime("%Y-%m-%d")
    jax_groups, top, jax_wall = profile_jaxvit(args)
    timm_groups, timm_wall = profile_timm(args)

    print(
        f"{args.variant} training step, batch {args.batch}, 224 px, fp32, {started};"
        f" {common.describe_machine(machine)}; fp32 2048^3 matmul peak jax {peaks['jax']:.0f}"
        f" / torch {peaks['torch']:.0f} GFLOP/s"
    )
    rows = [
        {
            "group": group,
            "jaxvit ms": jax_groups[group],
            "timm ms": timm_groups[group],
            "jaxvit - timm ms": jax_groups[group] - timm_groups[group],
        }
        for group in GROUPS
    ]
    rows.append(
        {
            "group": "sum of ops",
            "jaxvit ms": sum(jax_groups.values()),
            "timm ms": sum(timm_groups.values()),
            "jaxvit - timm ms": sum(jax_groups.values()) - sum(timm_groups.values()),
        }
    )
    rows.append(
        {
            "group": "step wall time (best)",
            "jaxvit ms": jax_wall,
            "timm ms": timm_wall,
            "jaxvit - timm ms": jax_wall - timm_wall,
        }
    )
    print(common.markdown_table(rows))
    if args.top:
        print(common.markdown_table([{"op": n, "ms": ms, "what": what} for n, ms, what in top[: args.top]]))


if __name__ == "__main__":
    main()
