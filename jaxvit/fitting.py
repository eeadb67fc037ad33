"""Fitting a read checkpoint to a model: shapes checked, attention fused, position embedding and head adapted.

``fit_to_model(checkpoint, model, image_size)`` compares the checkpoint with
the model's parameter shapes (``jax.eval_shape``, nothing allocated),
resamples a position embedding of another grid, replaces or drops the
classifier as the model asks, and names every key that still does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxvit.convert import layouts
from jaxvit.convert.checkpoint import Checkpoint, depth_of, log
from jaxvit.model import (
    VisionTransformer,
    param_shapes,
    posemb_sincos_2d,
    resample_posemb,
    square_grid,
    to_pair,
    unrolled_to_scan,
)

ImageSize = int | tuple[int, int]


def target_shapes(model: VisionTransformer, image_size: ImageSize) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat ``/``-joined parameter shapes of ``model`` (unrolled) at ``image_size``."""
    unrolled = model.clone(scan=False) if model.scan else model
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(param_shapes(unrolled, image_size)), sep="/")


def check_architecture(ckpt: Checkpoint, model: VisionTransformer) -> None:
    """Raises ``ValueError`` naming every size of ``ckpt`` (width, depth, heads, patch) that ``model`` lacks."""
    params = ckpt.params
    problems = []
    kernel = params.get("patch_embed/kernel")
    if kernel is not None and kernel.ndim == 4 and kernel.shape[-1] != model.width:
        problems.append(
            f"width {kernel.shape[-1]} (patch_embed/kernel {kernel.shape}) but the model has width={model.width}"
        )
    depth = depth_of(params)
    if depth != model.depth:
        problems.append(
            f"depth {depth} (encoder blocks 0..{depth - 1}) but the model has depth={model.depth}"
        )
    if ckpt.num_heads is not None and ckpt.num_heads != model.num_heads:
        problems.append(f"{ckpt.num_heads} attention heads but the model has num_heads={model.num_heads}")
    kernel = params.get("patch_embed/kernel")
    patch = to_pair(model.patch_size)
    if kernel is not None and tuple(kernel.shape[:2]) != patch:
        problems.append(
            f"patch size {tuple(kernel.shape[:2])} (patch_embed/kernel {kernel.shape}) but the model has"
            f" patch_size={model.patch_size}"
        )
    if problems:
        raise ValueError(f"{ckpt.path} does not fit the model: the checkpoint has " + "; ".join(problems))


def sincos_table(model: VisionTransformer, grid: tuple[int, int]) -> np.ndarray:
    """The fixed sin-cos position embedding ``model`` adds, with its class slot: ``(1, P + h*w, D)``."""
    return np.asarray(posemb_sincos_2d(grid, model.width, num_prefix_tokens=model.num_posemb_prefix_tokens))


def _fit_posemb(
    flat: dict[str, np.ndarray],
    ckpt: Checkpoint,
    model: VisionTransformer,
    target: Mapping[str, Any],
    grid: tuple[int, int],
    checkpoint_grid: tuple[int, int] | None,
) -> dict[str, np.ndarray]:
    key = "pos_embed/embedding"
    if key not in flat:
        return flat
    posemb = flat[key]
    prefix = model.num_posemb_prefix_tokens
    if ckpt.num_prefix_tokens == 0 and prefix > 0:
        # The checkpoint adds its embedding to the patches before the prefix tokens go in
        # front (big_vision, timm's no_embed_class); adding zeros in their slots after is the same.
        posemb = np.concatenate([np.zeros_like(posemb[:, :prefix]), posemb], axis=1)
    elif ckpt.num_prefix_tokens == prefix + model.num_registers and model.num_registers:
        # Registers with position-embedding slots: a constant added to a token is part of the token.
        slots = posemb[:, prefix : prefix + model.num_registers]
        if "registers/tokens" in flat:
            flat = {**flat, "registers/tokens": flat["registers/tokens"] + slots}
        posemb = np.concatenate([posemb[:, :prefix], posemb[:, prefix + model.num_registers :]], axis=1)
    elif ckpt.num_prefix_tokens != prefix:
        raise ValueError(
            f"{ckpt.path}: the position embedding {posemb.shape} has {ckpt.num_prefix_tokens} slot(s) in"
            f" front of the grid but the model has {prefix} (class_token={model.class_token},"
            f" distill_token={model.distill_token})"
        )
    if key not in target:
        table = sincos_table(model, grid) if model.posemb == "sincos2d" else None
        if table is not None and posemb.shape == table.shape:
            if np.allclose(posemb, table, atol=1e-5):
                log.info("the checkpoint's position embedding is the fixed sincos2d table; not loading it")
                return {k: v for k, v in flat.items() if k != key}
        return {**flat, key: posemb}  # reported as unexpected
    if posemb.shape[1] != target[key].shape[1]:
        old_len = posemb.shape[1] - prefix
        old_grid = checkpoint_grid or ckpt.grid
        if old_grid is None:
            old_grid = square_grid(old_len)
            if old_grid is None:
                raise ValueError(
                    f"{ckpt.path}: cannot tell the grid of the position embedding {posemb.shape}"
                    f" ({old_len} grid tokens is not a square): pass checkpoint_grid=(h, w)"
                )
        if old_grid[0] * old_grid[1] != old_len:
            raise ValueError(
                f"{ckpt.path}: checkpoint grid {old_grid} does not match the position embedding"
                f" {posemb.shape} ({old_len} grid tokens)"
            )
        log.info(
            "resampling the position embedding of %s from a %dx%d grid to %dx%d (%s%s, class slot kept)",
            ckpt.path,
            *old_grid,
            *grid,
            ckpt.posemb_resample,
            ", antialiased" if ckpt.posemb_antialias else "",
        )
        posemb = np.asarray(
            resample_posemb(
                posemb,
                grid,
                tuple(old_grid),
                prefix,
                method=ckpt.posemb_resample,
                antialias=ckpt.posemb_antialias,
            )
        )
    return {**flat, key: posemb}


def _fit_head(
    flat: dict[str, np.ndarray], ckpt: Checkpoint, model: VisionTransformer, target: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    flat = dict(flat)
    if "head/pre_logits/kernel" in flat and "head/pre_logits/kernel" not in target:
        shape = flat.pop("head/pre_logits/kernel").shape
        flat.pop("head/pre_logits/bias", None)
        log.info(
            "dropping the pre_logits layer %s of %s: the model has no representation_size", shape, ckpt.path
        )
    for name in ("classifier", "dist_classifier"):
        kernel_key, bias_key = f"head/{name}/kernel", f"head/{name}/bias"
        if kernel_key in target:
            want = tuple(target[kernel_key].shape)
            have = flat.get(kernel_key)
            if have is None or tuple(have.shape) != want:
                why = f"it has no {name}" if have is None else f"its {name} is {tuple(have.shape)}"
                log.info(
                    "new zero-initialised head%s %s for %d classes: %s of %s",
                    "" if name == "classifier" else f" {name}",
                    want,
                    model.num_classes,
                    why,
                    ckpt.path,
                )
                flat[kernel_key] = np.zeros(want, np.float32)
                flat.pop(bias_key, None)
                if bias_key in target:
                    flat[bias_key] = np.full(want[-1:], model.head_bias_init, np.float32)
        elif kernel_key in flat:
            shape = flat.pop(kernel_key).shape
            flat.pop(bias_key, None)
            why = "num_classes=0" if not model.num_classes else "no distillation token"
            log.info("dropping the %s %s of %s: the model has %s", name, shape, ckpt.path, why)
    return flat


def _hint(key: str) -> str:
    for fragment, hint in layouts.UNSUPPORTED_HINTS.items():
        if fragment in key:
            return f" ({hint})"
    if key == "pos_embed/embedding":
        return " (the model has posemb='sincos2d', which has no parameter)"
    return ""


def check_keys(
    flat: Mapping[str, np.ndarray],
    unmatched: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    path: str,
) -> None:
    lines = [
        f"{k}: checkpoint {tuple(flat[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(set(flat) & set(target))
        if tuple(flat[k].shape) != tuple(target[k].shape)
    ]
    lines += [
        f"missing from the checkpoint: {k} {tuple(target[k].shape)}" for k in sorted(set(target) - set(flat))
    ]
    unexpected = {**{k: flat[k] for k in set(flat) - set(target)}, **unmatched}
    lines += [
        f"unexpected in the checkpoint: {k} {tuple(np.shape(v))}{_hint(k)}"
        for k, v in sorted(unexpected.items())
    ]
    if lines:
        shown = lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
        raise ValueError(f"{path} does not match the model ({len(lines)} problems):\n  " + "\n  ".join(shown))


def fit_to_model(
    ckpt: Checkpoint,
    model: VisionTransformer,
    image_size: ImageSize = 224,
    *,
    checkpoint_grid: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A read ``Checkpoint`` -> params for ``model`` at ``image_size`` (scanned if ``model.scan``)."""
    h, w = to_pair(image_size)
    target = target_shapes(model, (h, w))
    p, q = to_pair(model.patch_size)
    check_architecture(ckpt, model)
    flat = layouts.fuse_attention(ckpt.params, model.num_heads)
    flat = _fit_posemb(flat, ckpt, model, target, (h // p, w // q), checkpoint_grid)
    flat = _fit_head(flat, ckpt, model, target)
    check_keys(flat, ckpt.unmatched, target, ckpt.path)
    params = {k: jnp.asarray(np.asarray(v, np.float32), target[k].dtype) for k, v in flat.items()}
    tree = flax.traverse_util.unflatten_dict(params, sep="/")
    return unrolled_to_scan(tree) if model.scan else tree
