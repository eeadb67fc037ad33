"""Checkpoints with orbax: the train state, the base RNG and the data iterator position.

``WORKDIR/checkpoints/<step>/`` holds the newest ``max_to_keep`` steps for
resuming; ``WORKDIR/checkpoints_best/<step>/`` holds the parameters of the
best evaluation by the chosen metric. Orbax writes each step into a temporary
directory and renames it when complete, so a run killed mid-save never leaves
a partial checkpoint that looks like the newest one; ``restore_latest`` also
falls back to an older step, with a warning, if the newest cannot be read,
and moves the unreadable one to ``WORKDIR/checkpoints_unreadable/``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxvit import configs

log = logging.getLogger(__name__)

LATEST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
UNREADABLE_DIR = "checkpoints_unreadable"


class Checkpointer:
    """Saves and restores training checkpoints under ``workdir``.

    As a context manager it waits for pending saves and closes on exit.
    """

    def __init__(
        self,
        workdir: str,
        max_to_keep: int = 2,
        async_save: bool = True,
        best_metric: str | None = None,
        best_mode: str = "max",
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        workdir = os.path.abspath(workdir)
        self.latest = ocp.CheckpointManager(
            os.path.join(workdir, LATEST_DIR),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
        )
        self.best_metric = best_metric
        self.last_step: int | None = None  # the newest step saved or restored here
        self.best = None
        if best_metric:
            self.best = ocp.CheckpointManager(
                os.path.join(workdir, BEST_DIR),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    best_fn=lambda metrics: metrics[best_metric],
                    best_mode=best_mode,
                    keep_checkpoints_without_metrics=False,
                    enable_async_checkpointing=async_save,
                    cleanup_tmp_directories=True,
                ),
            )

    def save(self, step: int, state: Any, rng: jax.Array, data_state: dict[str, Any]) -> None:
        """Starts saving ``state``, ``rng`` and the data iterator state at ``step`` (async).

        Does nothing if ``step`` is the step last saved or restored (a SIGTERM right
        after a periodic save; a rerun of a finished run): orbax refuses a second save.
        """
        if step == self.last_step:
            return
        # Two managers saving the same step at once confuse orbax's cross-process
        # barriers; one save in flight at a time.
        if self.best is not None:
            self.best.wait_until_finished()
        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                # host numpy: saved once, from the primary process
                rng=ocp.args.StandardSave({"key_data": np.asarray(jax.random.key_data(rng))}),
                data=ocp.args.JsonSave(data_state),
            ),
            force=True,
        )
        self.last_step = step

    def save_best(self, step: int, params: Any, metrics: dict[str, float]) -> None:
        """Keeps ``params`` if ``metrics[best_metric]`` is the best seen so far."""
        if self.best is None:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        self.latest.wait_until_finished()
        self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), metrics=metrics)

    def restore_latest(
        self, abstract_state: Any, abstract_rng: jax.Array
    ) -> tuple[Any, jax.Array, dict, int] | None:
        """``(state, rng, data_state, step)`` from the newest readable checkpoint, or ``None`` if there is none.

        ``abstract_state`` carries shapes, dtypes and shardings (e.g. from
        ``jax.eval_shape`` plus ``state_shardings``).
        """
        steps = sorted(self.latest.all_steps(), reverse=True)
        errors = []
        for step in steps:
            try:
                restored = self.latest.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        rng=ocp.args.StandardRestore(
                            {"key_data": np.asarray(jax.random.key_data(abstract_rng))}
                        ),
                        data=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as err:  # any unreadable checkpoint: try the one before it
                log.warning("checkpoint at step %d cannot be restored (%s); trying an older one", step, err)
                errors.append((step, err))
                continue
            if errors:
                log.warning(
                    "resumed from step %d after skipping unreadable step(s) %s", step, [s for s, _ in errors]
                )
                self._set_aside([s for s, _ in errors])
            rng = jax.random.wrap_key_data(np.asarray(restored["rng"]["key_data"]))
            self.last_step = step
            return restored["state"], rng, dict(restored["data"]), step
        if errors:
            raise RuntimeError(
                f"no checkpoint in {self.latest.directory} could be restored; newest error: {errors[0][1]}"
            ) from errors[0][1]
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable steps to ``checkpoints_unreadable/``: the resumed run saves
        those step numbers again, and orbax refuses to save a step that exists."""
        directory = str(self.latest.directory)
        if jax.process_index() == 0:
            aside = os.path.join(os.path.dirname(directory), UNREADABLE_DIR)
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(os.path.join(directory, str(step)), target)
                log.warning("moved the unreadable checkpoint of step %d to %s", step, target)
        ocp.multihost.sync_global_processes("jaxvit_set_aside_unreadable")
        self.latest.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        """Releases orbax's resources; call ``wait`` first to be sure pending saves are on disk."""
        self.latest.close()
        if self.best is not None:
            self.best.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()
        self.close()


def restore_params(workdir: str, which: str = "latest", use_ema: bool = True) -> tuple[Any, Any, dict]:
    """``(model, params, config_dict)`` from a training workdir, for inference tools.

    The parameters come back as numpy arrays, whatever mesh saved them.
    ``which="latest"`` reads the newest readable checkpoint (its EMA parameters
    when the run kept them and ``use_ema``), ``"best"`` the best-by-metric one.
    """
    if which not in ("latest", "best"):
        raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{workdir!r} is not a training workdir: {config_path!r} is missing")
    from jaxvit.convert import validate

    config = validate.read_json_object(config_path, "workdir config")
    model = configs.model_from_config(config, where=config_path)
    size = validate.size_field(config, "image_size", config_path, default=224)
    directory = os.path.join(os.path.abspath(workdir), BEST_DIR if which == "best" else LATEST_DIR)
    item = "params" if which == "best" else "state"
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={
            item: ocp.PyTreeCheckpointHandler(),
            "rng": ocp.PyTreeCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
        },
    )
    errors = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            # The stored shapes are checked against config.json before any array is read.
            check = lambda stored, step=step: _check_stored_shapes(model, stored, size, config_path, step)  # noqa: E731
            tree = _restore_as_numpy(manager, step, item, use_ema and which == "latest", check)
        except ConfigMismatchError:
            raise
        except Exception as err:  # fall back to an older checkpoint, as resuming does
            log.warning("checkpoint at step %d in %s cannot be restored (%s)", step, directory, err)
            errors.append(err)
            continue
        if which == "best":
            return model, tree, config
        ema = tree.get("ema_params")
        return model, ema if ema is not None else tree["params"], config
    raise FileNotFoundError(f"no readable checkpoint in {directory!r}" + (f": {errors[0]}" if errors else ""))


class ConfigMismatchError(ValueError):
    """A workdir's ``config.json`` does not describe the parameters it stores."""


def _restore_as_numpy(
    manager: ocp.CheckpointManager, step: int, item: str, with_ema: bool, check: Any = None
) -> Any:
    """Restores ``item`` (for a train state only its params and EMA) as host numpy arrays.

    ``check(params_metadata)`` runs on the stored shapes before anything is read.
    """
    metadata = manager.item_metadata(step)[item]
    tree = dict(getattr(metadata, "tree", metadata))
    if item == "state":
        keys = ["params"] + (["ema_params"] if with_ema and tree.get("ema_params") else [])
        tree = {k: tree[k] for k in keys}
    if check is not None:
        for params in tree.values() if item == "state" else [tree]:
            check(params)
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{item: ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=True)}
        ),
    )
    return restored[item]


def _plain(tree: Any) -> Any:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _check_stored_shapes(model: Any, params: Any, size: Any, config_path: str, step: int) -> None:
    """Raises unless the restored ``params`` have the shapes ``model`` (from config.json) needs."""
    import flax

    from jaxvit.model import param_shapes

    want = flax.traverse_util.flatten_dict(flax.core.unfreeze(param_shapes(model, size)), sep="/")
    have = flax.traverse_util.flatten_dict(_plain(params), sep="/")

    def shape(key: str) -> tuple[int, ...]:
        return tuple(getattr(have[key], "shape", np.shape(have[key])))

    lines = [
        f"{k}: stored {shape(k)} vs config {tuple(want[k].shape)}"
        for k in sorted(set(want) & set(have))
        if shape(k) != tuple(want[k].shape)
    ]
    lines += [f"missing from the checkpoint: {k}" for k in sorted(set(want) - set(have))]
    lines += [f"not in the config's model: {k}" for k in sorted(set(have) - set(want))]
    if lines:
        shown = lines[:10] + ([f"... and {len(lines) - 10} more"] if len(lines) > 10 else [])
        raise ConfigMismatchError(
            f"{config_path} does not describe the parameters stored at step {step} ({len(lines)} problems):\n  "
            + "\n  ".join(shown)
        )


def __getattr__(name: str) -> Any:
    # Deprecated: ``model_from_config`` moved to ``jaxvit.configs``; the old name goes
    # in the next release.
    if name == "model_from_config":
        warnings.warn(
            "jaxvit.checkpointing.model_from_config is deprecated; use jaxvit.configs.model_from_config",
            DeprecationWarning,
            stacklevel=2,
        )
        return configs.model_from_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
