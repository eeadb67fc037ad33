"""The training loop: data, compiled steps, logging, checkpoints, signals.

``train_and_evaluate(config, workdir)`` is what ``train.py`` runs. The
numerical work is in the pure functions of ``jaxvit.training.train_lib``; this module
only wires them to I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxvit.checkpoints.workdir import model_from_config
from jaxvit.data import naflex
from jaxvit.data import pipeline as data
from jaxvit.model import VisionTransformer
from jaxvit.sizes import to_pair
from jaxvit.training import checkpointing, configs, optim, train_lib

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

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


class TrainMetricsAccumulator:
    """The train metrics of the steps since the last summary, and the wall time they took.

    The per-step metrics stay on the device until ``summarize`` fetches them all
    at once: fetching every step would stall the dispatch of the next one.
    ``clock`` returns seconds (a fake one in tests).
    """

    def __init__(self, batch_size: int, start_step: int, clock: Callable[[], float] = time.perf_counter):
        self._batch_size = batch_size
        self._clock = clock
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._start(start_step, clock())

    def _start(self, step: int, now: float) -> None:
        self._since_step = step
        self._since_time = now
        self._data_wait = 0.0

    def add(self, step: int, metrics: dict[str, Any]) -> None:
        """Keeps the metrics ``train_step`` returned for ``step`` (device arrays, not fetched)."""
        self._pending.append((step, metrics))

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Counts the time spent inside the ``with`` block as waiting for the next batch."""
        start = self._clock()
        try:
            yield
        finally:
            self._data_wait += self._clock() - start

    def summarize(self, step: int) -> dict[str, float] | None:
        """The means of the steps added since the last summary, up to ``step``; ``None`` if there are none.

        Raises ``NonFiniteLossError`` naming the first step whose loss, gradient or
        update was not finite.
        """
        if not self._pending:
            return None
        fetched = jax.device_get(self._pending)
        self._pending.clear()
        _raise_if_not_finite(fetched)
        now = self._clock()
        elapsed = max(now - self._since_time, 1e-9)
        means = {k: float(np.mean([m[k] for _, m in fetched])) for k in ("loss", "accuracy", "grad_norm")}
        examples = [m.get("examples", self._batch_size) for _, m in fetched]
        summary = {
            "train/loss": means["loss"],
            "train/accuracy": means["accuracy"],
            "train/grad_norm": means["grad_norm"],
            "learning_rate": float(fetched[-1][1]["learning_rate"]),
            # NaFlex steps hold different numbers of images: counted from the steps themselves
            "images_per_sec": float(np.sum(examples)) * (step - self._since_step) / len(fetched) / elapsed,
            "train/data_wait": self._data_wait / elapsed,
        }
        if "padding" in fetched[0][1]:
            summary["train/padding"] = float(np.mean([m["padding"] for _, m in fetched]))
        self._start(step, now)
        return summary


def _raise_if_not_finite(fetched: list[tuple[int, dict[str, Any]]]) -> None:
    for step, m in fetched:
        if not m["finite"]:
            raise NonFiniteLossError(
                f"non-finite loss, gradient or update at step {step} (loss={float(m['loss'])}, grad_norm="
                f"{float(m['grad_norm'])}); stopped. Parameters were not updated with it; the newest"
                " checkpoint holds the last good state. Lower the learning rate or check the data."
            )


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


def validate_config(config: Any, num_devices: int) -> VisionTransformer:
    """Raises ``ValueError`` naming the key for config values that cannot train.

    Returns the model the config describes: building it is part of the check.
    """
    configs.check_values(config)
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
    if config.get("model_from_checkpoint") and not config.init_from:
        raise ValueError("model_from_checkpoint=True needs init_from=<a pretrained checkpoint>, got ''")
    model = model_from_config(config.to_dict())
    size = to_pair(config.image_size)
    p, q = to_pair(model.patch_size)
    if size[0] % p or size[1] % q:
        raise ValueError(
            f"image_size={config.image_size} is not divisible by the model's patch size {model.patch_size}"
        )
    sizes = flexi_patch_sizes(config)
    if any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 or size[0] % s or size[1] % s for s in sizes
    ):
        raise ValueError(
            f"flexi_patch_sizes={list(sizes)} must be positive ints that divide image_size={config.image_size}"
        )
    _check_naflex(config, model, num_devices)
    return model


def _check_naflex(config: Any, model: VisionTransformer, num_devices: int) -> None:
    """Raises for a NaFlex config (``naflex.seq_lens``) that cannot train, naming what is refused."""
    budget = naflex.budget_from_config(config, num_devices)
    if budget is None:
        return
    if not model.posemb_grid or model.posemb != "learn" or not isinstance(model.patch_size, int):
        raise ValueError(
            "naflex.seq_lens needs a model with a learned table of its own grid (model.posemb_grid, as"
            f" SigLIP 2 NaFlex) and square patches; got posemb={model.posemb!r},"
            f" posemb_grid={model.posemb_grid}, patch_size={model.patch_size}"
        )
    aug = config.augment
    refused = {
        "augment.mixup_alpha": aug.mixup_alpha,
        "augment.cutmix_alpha": aug.cutmix_alpha,
        "augment.random_resized_crop": aug.random_resized_crop,
        "augment.crop_padding": aug.crop_padding,
        "augment.randaugment_num_ops": aug.randaugment_num_ops,
        "flexi_patch_sizes": flexi_patch_sizes(config),
        "grad_accum_steps": config.grad_accum_steps - 1,
    }
    refused = {k: v for k, v in refused.items() if v}
    if refused:
        raise ValueError(
            f"NaFlex training (naflex.seq_lens) takes each image whole, at its aspect ratio, with"
            f" augment.flip only; refused: {refused}"
        )
    if config.naflex.eval_max_patches < 0:
        raise ValueError(f"naflex.eval_max_patches must be >= 0, got {config.naflex.eval_max_patches}")


def flexi_patch_sizes(config: Any) -> tuple[int, ...]:
    """The patch sizes a FlexiViT run draws from (``config.flexi_patch_sizes``); () when off."""
    sizes = config.get("flexi_patch_sizes") or ()
    return tuple(sizes) if isinstance(sizes, (list, tuple)) else (sizes,)


def patch_size_of_step(config: Any, step: int) -> int | None:
    """The patch size of ``step`` in a FlexiViT run, drawn uniformly from ``flexi_patch_sizes`` by
    the seed and the step alone (a resumed run draws the same); None when off."""
    sizes = flexi_patch_sizes(config)
    if not sizes:
        return None
    return sizes[int(np.random.default_rng([config.seed, step]).integers(len(sizes)))]


def _data_sources(config: Any) -> tuple[Any, Any]:
    """The train and test sources, checked against each other and ``num_classes``."""
    train_source = data.make_source(config, "train")
    test_source = data.make_source(config, "test")
    if config.dataset == "imagefolder":
        data.check_same_classes(train_source, test_source, config.data.root)
    if len(train_source.class_names) != config.num_classes:
        raise ValueError(
            f"num_classes={config.num_classes} but the dataset has {len(train_source.class_names)} classes"
        )
    return train_source, test_source


@dataclasses.dataclass(frozen=True)
class _CompiledSteps:
    """The jitted steps and the state and shardings they were compiled for."""

    train_step: Callable[..., Any]  # (state, batch, rng) -> (state, metrics); donates the state
    eval_step: Callable[..., Any]  # (params, batch) -> sums
    init_state: Callable[[], train_lib.TrainState]  # a fresh state; unjitted
    abstract_state: Any  # shapes, dtypes and shardings of the state, to restore into
    state_shardings: Any
    batch_sharding: jax.sharding.NamedSharding


def _compile_steps(config: Any, model: VisionTransformer, init_rng: jax.Array) -> _CompiledSteps:
    """The optimizer, mesh and step settings of ``config``, jitted into train and eval steps."""
    mesh = train_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    tx, schedule = optim.make_optimizer(config, config.total_steps, depth=model.depth)
    image_shape = (*to_pair(config.image_size), config.num_channels)
    init_state = functools.partial(
        train_lib.create_train_state, model, tx, init_rng, image_shape, config.ema_decay > 0
    )
    abstract_state = jax.eval_shape(init_state)
    train_step, eval_step, shardings = train_lib.compile_steps(
        model, tx, schedule, configs.step_config_from_config(config), mesh, abstract_state
    )
    with_shardings = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )
    return _CompiledSteps(
        train_step, eval_step, init_state, with_shardings, shardings, train_lib.batch_sharding(mesh)
    )


def _checkpointer(config: Any, workdir: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(
        workdir,
        max_to_keep=config.max_to_keep,
        async_save=config.async_checkpointing,
        best_metric=config.best_metric or None,
        best_mode=config.best_mode,
    )


def _initial_state(
    config: Any, model: VisionTransformer, compiled: _CompiledSteps, ckpt: Any = None
) -> train_lib.TrainState:
    """A fresh state, placed sharded; with ``init_from``, holding a pretrained checkpoint's parameters.

    ``ckpt`` is ``init_from`` already read (``read_checkpoint``), when it was.
    """
    state = jax.jit(compiled.init_state, out_shardings=compiled.state_shardings)()
    if config.init_from:
        state = jax.device_put(_init_params_from(config, model, state, ckpt), compiled.state_shardings)
    return state


def _init_params_from(
    config: Any, model: VisionTransformer, state: train_lib.TrainState, ckpt: Any = None
) -> train_lib.TrainState:
    """Fine-tuning hook: replace the fresh parameters with a pretrained checkpoint's."""
    from jaxvit.checkpoints import pretrained  # the converters; imported only when used

    if ckpt is None:
        ckpt = pretrained.read_checkpoint(config.init_from)
    params = pretrained.fit_to_model(ckpt, model, config.image_size)
    params = jax.tree_util.tree_map(lambda new, old: jnp.asarray(new, old.dtype), params, state.params)
    ema = jax.tree_util.tree_map(jnp.copy, params) if state.ema_params is not None else None
    return state.replace(params=params, ema_params=ema)


def _write_run_files(workdir: str, config: Any, class_names: list[str]) -> None:
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, default=str)
    with open(os.path.join(workdir, "labels.txt"), "w") as f:
        f.write("\n".join(class_names) + "\n")


def _train_batches(
    config: Any,
    source: Any,
    layout: data.BatchLayout,
    preprocess: Any,
    data_state: dict[str, Any] | None,
    patch_size: Any = None,
) -> Any:
    """The train batch iterator, moved to ``data_state`` (a checkpoint's position) when resuming."""
    budget = naflex.budget_from_config(config, jax.device_count())
    if budget is not None:
        batches = naflex.train_batches(
            source,
            layout,
            budget,
            patch_size,
            flip=config.augment.flip,
            mean=preprocess.mean,
            std=preprocess.std,
            num_steps=config.total_steps,
            workers=config.data.workers,
        )
    else:
        batches = data.train_batches(
            source,
            layout,
            preprocess,
            seed=config.seed,
            num_steps=config.total_steps,
            workers=config.data.workers,
        )
    if data_state is not None:
        batches.set_state(data_state)
    return batches


def _progress_bar(config: Any, start_step: int) -> tqdm:
    return tqdm(
        total=config.total_steps,
        initial=start_step,
        disable=not config.progress_bar or jax.process_index() != 0,
        dynamic_ncols=True,
        file=sys.stderr,
    )


def _every(interval: int, step: int) -> bool:
    """Whether ``step`` is a multiple of ``interval``; an interval of 0 means never."""
    return bool(interval) and step % interval == 0


def _log_train_metrics(meter: TrainMetricsAccumulator, writer: MetricsWriter, bar: tqdm, step: int) -> None:
    summary = meter.summarize(step)
    if summary is None:
        return
    writer.write(step, summary)
    bar.set_postfix(loss=f"{summary['train/loss']:.4f}", img_s=f"{summary['images_per_sec']:.0f}")


def naflex_eval_preprocess(config: Any, model: VisionTransformer) -> Any:
    """How evaluation prepares a NaFlex run's images: ``(patch, budget, mean, std)``; None when off."""
    if not naflex.budget_from_config(config, 1):
        return None
    budget = config.naflex.eval_max_patches or max(config.naflex.seq_lens)
    return (model.patch_size, budget, tuple(config.data.mean), tuple(config.data.std))


def _eval_batches(source: Any, layout: data.BatchLayout, preprocess: Any) -> Any:
    if isinstance(preprocess, tuple):  # NaFlex (naflex_eval_preprocess)
        return naflex.eval_batches(source, layout, *preprocess)
    return data.eval_batches(source, layout, preprocess)


def _evaluate(eval_step, source, layout, preprocess, sharding, params) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy of ``params`` over the whole test source."""
    totals = None
    for batch in _eval_batches(source, layout, preprocess):
        sums = eval_step(params, train_lib.to_global(batch, sharding))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {
        "eval/loss": float(totals["loss"]) / count,
        "eval/top1": float(totals["top1"]) / count,
        "eval/top5": float(totals["top5"]) / count,
    }


def _evaluate_and_log(
    step: int,
    state: train_lib.TrainState,
    evaluate: Callable[[Any], dict[str, float]],
    writer: MetricsWriter,
    checkpointer: checkpointing.Checkpointer,
) -> dict[str, float]:
    """Evaluates the EMA parameters if kept, else the parameters; logs them and keeps them if best."""
    params = state.ema_params if state.ema_params is not None else state.params
    metrics = evaluate(params)
    if step not in writer.eval_steps:  # a rerun of a finished run evaluates again
        writer.write(step, metrics)
    checkpointer.save_best(step, params, metrics)
    return metrics


def _plot_curves(workdir: str) -> None:
    """``WORKDIR/curves.png`` from ``metrics.jsonl``; a plotting failure never fails a finished run."""
    if jax.process_index() != 0:
        return
    from jaxvit.training.curves import plot_curves

    try:
        plot_curves(workdir, os.path.join(workdir, "curves.png"))
    except (OSError, ValueError) as err:
        log.warning("could not plot the training curves: %s", err)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Trains ``config`` in ``workdir``, resuming if it holds a checkpoint.

    Returns the final eval metrics, or ``{"preempted_at_step": step}`` when a
    SIGTERM stopped the run after saving.
    """
    check_workdir(workdir)
    ckpt = None
    if config.get("model_from_checkpoint"):
        # The architecture is the checkpoint's; the config (and config.json) record it field by field.
        model, ckpt = configs.model_from_init_checkpoint(config)
        config = configs.with_model_fields(config, model)
        log.info("model from %s: %s", config.init_from, model)
    model = validate_config(config, jax.device_count())
    train_source, test_source = _data_sources(config)
    layout = data.BatchLayout(config.batch_size, jax.process_index(), jax.process_count())
    preprocess = data.preprocess_from_config(config)
    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    compiled = _compile_steps(config, model, init_rng)
    evaluate = functools.partial(
        _evaluate,
        compiled.eval_step,
        test_source,
        layout,
        naflex_eval_preprocess(config, model) or preprocess,
        compiled.batch_sharding,
    )

    with _checkpointer(config, workdir) as checkpointer:
        restored = checkpointer.restore_latest(compiled.abstract_state, train_rng)
        # Only now: a config that cannot restore the workdir's checkpoints must not
        # replace the config.json that describes them.
        _write_run_files(workdir, config, list(train_source.class_names))
        if restored is not None:
            state, train_rng, data_state, start_step = restored
            log.info("resuming from step %d", start_step)
        else:
            state, data_state, start_step = _initial_state(config, model, compiled, ckpt), None, 0
        batches = _train_batches(config, train_source, layout, preprocess, data_state, model.patch_size)
        meter = TrainMetricsAccumulator(config.batch_size, start_step)
        with (
            MetricsWriter(workdir, start_step) as writer,
            _progress_bar(config, start_step) as bar,
            _Preemption() as preemption,
        ):
            log_train = functools.partial(_log_train_metrics, meter, writer, bar)
            step = start_step
            while step < config.total_steps:
                with meter.waiting_for_data():
                    batch = next(batches)
                state, metrics = compiled.train_step(
                    state,
                    train_lib.to_global(batch, compiled.batch_sharding),
                    train_rng,
                    patch_size_of_step(config, step),
                )
                step += 1
                meter.add(step, metrics)
                bar.update(1)
                before_last = step < config.total_steps  # the last step's eval and save follow the loop
                if _every(config.log_every, step):
                    log_train(step)
                if _every(config.eval_every, step) and before_last:
                    log_train(step)
                    eval_metrics = _evaluate_and_log(step, state, evaluate, writer, checkpointer)
                    bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
                if _every(config.checkpoint_every, step) and before_last:
                    log_train(step)  # before any save: never keep a state after an unnoticed non-finite step
                    checkpointer.save(step, state, train_rng, batches.get_state())
                if preemption.should_stop():
                    log.warning("SIGTERM: saving at step %d and exiting", step)
                    log_train(step)
                    checkpointer.save(step, state, train_rng, batches.get_state())
                    return {"preempted_at_step": float(step)}
            log_train(step)
            final_metrics = _evaluate_and_log(step, state, evaluate, writer, checkpointer)
            checkpointer.save(step, state, train_rng, batches.get_state())
    _plot_curves(workdir)
    return final_metrics
