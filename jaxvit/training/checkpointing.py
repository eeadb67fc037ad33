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
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxvit import compat
from jaxvit.checkpoints.workdir import (  # noqa: F401 (workdir readers, used by the tools and tests)
    BEST_DIR,
    LATEST_DIR,
    ConfigMismatchError,
    _restore_as_numpy,
    restore_params,
)

log = logging.getLogger(__name__)

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


def __getattr__(name: str) -> Any:
    # Names this module held before (see jaxvit.compat).
    return compat.moved_name(__name__, name)
