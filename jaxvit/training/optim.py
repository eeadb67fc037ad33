"""Optimizers and learning-rate schedules (optax), built from the ``optimizer`` config block."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

OPTIMIZERS = ("adamw", "sgd", "lion", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")
# ``config.freeze`` shorthands -> the pattern they stand for.
FREEZE_SHORTHANDS = {"backbone": "(?!head/).*"}  # everything but the head: a linear (or MAP) probe
# Top-level parameters in front of the blocks: they get layer decay's smallest scale.
EMBEDDING_PARAMS = ("patch_embed", "cls_token", "dist_token", "pos_embed", "registers")


def learning_rate_schedule(
    base_lr: float,
    total_updates: int,
    warmup_updates: int = 0,
    decay: str = "cosine",
    end_factor: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from 0 to ``base_lr``, then ``decay`` to ``base_lr * end_factor`` at ``total_updates``."""
    if decay not in SCHEDULES:
        raise ValueError(f"unknown schedule {decay!r}: expected one of {SCHEDULES}")
    if warmup_updates > total_updates:
        raise ValueError(
            f"warmup ({warmup_updates} updates) is longer than training ({total_updates} updates)"
        )
    warmup = optax.linear_schedule(0.0, base_lr, max(warmup_updates, 1))
    rest = max(total_updates - warmup_updates, 1)
    if decay == "cosine":
        after = optax.cosine_decay_schedule(base_lr, rest, alpha=end_factor)
    elif decay == "linear":
        after = optax.linear_schedule(base_lr, base_lr * end_factor, rest)
    else:
        after = optax.constant_schedule(base_lr)
    if warmup_updates == 0:
        return after
    return optax.join_schedules([warmup, after], [warmup_updates])


def weight_decay_mask(params: Any) -> Any:
    """True for matmul/conv kernels only: biases, norms, the class token, the
    position embedding and the MAP probe are not decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) == "kernel", params)


def _leaf_name(path: tuple[Any, ...]) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def param_path(path: tuple[Any, ...]) -> str:
    """A ``tree_flatten_with_path`` key path -> ``"encoder/block_0/attn/qkv/kernel"``."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def freeze_patterns(freeze: str | Sequence[str] | None) -> tuple[str, ...]:
    """``config.freeze`` (one pattern, a shorthand, or a sequence of them) -> a tuple of regexes."""
    if not freeze:
        return ()
    if isinstance(freeze, str):
        freeze = (freeze,)
    return tuple(FREEZE_SHORTHANDS.get(p, p) for p in freeze)


def frozen_mask(params: Any, freeze: str | Sequence[str] | None) -> Any:
    """A tree like ``params`` of bools: True for the parameters ``freeze`` names.

    A pattern is a regular expression that names a parameter or a module:
    it freezes ``path`` when it fully matches ``path`` or one of its leading
    module paths (``"patch_embed"``, ``"encoder/block_[01]"``,
    ``"encoder/.*/norm1"``). ``"backbone"`` is everything but ``head/``.
    Raises ``ValueError`` for a pattern that matches nothing (listing the
    top-level parameter names) and when nothing is left to train.
    """
    patterns = freeze_patterns(freeze)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [param_path(path) for path, _ in leaves]
    frozen = [False] * len(paths)
    for pattern in patterns:
        try:
            regex = re.compile(f"(?:{pattern})(?:/.*)?")
        except re.error as err:
            raise ValueError(f"freeze pattern {pattern!r} is not a regular expression: {err}") from err
        hits = [bool(regex.fullmatch(path)) for path in paths]
        if not any(hits):
            top = sorted({path.split("/")[0] for path in paths})
            raise ValueError(
                f"freeze pattern {pattern!r} matches no parameter: expected a regular expression over"
                f" paths such as {paths[0]!r}, or {sorted(FREEZE_SHORTHANDS)}; top-level parameters: {top}"
            )
        frozen = [f or h for f, h in zip(frozen, hits, strict=True)]
    if patterns and all(frozen):
        raise ValueError(f"freeze={list(patterns)} freezes every parameter: nothing would train")
    treedef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(treedef, frozen)


def layer_decay_scale(path: str, shape: tuple[int, ...], decay: float, depth: int) -> float | np.ndarray:
    """The learning-rate factor of one parameter under BEiT/timm layer-wise decay.

    Block ``i`` gets ``decay ** (depth - i)``; the embeddings (patch
    embedding, class, distillation and register tokens, position embedding,
    ``encoder/norm_pre``) ``decay ** (depth + 1)``; the final norm and the
    head 1. Scanned blocks (``encoder/blocks``, layers stacked on axis 0) get
    an array ``(depth, 1, ...)`` of per-layer factors.
    """
    parts = path.split("/")
    if parts[0] in EMBEDDING_PARAMS or path.startswith("encoder/norm_pre/"):
        return decay ** (depth + 1)
    if parts[0] == "head" or path.startswith("encoder/norm/"):
        return 1.0
    if parts[0] == "encoder" and parts[1] == "blocks":
        if not shape or shape[0] != depth:
            raise ValueError(f"scanned parameter {path} {shape} does not stack {depth} layers on axis 0")
        per_layer = decay ** (depth - np.arange(depth, dtype=np.float64))
        return per_layer.astype(np.float32).reshape(depth, *(1,) * (len(shape) - 1))
    match = re.fullmatch(r"block_(\d+)", parts[1]) if parts[0] == "encoder" and len(parts) > 1 else None
    if match and int(match.group(1)) < depth:
        return decay ** (depth - int(match.group(1)))
    raise ValueError(f"layer_decay does not know the layer of parameter {path!r} (model depth {depth})")


def scale_by_layer_decay(decay: float, depth: int) -> optax.GradientTransformation:
    """Multiplies each update by its ``layer_decay_scale``: a per-layer learning rate (and weight decay)."""

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params

        def scale(path: tuple[Any, ...], u: jax.Array) -> jax.Array:
            factor = layer_decay_scale(param_path(path), tuple(u.shape), decay, depth)
            return (u * factor).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(
    config: Any, total_steps: int, depth: int | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``config.optimizer`` -> ``(transformation, schedule)``.

    ``total_steps`` counts train steps; with ``grad_accum_steps = k`` the
    optimizer updates every k steps (``optax.MultiSteps``) and the schedule
    counts updates. ``optimizer.layer_decay < 1`` scales each layer's
    update (``scale_by_layer_decay``; ``depth`` defaults to
    ``config.model.depth``); ``config.freeze`` gives the parameters it names
    no update at all (``optax.set_to_zero``: no weight decay, no optimizer
    state, not counted by gradient clipping).
    """
    opt = config.optimizer
    layer_decay = float(opt.get("layer_decay", 1.0))
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"optimizer.layer_decay={layer_decay} must be in (0, 1] (1 turns it off)")
    if layer_decay < 1.0:
        depth = depth if depth is not None else config.model.get("depth")
        if depth is None:
            raise ValueError("optimizer.layer_decay < 1 needs the model depth: pass depth=")
    accum = int(config.grad_accum_steps)
    if accum < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {accum}")
    total_updates = max(total_steps // accum, 1)
    schedule = learning_rate_schedule(
        opt.lr, total_updates, opt.warmup_steps // accum, opt.schedule, opt.end_factor
    )
    mask = weight_decay_mask
    if opt.name == "adamw":
        tx = optax.adamw(
            schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask
        )
    elif opt.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(opt.weight_decay, mask),
            optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov),
        )
    elif opt.name == "lion":
        tx = optax.lion(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=mask)
    elif opt.name == "adafactor":
        tx = optax.adafactor(schedule, weight_decay_rate=opt.weight_decay or None, weight_decay_mask=mask)
    else:
        raise ValueError(f"unknown optimizer {opt.name!r}: expected one of {OPTIMIZERS}")
    if opt.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    if layer_decay < 1.0:
        tx = optax.chain(tx, scale_by_layer_decay(layer_decay, int(depth)))
    freeze = freeze_patterns(config.get("freeze"))
    if freeze:

        def labels(params: Any) -> Any:
            return jax.tree_util.tree_map(lambda f: "frozen" if f else "trained", frozen_mask(params, freeze))

        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx, schedule
