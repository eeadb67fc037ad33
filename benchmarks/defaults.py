"""What a user gets without reading a benchmark: the usual training loop, each framework in a fresh process.

    python benchmarks/defaults.py --variant Ti/16 --rounds 3
    python benchmarks/defaults.py --variant S/16 --rounds 3 --vit-jax PATH_TO_vision_transformer_CLONE

Each round starts one fresh process per loop, in turn (A B C A B C ...), so
a load that comes and goes hits every loop alike. A process builds its model
with random weights, compiles (or warms up) with one step, then times
``--steps`` training steps and ``--steps`` inference batches. The loops:

* ``jaxvit``: ``jaxvit.create_model(variant)`` with every default,
  ``jax.jit(jax.value_and_grad(loss))`` and ``optax.adamw``, no donation: the
  loop most users write first.
* ``jaxvit/donated``: the same, with the parameters and optimizer state
  donated (``donate_argnums=(0, 1)``): the step the README's "Your own
  training loop" shows.
* ``jaxvit/train.py``: ``train.py``'s own compiled step (``trainer``'s
  ``_compile_steps``: sharded, donated) on a
  shipped config as it is (``--config``; by default ``configs/vit_s16_i1k.py``,
  mixup included), with the model's sizes set to the variant, batch ``--batch``.
* ``timm``: ``timm.create_model`` defaults, ``torch.optim.AdamW``, the usual
  ``zero_grad / backward / step``.
* ``vit_jax`` (with ``--vit-jax``): google-research/vision_transformer's
  ``models_vit.VisionTransformer`` from a clone of that repository (it is not
  part of this project), with the same jit + adamw loop as ``jaxvit``.

The fp32 2048^3 matmul peak of JAX and PyTorch is measured in the driver
before and after the rounds; ratios are per round, over timm's process of the
same round.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 1000
VIT_JAX_NAMES = {"Ti/16": "ViT-Ti_16", "S/16": "ViT-S_16", "B/16": "ViT-B_16", "B/32": "ViT-B_32"}


def _timed(fn: Any, steps: int) -> float:
    """Images per call: seconds per call of ``fn`` over ``steps`` calls after one untimed call."""
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


class UsualLoop(NamedTuple):
    """One framework's usual loop, ready to run: ``train()`` and ``infer()`` each block until done."""

    train: Callable[[], None]
    infer: Callable[[], None]
    step: Any = None  # jaxvit's jitted train step, and
    step_args: Callable[[], tuple] | None = None  # the arguments of its next call


def jax_usual_loop(model: Any, batch: int, donate: bool = False) -> UsualLoop:
    """``jax.jit(value_and_grad)`` + ``optax.adamw`` on random data, the state donated or not."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, 224, 224, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
    params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images[:1])["params"]
    tx = optax.adamw(1e-3, weight_decay=0.05)
    opt_state = tx.init(params)

    def loss_fn(params, images, labels):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(1)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else ())
    def train_step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    infer = jax.jit(lambda params, images: model.apply({"params": params}, images, train=False))
    state = {"params": params, "opt": opt_state}

    def train() -> None:
        state["params"], state["opt"], loss = train_step(state["params"], state["opt"], images, labels)
        loss.block_until_ready()

    return UsualLoop(
        train=train,
        infer=lambda: infer(state["params"], images).block_until_ready(),
        step=train_step,
        step_args=lambda: (state["params"], state["opt"], images, labels),
    )


def timm_usual_loop(variant: str, batch: int) -> UsualLoop:
    """timm's defaults with ``torch.optim.AdamW``: ``zero_grad / backward / step`` on random data."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(common.timm_name(variant), num_classes=NUM_CLASSES)
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def train() -> None:
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(images)

    return UsualLoop(train=train, infer=infer)


def _timed_loop(loop: UsualLoop, steps: int) -> dict[str, float]:
    return {"train_s": _timed(loop.train, steps), "infer_s": _timed(loop.infer, steps)}


def run_jaxvit(args: argparse.Namespace) -> dict[str, Any]:
    import jaxvit

    return _timed_loop(
        jax_usual_loop(jaxvit.create_model(args.variant, num_classes=NUM_CLASSES), args.batch), args.steps
    )


def run_jaxvit_donated(args: argparse.Namespace) -> dict[str, Any]:
    import jaxvit

    model = jaxvit.create_model(args.variant, num_classes=NUM_CLASSES)
    return _timed_loop(jax_usual_loop(model, args.batch, donate=True), args.steps)


def run_vit_jax(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, args.vit_jax)
    from vit_jax import models_vit
    from vit_jax.configs import models as vit_jax_configs

    config = vit_jax_configs.MODEL_CONFIGS[VIT_JAX_NAMES[args.variant]]
    model = models_vit.VisionTransformer(num_classes=NUM_CLASSES, **config)
    return _timed_loop(jax_usual_loop(model, args.batch), args.steps)


def run_train_py(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np

    import jaxvit
    from jaxvit.training import configs, trainer

    config = configs.load_config_file(args.config)
    config.unlock()
    config.model.update(jaxvit.decode_variant(args.variant))  # sizes only: scan, remat, ... as shipped
    config.batch_size = args.batch
    config.num_classes = NUM_CLASSES
    config.image_size = 224
    config.lock()
    model = configs.model_from_config(config.to_dict())
    compiled = trainer._compile_steps(config, model, jax.random.key(0))
    state = {"state": jax.jit(compiled.init_state, out_shardings=compiled.state_shardings)()}
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((args.batch, 224, 224, 3)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, args.batch).astype(np.int32),
        "mask": np.ones(args.batch, np.float32),  # evaluation's padding mask: every example real
    }
    batch = jax.device_put(batch, compiled.batch_sharding)
    key = jax.random.key(2)

    def train() -> None:
        state["state"], metrics = compiled.train_step(state["state"], batch, key)
        jax.block_until_ready(metrics)

    def infer() -> None:
        jax.block_until_ready(compiled.eval_step(state["state"].params, batch))

    return {"train_s": _timed(train, args.steps), "infer_s": _timed(infer, args.steps)}


def run_timm(args: argparse.Namespace) -> dict[str, Any]:
    return _timed_loop(timm_usual_loop(args.variant, args.batch), args.steps)


LOOPS = {
    "jaxvit": run_jaxvit,
    "jaxvit/donated": run_jaxvit_donated,
    "jaxvit/train.py": run_train_py,
    "timm": run_timm,
    "vit_jax": run_vit_jax,
}


def child(args: argparse.Namespace) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = LOOPS[args.child](args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["max_rss_mib"] = usage.ru_maxrss / 1024
    # what the process cost the CPU and the kernel: build, compile and all timed calls
    result["user_s"] = usage.ru_utime - before.ru_utime
    result["system_s"] = usage.ru_stime - before.ru_stime
    result["minor_faults"] = usage.ru_minflt - before.ru_minflt
    print("RESULT " + json.dumps(result))


def run_child(loop: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", loop]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{loop} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="Ti/16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process, after one untimed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "vit_s16_i1k.py"))
    ap.add_argument("--vit-jax", help="a clone of google-research/vision_transformer, to compare against")
    ap.add_argument(
        "--loops",
        default="jaxvit,jaxvit/donated,jaxvit/train.py,timm",
        help="comma-separated, from " + str(list(LOOPS)),
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return
    loops = args.loops.split(",") + (["vit_jax"] if args.vit_jax and "vit_jax" not in args.loops else [])
    machine = common.machine_info(len(os.sched_getaffinity(0)))
    peaks = [common.matmul_peaks()]
    rounds = [{loop: run_child(loop, argv) for loop in loops} for _ in range(args.rounds)]
    peaks.append(common.matmul_peaks())

    rows = []
    for loop in loops:
        row: dict[str, Any] = {"loop": loop}
        for what in ("train", "infer"):
            ips = [args.batch / r[loop][f"{what}_s"] for r in rounds]
            ratios = [r[loop][f"{what}_s"] and r["timm"][f"{what}_s"] / r[loop][f"{what}_s"] for r in rounds]
            row[f"{what} img/s"] = common.median(ips)
            row[f"{what} / timm"] = f"{common.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        row["max RSS MiB"] = common.median([r[loop]["max_rss_mib"] for r in rounds])
        row["user / system s"] = "{:.0f} / {:.1f}".format(
            common.median([r[loop]["user_s"] for r in rounds]),
            common.median([r[loop]["system_s"] for r in rounds]),
        )
        row["minor faults (k)"] = common.median([r[loop]["minor_faults"] for r in rounds]) / 1000
        rows.append(row)
    result = {"machine": machine, "matmul_peak_gflops": peaks, "rows": rows, "rounds": rounds}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(
        f"{args.variant}, batch {args.batch}, 224 px, fp32, {args.rounds} rounds of fresh processes,"
        f" {args.steps} timed steps each; {common.describe_machine(machine)}"
    )
    print(
        "fp32 2048^3 matmul peak before / after (GFLOP/s): "
        + ", ".join(f"{k} {peaks[0][k]:.0f} / {peaks[1][k]:.0f}" for k in ("jax", "torch"))
    )
    print(common.markdown_table(rows))


if __name__ == "__main__":
    main()
