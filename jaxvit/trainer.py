"""The training loop: data, compiled steps, logging, checkpoints, signals.

``train_and_evaluate(config, workdir)`` is what ``train.py`` runs. The
numerical work is in the pure functions of ``jaxvit.train_lib``; this module
only wires them to I/O.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxvit import checkpointing, configs, data, optim, train_lib
from jaxvit.configs import model_from_config
from jaxvit.model import to_pair

log = logging.getLogger(__name__)


EVAL_METRICS = ("eval/loss", "eval/top1", "eval/top5")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss, gradient or update; the message names the step."""


class _Preemption:
    """Remembers a SIGTERM so the loop can save at the current step and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self) -> bool:
        """Whether any process was signalled: the save is collective, so all agree first."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


class MetricsWriter:
    """``metrics.jsonl`` (one JSON object per line) and TensorBoard events, on process 0 only."""

    def __init__(self, workdir: str, start_step: int):
        self.active = jax.process_index() == 0
        self.eval_steps: set[int] = set()  # steps whose evaluation is already logged
        if not self.active:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        self.eval_steps = _truncate_metrics(path, start_step)
        self._jsonl = open(path, "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        """Appends ``{"step": step, **values}`` to metrics.jsonl and TensorBoard."""
        if not self.active:
            return
        if any(k.startswith("eval/") for k in values):
            self.eval_steps.add(step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()


def _truncate_metrics(path: str, start_step: int) -> set[int]:
    """Keeps the complete lines up to ``start_step``: a resumed run rewrites the steps
    after its checkpoint, and a line cut off by a kill must not merge with the next.
    Returns the steps whose evaluation lines were kept."""
    if not os.path.exists(path):
        return set()
    kept, eval_steps = [], set()
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if line.endswith("\n") and record.get("step", 0) <= start_step:
                kept.append(line)
                if any(k.startswith("eval/") for k in record):
                    eval_steps.add(record["step"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return eval_steps


def check_workdir(workdir: str) -> None:
    """Creates ``workdir`` and proves it writable, before any compile: raises ``PermissionError`` naming it."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise PermissionError(f"workdir {workdir!r} is not writable: {err}") from err


def validate_config(config: Any, num_devices: int) -> None:
    """Raises ``ValueError`` naming the key for config values that cannot train."""
    if config.batch_size < 1 or config.batch_size % num_devices:
        raise ValueError(
            f"batch_size={config.batch_size} (the global batch) must be a positive multiple of the"
            f" {num_devices} devices"
        )
    if config.total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {config.total_steps}")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if config[key] < 0:
            raise ValueError(f"{key} must be >= 0, got {config[key]}")
    if config.total_steps % config.grad_accum_steps:
        raise ValueError(
            f"total_steps={config.total_steps} is not a multiple of grad_accum_steps={config.grad_accum_steps}:"
            " the last accumulated gradients would never be applied"
        )
    if config.best_metric and config.best_metric not in EVAL_METRICS:
        raise ValueError(f"best_metric={config.best_metric!r} is not one of {EVAL_METRICS} (or '' for none)")
    if config.best_metric == "eval/loss" and config.best_mode != "min":
        raise ValueError("best_metric='eval/loss' needs best_mode='min'")
    if config.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {config.num_classes}")
    model = model_from_config(config.to_dict())
    size = to_pair(config.image_size)
    p, q = to_pair(model.patch_size)
    if size[0] % p or size[1] % q:
        raise ValueError(
            f"image_size={config.image_size} is not divisible by the model's patch size {model.patch_size}"
        )


def _write_run_files(workdir: str, config: Any, class_names: list[str]) -> None:
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, default=str)
    with open(os.path.join(workdir, "labels.txt"), "w") as f:
        f.write("\n".join(class_names) + "\n")


def _evaluate(evaluate, params, source, layout, preprocess, sharding) -> dict[str, float]:
    totals = None
    for batch in data.eval_batches(source, layout, preprocess):
        sums = evaluate(params, train_lib.to_global(batch, sharding))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {
        "eval/loss": float(totals["loss"]) / count,
        "eval/top1": float(totals["top1"]) / count,
        "eval/top5": float(totals["top5"]) / count,
    }


def _init_params_from(config: Any, model, state: train_lib.TrainState) -> train_lib.TrainState:
    """Fine-tuning hook: replace the fresh parameters with a pretrained checkpoint's."""
    from jaxvit import pretrained  # the converters; imported only when used

    params = pretrained.load_pretrained(config.init_from, model, image_size=config.image_size)
    params = jax.tree_util.tree_map(lambda new, old: jnp.asarray(new, old.dtype), params, state.params)
    ema = jax.tree_util.tree_map(jnp.copy, params) if state.ema_params is not None else None
    return state.replace(params=params, ema_params=ema)


def _plot_curves(workdir: str) -> None:
    """``WORKDIR/curves.png`` from ``metrics.jsonl``; a plotting failure never fails a finished run."""
    if jax.process_index() != 0:
        return
    from jaxvit.visualize import plot_curves

    try:
        plot_curves(workdir, os.path.join(workdir, "curves.png"))
    except (OSError, ValueError) as err:
        log.warning("could not plot the training curves: %s", err)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns the final eval metrics."""
    check_workdir(workdir)
    num_devices = jax.device_count()
    validate_config(config, num_devices)
    model = model_from_config(config.to_dict())
    mesh = train_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    image_size = to_pair(config.image_size)
    image_shape = (*image_size, config.num_channels)

    train_source = data.make_source(config, "train")
    test_source = data.make_source(config, "test")
    if config.dataset == "imagefolder":
        data.check_same_classes(train_source, test_source, config.data.root)
    if len(train_source.class_names) != config.num_classes:
        raise ValueError(
            f"num_classes={config.num_classes} but the dataset has {len(train_source.class_names)} classes"
        )
    layout = data.BatchLayout(config.batch_size, jax.process_index(), jax.process_count())
    preprocess = data.preprocess_from_config(config)

    tx, schedule = optim.make_optimizer(config, config.total_steps)
    step_cfg = configs.step_config_from_config(config)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    use_ema = config.ema_decay > 0

    def init_state():
        return train_lib.create_train_state(model, tx, init_rng, image_shape, use_ema)

    abstract_state = jax.eval_shape(init_state)
    train_step, eval_step, shardings = train_lib.compile_steps(
        model, tx, schedule, step_cfg, mesh, abstract_state
    )
    batch_sharding = train_lib.batch_sharding(mesh)

    checkpointer = checkpointing.Checkpointer(
        workdir, config.max_to_keep, config.async_checkpointing, config.best_metric or None, config.best_mode
    )
    abstract_with_sharding = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    restored = checkpointer.restore_latest(abstract_with_sharding, train_rng)
    # Only now: a config that cannot restore the workdir's checkpoints must not
    # replace the config.json that describes them.
    _write_run_files(workdir, config, list(train_source.class_names))
    if restored is not None:
        state, train_rng, data_state, start_step = restored
        log.info("resuming from step %d", start_step)
    else:
        state = jax.jit(init_state, out_shardings=shardings)()
        if config.init_from:
            state = jax.device_put(_init_params_from(config, model, state), shardings)
        data_state, start_step = None, 0

    batches = data.train_batches(
        train_source,
        layout,
        preprocess,
        seed=config.seed,
        num_steps=config.total_steps,
        workers=config.data.workers,
    )
    if data_state is not None:
        batches.set_state(data_state)
    writer = MetricsWriter(workdir, start_step)
    bar = tqdm(
        total=config.total_steps,
        initial=start_step,
        disable=not config.progress_bar or jax.process_index() != 0,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_eval: dict[str, float] = {}
    timer = (time.perf_counter(), start_step)

    def flush_metrics(step: int) -> None:
        """Reads the per-step metrics since the last flush; stops at the first non-finite loss."""
        nonlocal timer
        if not pending:
            return
        fetched = jax.device_get(pending)
        pending.clear()
        for s, m in fetched:
            if not m["finite"]:
                raise NonFiniteLossError(
                    f"non-finite loss, gradient or update at step {s} (loss={float(m['loss'])}, grad_norm="
                    f"{float(m['grad_norm'])}); stopped. Parameters were not updated with it; the newest"
                    " checkpoint holds the last good state. Lower the learning rate or check the data."
                )
        elapsed = time.perf_counter() - timer[0]
        images_per_sec = (step - timer[1]) * config.batch_size / max(elapsed, 1e-9)
        timer = (time.perf_counter(), step)
        means = {k: float(np.mean([m[k] for _, m in fetched])) for k in ("loss", "accuracy", "grad_norm")}
        values = {
            "train/loss": means["loss"],
            "train/accuracy": means["accuracy"],
            "train/grad_norm": means["grad_norm"],
            "learning_rate": float(fetched[-1][1]["learning_rate"]),
            "images_per_sec": images_per_sec,
        }
        writer.write(step, values)
        bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{images_per_sec:.0f}")

    saved_step = start_step if restored is not None else -1

    def save(step: int) -> None:
        nonlocal saved_step
        flush_metrics(step)  # never save a state after a non-finite step went unnoticed
        if step == saved_step:  # e.g. SIGTERM at a checkpoint step: orbax refuses a second save
            return
        checkpointer.save(step, state, train_rng, batches.get_state())
        saved_step = step

    def run_eval(step: int) -> dict[str, float]:
        params = state.ema_params if use_ema else state.params
        metrics = _evaluate(eval_step, params, test_source, layout, preprocess, batch_sharding)
        if step not in writer.eval_steps:  # a rerun of a finished run evaluates again
            writer.write(step, metrics)
        checkpointer.save_best(step, params, metrics)
        return metrics

    step = start_step
    try:
        with _Preemption() as preemption:
            while step < config.total_steps:
                batch = train_lib.to_global(next(batches), batch_sharding)
                state, metrics = train_step(state, batch, train_rng)
                step += 1
                pending.append((step, metrics))
                bar.update(1)
                if config.log_every and step % config.log_every == 0:
                    flush_metrics(step)
                if config.eval_every and step % config.eval_every == 0 and step < config.total_steps:
                    flush_metrics(step)
                    last_eval = run_eval(step)
                    bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
                if (
                    config.checkpoint_every
                    and step % config.checkpoint_every == 0
                    and step < config.total_steps
                ):
                    save(step)
                if preemption.should_stop():
                    log.warning("SIGTERM: saving at step %d and exiting", step)
                    save(step)
                    checkpointer.wait()
                    bar.close()
                    return {"preempted_at_step": float(step)}
            flush_metrics(step)
            if not last_eval or start_step < step:
                last_eval = run_eval(step)
            if start_step < step or restored is None:
                save(step)
            checkpointer.wait()
            _plot_curves(workdir)
    finally:
        bar.close()
        writer.close()
        checkpointer.wait()
        checkpointer.close()
    return last_eval
