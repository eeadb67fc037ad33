"""Compile a config's train and eval steps for a TPU topology, on a machine without one.

``python -m jaxvit.plan --config configs/vit_s16_i1k.py --topology v5e:2x4 [--config.<key>=<value>] [--json]``

The TPU compiler (libtpu: ``pip install 'jaxvit[tpu-plan]'``) compiles the same jitted steps
``train.py`` runs, with the config's mesh laid over the topology's devices. From the compiled
programs come, per device: argument, output and temporary bytes against the chip's HBM, whether
they fit, the largest batch that does (from a second compile at half the batch: XLA's buffers grow
linearly with it), FLOPs and HBM bytes per step, the collectives, the compile time, and a roofline
bound on the step time from the chip's published peaks (a bound, not a measurement).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published per-chip figures (bfloat16 peak, HBM size and bandwidth)."""

    flops: float  # FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s


CHIPS = {
    "v4": Chip(275e12, 32 * GIB, 1.2e12),
    "v5e": Chip(197e12, 16 * GIB, 819e9),
    "v5p": Chip(459e12, 95 * GIB, 2.765e12),
    "v6e": Chip(918e12, 32 * GIB, 1.64e12),
}
# The usual slice names, as the cloud lists them (v4 and v5p count TensorCores, v5e and v6e chips).
SLICES = {
    "v4-8": "v4:2x2x1",
    "v4-32": "v4:2x2x4",
    "v5e-8": "v5e:2x4",
    "v5e-256": "v5e:16x16",
    "v5p-8": "v5p:2x2x1",
    "v6e-8": "v6e:2x4",
    "v6e-256": "v6e:16x16",
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
LIBTPU_HINT = "jaxvit.plan compiles with the TPU compiler, libtpu: pip install 'jaxvit[tpu-plan]'"


def topology_devices(topology: str) -> tuple[list[Any], Chip, int]:
    """``"v5e:2x4"`` (or a slice name such as ``"v5e-8"``) -> (compile-only devices, the chip,
    devices per chip). Raises ``ValueError`` naming the topology, or the missing libtpu."""
    name = SLICES.get(topology, topology)
    generation = name.split(":", 1)[0]
    if generation not in CHIPS or ":" not in name:
        raise ValueError(
            f"unknown topology {topology!r}: expected <generation>:<shape> with generation one of"
            f" {sorted(CHIPS)} (e.g. v5e:2x4, v4:2x2x1), or one of {sorted(SLICES)}"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(LIBTPU_HINT)
    from jax.experimental import topologies

    # libtpu locks a TPU host's chips to one process; a deviceless compile uses none, so several
    # planners (or a planner beside a test run) may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        with _quiet_stderr():  # libtpu logs that it found no TPU host: this is a deviceless compile
            devices = list(topologies.get_topology_desc(name, "tpu").devices)
    except Exception as err:  # libtpu's own error names what is wrong with the shape
        raise ValueError(f"topology {topology!r}: {err}") from err
    chips = {tuple(d.coords) for d in devices}
    return devices, CHIPS[generation], len(devices) // len(chips)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _abstract(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _compiled_steps(config: Any, devices: list[Any], batch: int) -> dict[str, Any]:
    """The train and eval steps of ``config`` at global ``batch``, compiled for ``devices``."""
    from jaxvit.sizes import to_pair
    from jaxvit.summary import formula_flops
    from jaxvit.training import configs, optim, train_lib, trainer

    if config.get("model_from_checkpoint"):  # as train.py does: the architecture is the checkpoint's
        config = configs.with_model_fields(config, configs.model_from_init_checkpoint(config)[0])
    model = trainer.validate_config(config, len(devices))
    out: dict[str, Any] = {"forward_flops_per_example": sum(formula_flops(model, config.image_size).values())}
    mesh = train_lib.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
    tx, schedule = optim.make_optimizer(config, config.total_steps, depth=model.depth)
    image = (*to_pair(config.image_size), config.num_channels)
    init = functools.partial(
        train_lib.create_train_state, model, tx, jax.random.key(config.seed), image, config.ema_decay > 0
    )
    abstract_state = jax.eval_shape(init)
    shardings = train_lib.state_shardings(mesh, abstract_state)
    state = jax.tree_util.tree_map(lambda a, s: _abstract(a.shape, a.dtype, s), abstract_state, shardings)
    data = train_lib.batch_sharding(mesh)
    images = _abstract((batch, *image), jnp.float32, data)
    labels = _abstract((batch,), jnp.int32, data)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = _abstract(key.shape, key.dtype, NamedSharding(mesh, P()))
    train = train_lib.jit_train_step(
        model, tx, schedule, configs.step_config_from_config(config), mesh, shardings
    )
    evaluate = train_lib.jit_eval_step(model, mesh, shardings)
    start = time.perf_counter()
    out["train"] = train.lower(state, {"image": images, "label": labels}, key).compile()
    out["train_compile_s"] = time.perf_counter() - start
    # As the compiled program takes it (not as asked): the state's shards on one device.
    taken = out["train"].input_shardings[0][0]
    out["state_bytes"] = _bytes_per_device(abstract_state, taken)
    mask = _abstract((batch,), jnp.float32, data)
    start = time.perf_counter()
    out["eval"] = evaluate.lower(state.params, {"image": images, "label": labels, "mask": mask}).compile()
    out["eval_compile_s"] = time.perf_counter() - start
    return out


def _bytes_per_device(tree: Any, shardings: Any) -> int:
    """The bytes of one device's shards of every leaf of ``tree`` under ``shardings`` (unpadded)."""
    leaves = jax.tree_util.tree_leaves(tree)
    shardings = jax.tree_util.tree_leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    return sum(
        jnp.dtype(a.dtype).itemsize * math.prod(s.shard_shape(a.shape))
        for a, s in zip(leaves, shardings, strict=True)
    )


def memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled step: arguments, outputs, temporaries and their peak sum."""
    m = compiled.memory_analysis()
    used = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "aliased_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "total_bytes": int(used),
    }


_SHAPE = re.compile(r"\b(pred|[fsu]\d+|bf16|c64|c128)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


def collectives(compiled: Any) -> dict[str, dict[str, int]]:
    """``{kind: {"count": n, "bytes": result bytes}}`` of the collectives in a compiled program (per device)."""
    found: dict[str, dict[str, int]] = {}
    pattern = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in compiled.as_text().splitlines():
        match = pattern.search(line)
        if not match:
            continue
        entry = found.setdefault(match.group(2), {"count": 0, "bytes": 0})
        entry["count"] += 1
        for dtype, dims in _SHAPE.findall(match.group(1)):
            size = _ITEMSIZE.get(dtype) or int(dtype[1:]) // 8
            for d in filter(None, dims.split(",")):
                size *= int(d)
            entry["bytes"] += size
    return found


def _costs(compiled: Any) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _compile_if_it_fits(config: Any, devices: list[Any], batch: int) -> tuple[dict[str, Any] | None, str]:
    """``(steps, "")``, or ``(None, the compiler's first line)`` where the step does not fit in HBM."""
    try:
        return _compiled_steps(config, devices, batch), ""
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return None, str(err).splitlines()[0]


def plan(config: Any, topology: str, max_batch: bool = True) -> dict[str, Any]:
    """The plan of ``config`` on ``topology``: a dict of per-device figures (see the module docstring)."""
    devices, chip, per_chip = topology_devices(topology)
    n, hbm = len(devices), chip.hbm_bytes // per_chip
    steps, out_of_memory = _compile_if_it_fits(config, devices, config.batch_size)
    result: dict[str, Any] = {
        "topology": SLICES.get(topology, topology),
        "devices": n,
        "devices_per_chip": per_chip,
        "hbm_bytes_per_device": hbm,
        "mesh": {"data": n // config.mesh.fsdp, "fsdp": config.mesh.fsdp},
        "batch": config.batch_size,
        "batch_per_device": config.batch_size // n,
    }
    fitting = config.batch_size
    if steps is None:
        result["train"] = {"fits": False, "compiler": out_of_memory}
        while steps is None and fitting // 2 >= n and (fitting // 2) % n == 0:
            fitting //= 2
            steps, _ = _compile_if_it_fits(config, devices, fitting)
        result["largest_compiled_batch_per_device"] = fitting // n if steps else None
    else:
        result.update(_figures(steps, config.batch_size // n, chip, per_chip, hbm))
    half = fitting // 2
    if steps is not None and max_batch and half >= n and half % n == 0:
        total = memory(steps["train"])["total_bytes"]
        smaller = memory(_compiled_steps(config, devices, half)["train"])["total_bytes"]
        per_example = (total - smaller) / (fitting - half) * n
        fixed = total - per_example * (fitting // n)
        result["max_batch_per_device"] = int((hbm - fixed) // per_example) if per_example > 0 else None
    return result


def _figures(
    steps: dict[str, Any], batch_per_device: int, chip: Chip, per_chip: int, hbm: int
) -> dict[str, Any]:
    """The per-device figures of steps that compiled."""
    train, evaluate = memory(steps["train"]), memory(steps["eval"])
    flops, hbm_traffic = _costs(steps["train"])
    # Forward matmul FLOPs x 3 (the backward pass costs two forwards), as MFU counts them.
    model_flops = 3 * steps["forward_flops_per_example"] * batch_per_device
    return {
        "state_bytes_per_device": steps["state_bytes"],
        "train": {**train, "fits": train["total_bytes"] <= hbm, "compile_s": steps["train_compile_s"]},
        "eval": {**evaluate, "fits": evaluate["total_bytes"] <= hbm, "compile_s": steps["eval_compile_s"]},
        "model_flops_per_device": model_flops,
        # XLA's cost analysis counts a loop body once: a scanned encoder's blocks count as one.
        "xla_flops_per_device": flops,
        "xla_eval_flops_per_device": _costs(steps["eval"])[0],
        "hbm_bytes_accessed_per_device": hbm_traffic,
        "collectives": collectives(steps["train"]),
        "step_time_lower_bound_s": max(
            model_flops / (chip.flops / per_chip), hbm_traffic / (chip.hbm_bandwidth / per_chip)
        ),
    }


def format_plan(p: dict[str, Any]) -> str:
    """The plan as the lines ``python -m jaxvit.plan`` prints."""
    gib = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / 2**20:.1f} MiB"  # noqa: E731
    t = p["train"]
    head = (
        f"topology {p['topology']}: {p['devices']} devices ({p['devices_per_chip']} per chip),"
        f" mesh data={p['mesh']['data']} fsdp={p['mesh']['fsdp']}, batch {p['batch']} ({p['batch_per_device']} per device)"
    )
    if "compiler" in t:  # the TPU compiler refused the step: it does not fit
        largest = p.get("max_batch_per_device") or p.get("largest_compiled_batch_per_device")
        return "\n".join(
            [
                head,
                f"train step does NOT fit: {t['compiler']}",
                f"  largest batch per device that fits: {largest} (estimate)"
                if largest
                else "  no batch of at least one example per device fits",
            ]
        )
    lines = [
        head,
        f"train step per device: arguments {gib(t['argument_bytes'])} (state {gib(p['state_bytes_per_device'])}),"
        f" outputs {gib(t['output_bytes'])} ({gib(t['aliased_bytes'])} donated), temporaries {gib(t['temp_bytes'])}",
        f"  total {gib(t['total_bytes'])} of {gib(p['hbm_bytes_per_device'])} HBM: {'fits' if t['fits'] else 'does NOT fit'}"
        + (
            f"; largest batch per device that fits: {p['max_batch_per_device']} (estimate)"
            if p.get("max_batch_per_device")
            else ""
        ),
        f"  {p['model_flops_per_device'] / 1e12:.3f} TFLOP (model: forward matmuls x 3) and"
        f" {p['hbm_bytes_accessed_per_device'] / 1e9:.2f} GB of HBM traffic (XLA's count, a loop body once) per device;"
        f" roofline lower bound {p['step_time_lower_bound_s'] * 1e3:.1f} ms per step (a bound from peak figures, not a measurement)",
        "  collectives: "
        + (
            ", ".join(
                f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in p["collectives"].items()
            )
            or "none"
        ),
        f"  compiled in {t['compile_s']:.1f} s",
        f"eval step per device: total {gib(p['eval']['total_bytes'])}: {'fits' if p['eval']['fits'] else 'does NOT fit'};"
        f" compiled in {p['eval']['compile_s']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxvit.plan``: prints the plan (``--json``: as JSON); 2 and one line on bad input."""
    from absl import flags
    from ml_collections import config_flags

    from jaxvit.training import configs

    argv = sys.argv if argv is None else argv
    default = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py"
    )
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", default, "Training config file.", flag_values=values)
    topology = flags.DEFINE_string("topology", "", "TPU topology, e.g. v5e:2x4 or v5e-8.", flag_values=values)
    as_json = flags.DEFINE_bool("json", False, "Print the plan as JSON.", flag_values=values)
    max_batch = flags.DEFINE_bool(
        "max_batch",
        True,
        "Compile at half the batch too, to estimate the largest that fits.",
        flag_values=values,
    )
    try:
        configs.check_overrides(argv[1:], default)
        values(argv)
        if not topology.value:
            raise ValueError("--topology is required, e.g. --topology v5e:2x4 (or a slice name: v5e-8)")
        # A deviceless compile: the process itself runs on the CPU even where libtpu could find a TPU.
        jax.config.update("jax_platforms", "cpu")
        result = plan(config.value, topology.value, max_batch.value)
    except (ValueError, flags.Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if as_json.value else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
