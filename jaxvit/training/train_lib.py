"""Pure training functions: state, loss, mixing, ``train_step``, ``eval_step``, sharding.

Nothing here does I/O or keeps state between calls; the loop in
``jaxvit.training.trainer`` compiles these once with ``jax.jit`` and the shardings of
``make_mesh`` / ``state_shardings``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvit.training import optim

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``ema_params`` is ``None`` when EMA is off."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    ema: bool,
) -> TrainState:
    """A fresh state; ``image_shape`` is ``(H, W, C)``. Run under ``jax.jit`` to place it sharded."""
    params = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        # a copy: donating a state whose EMA shares buffers with the params fails
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
    )


# ---------------------------------------------------------------------------
# Loss and batch mixing
# ---------------------------------------------------------------------------


def soft_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """``(N,) int -> (N, K)``: one-hot, smoothed towards uniform by ``label_smoothing``."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``(N, K), (N, K) -> (N,)``: softmax cross-entropy with soft targets, in fp32."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """Batch mixing: mixup (``mixup_alpha``) and/or CutMix (``cutmix_alpha``) Beta parameters."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5  # chance of cutmix when both are on
    prob: float = 1.0  # chance of mixing a batch at all

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def mix_batch(
    rng: jax.Array, images: jax.Array, targets: jax.Array, mix: MixConfig
) -> tuple[jax.Array, jax.Array]:
    """Mixup or CutMix of a batch with itself reversed: ``(N, H, W, C), (N, K)`` in, same out.

    One ``lam`` per batch, as timm does; CutMix's ``lam`` is corrected to the
    pasted box's true area.
    """
    if not mix.enabled:
        return images, targets
    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
    n, h, w, _ = images.shape
    other_images, other_targets = images[::-1], targets[::-1]

    def mixup():
        lam = jax.random.beta(k_mix, mix.mixup_alpha, mix.mixup_alpha) if mix.mixup_alpha > 0 else 1.0
        return lam * images + (1 - lam) * other_images, jnp.asarray(lam, jnp.float32)

    def cutmix():
        lam = jax.random.beta(k_cut, mix.cutmix_alpha, mix.cutmix_alpha) if mix.cutmix_alpha > 0 else 1.0
        cut = jnp.sqrt(1.0 - lam)
        ch, cw = (cut * h).astype(jnp.int32), (cut * w).astype(jnp.int32)
        cy, cx = jax.random.randint(k_box, (2,), 0, jnp.array([h, w]))
        y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
        x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
        ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[None, :, :, None]
        lam = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)
        return jnp.where(box, other_images, images), lam.astype(jnp.float32)

    if mix.mixup_alpha > 0 and mix.cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < mix.switch_prob
        (mi, ml), (ci, cl) = mixup(), cutmix()
        mixed, lam = jnp.where(use_cutmix, ci, mi), jnp.where(use_cutmix, cl, ml)
    else:
        mixed, lam = cutmix() if mix.cutmix_alpha > 0 else mixup()
    apply = jax.random.uniform(k_apply) < mix.prob
    lam = jnp.where(apply, lam, 1.0)
    mixed = jnp.where(apply, mixed, images)
    return mixed.astype(images.dtype), lam * targets + (1 - lam) * other_targets


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static part of a step (hashable, so it can be closed over by jit)."""

    num_classes: int
    label_smoothing: float = 0.0
    mix: MixConfig = MixConfig()
    ema_decay: float = 0.0
    grad_accum_steps: int = 1
    freeze: tuple[str, ...] = ()  # patterns of parameters that get no gradient (optim.frozen_mask)


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: StepConfig,
    patch_size: int | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer step on ``batch = {"image": (N, H, W, C), "label": (N,)}`` (NaFlex: ``"image"``
    patch sequences ``(N, L, p*q*C)`` with ``"grids"`` ``(N, 2)`` and ``"patch_mask"`` ``(N, L)``).

    ``patch_size`` (FlexiViT): the model sees the images in patches of this size, with its one
    set of parameters (see ``VisionTransformer.__call__``); None: the model's own.

    Dropout and mixing keys are folded from ``rng`` and the step number, so a
    resumed run draws the same ones. A non-finite loss, gradient or update leaves the
    parameters and optimizer state as they were (``metrics["finite"]`` is 0),
    so the loop can stop with the last good state intact.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    mix_rng, dropout_rng = jax.random.split(step_rng)
    targets = soft_targets(batch["label"], cfg.num_classes, cfg.label_smoothing)
    sequences = _sequence_inputs(batch)
    if sequences and cfg.mix.enabled:
        raise ValueError("mixup and cutmix mix images of one size: NaFlex patch sequences are not mixed")
    images, targets = mix_batch(mix_rng, batch["image"], targets, cfg.mix)

    flexi = {**sequences} if patch_size is None else {"patch_size": patch_size, **sequences}

    def loss_fn(params):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng}, **flexi)
        return jnp.mean(cross_entropy(logits, targets)), logits

    (loss, logits), grads = _loss_and_grads(loss_fn, state.params, cfg.freeze)
    grad_norm = optax.tree.norm(grads)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Element-wise, not through a norm (whose squares overflow long before the values
    # do); and on the new parameters too: finite gradients can still give a NaN update
    # (Adam with eps=0 divides zero by zero where a gradient is exactly zero).
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
    ema_params = state.ema_params
    if cfg.ema_decay > 0:
        blended = optax.incremental_update(params, state.ema_params, 1.0 - cfg.ema_decay)
        # with accumulation the parameters move every k-th step only; so does the EMA
        updated = (state.step + 1) % cfg.grad_accum_steps == 0
        ema_params = jax.tree_util.tree_map(lambda b, e: jnp.where(updated, b, e), blended, state.ema_params)

    def keep_if_finite(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        ema_params=keep_if_finite(ema_params, state.ema_params),
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step // cfg.grad_accum_steps),
        "finite": finite.astype(jnp.float32),
        "examples": jnp.float32(batch["label"].shape[0]),
    }
    if sequences:  # NaFlex: the share of the batch's patch slots that are padding
        metrics["padding"] = jnp.mean(1.0 - batch["patch_mask"].astype(jnp.float32))
    return new_state, metrics


def _sequence_inputs(batch: Batch) -> dict[str, jax.Array]:
    """A NaFlex batch's ``grids`` and ``patch_mask`` as the model's keyword inputs; {} for images."""
    return {"grids": batch["grids"], "mask": batch["patch_mask"]} if "grids" in batch else {}


def _loss_and_grads(loss_fn: Any, params: Any, freeze: tuple[str, ...]) -> tuple[Any, Any]:
    """``value_and_grad(loss_fn)(params)``, differentiating only the parameters ``freeze`` leaves
    trainable: the frozen ones get zero gradients, and nothing flows back through them."""
    if not freeze:
        return jax.value_and_grad(loss_fn, has_aux=True)(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    frozen = jax.tree_util.tree_leaves(optim.frozen_mask(params, freeze))

    def loss_of_trained(trained: list[jax.Array]) -> Any:
        it = iter(trained)
        return loss_fn(
            treedef.unflatten([leaf if f else next(it) for leaf, f in zip(leaves, frozen, strict=True)])
        )

    trained = [leaf for leaf, f in zip(leaves, frozen, strict=True) if not f]
    out, grads = jax.value_and_grad(loss_of_trained, has_aux=True)(trained)
    it = iter(grads)
    return out, treedef.unflatten(
        [jnp.zeros_like(leaf) if f else next(it) for leaf, f in zip(leaves, frozen, strict=True)]
    )


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> Metrics:
    """Sums over ``batch`` (``mask`` 0 marks padding): loss, top-1, top-5 correct, count."""
    logits = model.apply({"params": params}, batch["image"], train=False, **_sequence_inputs(batch))
    logits = logits.astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"]
    num_classes = logits.shape[-1]
    loss = cross_entropy(logits, jax.nn.one_hot(labels, num_classes))
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # The true class's rank, ties broken by class index as argmax does; a NaN logit
    # ranks last, so a broken model never scores.
    classes = jnp.arange(num_classes)
    above = (logits > label_logit) | ((logits == label_logit) & (classes < labels[:, None]))
    rank = jnp.where(jnp.isnan(label_logit[:, 0]), num_classes, jnp.sum(above, axis=-1))
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum((rank < 1) * mask),
        "top5": jnp.sum((rank < min(5, num_classes)) * mask),
        "count": jnp.sum(mask),
    }


# ---------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over all devices of all processes; ``-1`` takes what is left."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh fsdp={fsdp} does not divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch dimension split over every device (both mesh axes)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**14) -> P:
    """Shard the largest dimension divisible by ``fsdp_size`` over ``fsdp``; small arrays stay replicated."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
    """Shardings for every leaf of a (possibly abstract) state: parameters,
    optimizer moments and EMA sharded over ``fsdp`` when it is > 1, else replicated."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda a: NamedSharding(mesh, fsdp_spec(tuple(a.shape), fsdp_size)), abstract_state
    )


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> Batch:
    """This process's slice of a global batch -> global ``jax.Array`` s, batch dim sharded."""
    n_proc = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n_proc, *v.shape[1:]))
        for k, v in batch.items()
    }


def compile_steps(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: StepConfig,
    mesh: Mesh,
    abstract_state: TrainState,
) -> tuple[Any, Any, Any]:
    """``(train_step, eval_step, state_sharding)`` jitted with explicit shardings; the state is donated.

    ``train_step(state, batch, rng, patch_size=None)``: each patch size (FlexiViT) is its own
    jitted step, compiled the first time it is asked for.
    """
    shardings = state_shardings(mesh, abstract_state)
    steps: dict[int | None, Any] = {}

    def train(state: TrainState, batch: Batch, rng: jax.Array, patch_size: int | None = None) -> Any:
        if patch_size not in steps:
            steps[patch_size] = jit_train_step(model, tx, schedule, cfg, mesh, shardings, patch_size)
        return steps[patch_size](state, batch, rng)

    return train, jit_eval_step(model, mesh, shardings), shardings


def _traced_under(mesh: Mesh, fn: Any) -> Any:
    """``fn`` traced with ``mesh`` as the abstract mesh: kernels XLA cannot partition (Splash
    attention) then run per device on their share of the batch (``jax.shard_map``)."""

    @functools.wraps(fn)
    def traced(*args: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def jit_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: StepConfig,
    mesh: Mesh,
    shardings: Any,
    patch_size: int | None = None,
) -> Any:
    """``train_step`` jitted for ``mesh``: the state (``shardings``) donated, the batch split over
    every device, the key and metrics replicated. Lowered for any mesh's devices (``jaxvit.plan``)."""
    replicated = NamedSharding(mesh, P())
    step = functools.partial(
        train_step, model=model, tx=tx, schedule=schedule, cfg=cfg, patch_size=patch_size
    )
    return jax.jit(
        _traced_under(mesh, step),
        in_shardings=(shardings, batch_sharding(mesh), replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )


def jit_eval_step(model: nn.Module, mesh: Mesh, shardings: Any) -> Any:
    """``eval_step`` jitted for ``mesh``: parameters as in the state, the batch split, sums replicated."""
    return jax.jit(
        _traced_under(mesh, functools.partial(eval_step, model=model)),
        in_shardings=(shardings.params, batch_sharding(mesh)),
        out_shardings=NamedSharding(mesh, P()),
    )
