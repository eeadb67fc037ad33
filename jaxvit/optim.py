"""Optimizers and learning-rate schedules (optax), built from the ``optimizer`` config block."""

from __future__ import annotations

from typing import Any

import jax
import optax

OPTIMIZERS = ("adamw", "sgd", "lion", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")


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


def make_optimizer(config: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``config.optimizer`` -> ``(transformation, schedule)``.

    ``total_steps`` counts train steps; with ``grad_accum_steps = k`` the
    optimizer updates every k steps (``optax.MultiSteps``) and the schedule
    counts updates.
    """
    opt = config.optimizer
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
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx, schedule
