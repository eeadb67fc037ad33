"""Reading a training workdir: ``config.json`` plus orbax checkpoints, for inference and fine-tuning.

``WORKDIR/checkpoints/<step>/`` holds the newest steps (train state: params,
EMA params, optimizer state), ``WORKDIR/checkpoints_best/<step>/`` the
parameters of the best evaluation. ``jaxvit.training.checkpointing`` writes
them; this module only reads, and checks ``config.json`` against the stored
shapes before any array is read.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxvit import schema
from jaxvit.model import VisionTransformer, create_model, param_shapes
from jaxvit.safety import validate

log = logging.getLogger(__name__)

LATEST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"


def model_from_config(config: dict[str, Any], where: str = "the training config") -> VisionTransformer:
    """The ``VisionTransformer`` a training config describes (``config["model"]``).

    ``config`` is a plain dict (``ConfigDict.to_dict()`` or a workdir's ``config.json``).
    Every field is checked for its type and a sane size (``schema.read_fields``)
    before the model is built; errors name ``where``.
    """
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{where}: expected a JSON object with a 'model' object (a jaxvit training config)")
    fields = schema.read_fields({k: v for k, v in dict(config["model"]).items() if v is not None}, where)
    top = schema.read_fields(
        {"num_classes": config.get("num_classes"), "num_channels": config.get("num_channels", 3)}, where
    )
    variant = fields.pop("variant", None)
    for key in ("dtype", "param_dtype"):
        if isinstance(fields.get(key), str):
            fields[key] = jnp.dtype(fields[key])
    if isinstance(fields.get("patch_size"), list):  # JSON has no tuples
        fields["patch_size"] = tuple(fields["patch_size"])
    return create_model(variant, num_classes=top["num_classes"], num_channels=top["num_channels"], **fields)


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
    config = validate.read_json_object(config_path, "workdir config")
    model = model_from_config(config, where=config_path)
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
