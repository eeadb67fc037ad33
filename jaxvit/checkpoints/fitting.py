"""Fitting a read checkpoint to a model: shapes checked, attention fused, position embedding and head adapted.

``fit_to_model(checkpoint, model, image_size)`` compares the checkpoint with
the model's parameter shapes (``jax.eval_shape``, nothing allocated),
resamples a position embedding of another grid, replaces or drops the
classifier as the model asks, and names every key that still does not fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxvit import schema
from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import Checkpoint, block_indices, depth_of, log
from jaxvit.layers.attention import resample_rel_pos_bias, square_rel_pos_grid
from jaxvit.layers.patch import resample_patch_embed
from jaxvit.layers.posemb import posemb_sincos_2d, resample_posemb
from jaxvit.layers.scan import unrolled_to_scan
from jaxvit.model import VisionTransformer, param_shapes
from jaxvit.safety import validate
from jaxvit.sizes import square_grid, to_pair

ImageSize = int | tuple[int, int]


def target_shapes(model: VisionTransformer, image_size: ImageSize) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat ``/``-joined parameter shapes of ``model`` (unrolled) at ``image_size``."""
    unrolled = model.clone(scan=False) if model.scan else model
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(param_shapes(unrolled, image_size)), sep="/")


def _rotary_kind(fields: Any) -> str | None:
    posemb, rope = fields.get("posemb"), fields.get("rope")
    return "dinov3" if posemb == "rope" else rope


def check_rotary(ckpt: Checkpoint, model: VisionTransformer) -> None:
    """Raises unless ``model`` rotates queries and keys as the file says its origin did: the same
    rotary embedding (DINOv3's ``posemb="rope"``, timm Eva's ``rope=``, or none), base, axis
    order, reference grid and offset. What the file does not say is the model's to choose."""
    stated = {**ckpt.config.get("model", {}), **ckpt.implied_fields}
    config = model.config
    ours = _rotary_kind({"posemb": config.posemb, "rope": config.rope})
    theirs = _rotary_kind(stated)
    problems = []
    if theirs is None and stated.get("posemb") not in (None, "rope") and ours == "dinov3":
        problems.append(f"the file ({ckpt.origin}) has no DINOv3 rotary embedding, which the model has")
    elif theirs is not None and (ours or "none") != theirs:
        problems.append(f"the rotary embedding is {theirs!r} in the file but {ours or 'none'!r} in the model")
    elif theirs not in (None, "none"):
        names = ["rope_xy", "rope_ref_grid", "rope_grid_offset"] + (
            [] if theirs == "mixed" else ["rope_theta"]
        )
        for name in names:
            if name in stated and _same_size(stated[name]) != _same_size(getattr(config, name)):
                problems.append(
                    f"{name}={stated[name]!r} in the file but {getattr(config, name)!r} in the model"
                )
    if problems:
        raise ValueError(f"{ckpt.path}: " + "; ".join(problems))


def _same_size(value: Any) -> Any:
    return to_pair(value) if isinstance(value, (int, list, tuple)) and not isinstance(value, bool) else value


def check_architecture(ckpt: Checkpoint, model: VisionTransformer) -> None:
    """Raises ``ValueError`` naming every size of ``ckpt`` (width, depth, heads, patch) that ``model`` lacks."""
    params = ckpt.params
    check_blocks(ckpt)
    problems = []
    kernel = params.get("patch_embed/kernel")
    if kernel is not None and kernel.ndim != 4:
        raise ValueError(f"{ckpt.path}: patch_embed/kernel has shape {kernel.shape}, expected 4 dimensions")
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
    if kernel is not None and kernel.ndim == 4 and kernel.shape[2] != model.num_channels:
        problems.append(
            f"{kernel.shape[2]} image channels (patch_embed/kernel {kernel.shape}) but the model has"
            f" num_channels={model.num_channels}"
        )
    if problems:
        raise ValueError(f"{ckpt.path} does not fit the model: the checkpoint has " + "; ".join(problems))


def check_blocks(ckpt: Checkpoint) -> None:
    """Raises unless the encoder blocks of ``ckpt`` are numbered 0..n-1 with n <= ``MAX_DEPTH``.

    The depth a checkpoint implies is that of its highest block key: one key
    ``encoderblock_1000000`` must not make a million-block model.
    """
    indices = block_indices(ckpt.params)
    if not indices:
        return
    depth = max(indices) + 1
    if depth > validate.MAX_DEPTH:
        raise ValueError(
            f"{ckpt.path} names encoder block {depth - 1}: more than the {validate.MAX_DEPTH} blocks jaxvit reads"
        )
    missing = sorted(set(range(depth)) - indices)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{ckpt.path} names encoder block {depth - 1} but lacks {len(missing)} of blocks 0..{depth - 1}"
            f" ({shown})"
        )


def check_weights(ckpt: Checkpoint) -> None:
    """Raises unless every array that would become a parameter is a finite float (see ``validate.check_weight``)."""
    for key, array in ckpt.params.items():
        validate.check_weight(key, array, ckpt.path)


def check_declared(
    ckpt: Checkpoint, model: VisionTransformer, size: tuple[int, int], given: Any = ()
) -> None:
    """Raises unless what a checkpoint's own config declares agrees with its own weights.

    Run on the model built from a checkpoint (``model_from_checkpoint``),
    before anything is traced: width, depth, heads, patch and channels
    (``check_architecture``), the class count against the classifier, the MLP
    and pre-logits widths, the image size against the position embedding,
    and sizes no ViT has. Fields in ``given`` (the caller's overrides) are
    the caller's choice and not compared.
    """
    schema.check_size(model, ckpt.path)
    check_architecture(ckpt, model)
    params = ckpt.params
    problems = []
    classifier = params.get("head/classifier/kernel")
    if "num_classes" not in given:
        if classifier is not None and classifier.shape[-1] != model.num_classes:
            problems.append(
                f"the config declares {model.num_classes} classes but the classifier has {classifier.shape[-1]}"
                f" (head/classifier/kernel {classifier.shape})"
            )
        elif classifier is None and model.num_classes:
            problems.append(
                f"the config declares {model.num_classes} classes but the weights have no classifier"
            )
    fc1 = params.get("encoder/block_0/mlp/fc1/kernel")
    mlp_dim = model.mlp_dim or 4 * model.width
    # A packed SwiGLU's fc1 holds gate and value side by side.
    fc1_width = 2 * mlp_dim if getattr(model, "mlp_type", "mlp") == "swiglu" else mlp_dim
    if "mlp_dim" not in given and fc1 is not None and fc1.shape[-1] != fc1_width:
        problems.append(
            f"the config declares mlp_dim={mlp_dim} ({getattr(model, 'mlp_type', 'mlp')}) but"
            f" encoder/block_0/mlp/fc1/kernel is {fc1.shape}"
        )
    pre = params.get("head/pre_logits/kernel")
    if (
        "representation_size" not in given
        and pre is not None
        and model.representation_size not in (None, pre.shape[-1])
    ):
        problems.append(
            f"the config declares representation_size={model.representation_size} but head/pre_logits/kernel"
            f" is {pre.shape}"
        )
    posemb = params.get("pos_embed/embedding")
    if posemb is not None and posemb.ndim == 3 and model.posemb == "learn":
        p, q = to_pair(model.patch_size)
        tokens = (size[0] // p) * (size[1] // q)
        if posemb.shape[1] - ckpt.num_prefix_tokens != tokens:
            problems.append(
                f"the config's image size {size[0]}x{size[1]} gives {tokens} patches but the position embedding"
                f" {posemb.shape} has {posemb.shape[1] - ckpt.num_prefix_tokens}"
            )
    if problems:
        raise ValueError(f"{ckpt.path}: its config does not match its own weights: " + "; ".join(problems))


def sincos_table(model: VisionTransformer, grid: tuple[int, int]) -> np.ndarray:
    """The fixed sin-cos position embedding ``model`` adds, with its class slot: ``(1, P + h*w, D)``."""
    return np.asarray(
        posemb_sincos_2d(
            grid, model.width, num_prefix_tokens=model.num_posemb_prefix_tokens, kind=model.posemb
        )
    )


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
        # A fixed sin-cos table the file holds (a peer needs it) is compared at the file's own grid.
        own_grid = checkpoint_grid or ckpt.grid or square_grid(posemb.shape[1] - prefix)
        table = sincos_table(model, own_grid) if model.posemb in schema.SINCOS_POSEMBS and own_grid else None
        if table is not None and posemb.shape == table.shape:
            if np.allclose(posemb, table, atol=1e-5):
                log.info(
                    "the checkpoint's position embedding is the fixed %s table; not loading it", model.posemb
                )
                return {k: v for k, v in flat.items() if k != key}
        return {**flat, key: posemb}  # reported as unexpected
    stated_grid = checkpoint_grid or ckpt.grid
    # Same length is not the same grid: a 4x6 table at 6x4 patches is resampled too.
    if posemb.shape[1] != target[key].shape[1] or (stated_grid is not None and tuple(stated_grid) != grid):
        old_len = posemb.shape[1] - prefix
        old_grid = stated_grid
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


def _fit_rel_pos_tables(
    flat: dict[str, np.ndarray],
    ckpt: Checkpoint,
    target: Mapping[str, Any],
    grid: tuple[int, int],
    checkpoint_grid: tuple[int, int] | None,
) -> dict[str, np.ndarray]:
    """BEiT's relative position tables of the checkpoint's grid, resized to the model's the
    checkpoint's own way (``Checkpoint.rel_pos_resample``)."""
    keys = [k for k in flat if k.endswith("rel_pos_bias/table") and k in target]  # per block or shared
    stale = [k for k in keys if flat[k].shape != tuple(target[k].shape)]
    if not stale:
        return flat
    old_grid = checkpoint_grid or ckpt.grid or square_rel_pos_grid(flat[stale[0]].shape[0])
    if old_grid is None:
        raise ValueError(
            f"{ckpt.path}: cannot tell the grid of the relative position table {flat[stale[0]].shape}:"
            " pass checkpoint_grid=(h, w)"
        )
    log.info(
        "resampling %d relative position tables of %s from %s to %s", len(stale), ckpt.path, old_grid, grid
    )
    out = dict(flat)
    for key in stale:
        out[key] = np.asarray(resample_rel_pos_bias(flat[key], grid, tuple(old_grid), ckpt.rel_pos_resample))
    return out


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
        return " (the model has a fixed sin-cos posemb, which has no parameter)"
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


def with_checkpoint_grid(ckpt: Checkpoint, grid: tuple[int, int]) -> Checkpoint:
    """``ckpt`` with the patch grid its user states: the slots in front of the grid are then what
    the position embedding holds beyond ``h * w`` (a 4x6 grid and a class slot is 25 rows, which a
    5x5 grid without one also is: only the user or the file's metadata can say which)."""
    grid = to_pair(grid)
    posemb = ckpt.params.get("pos_embed/embedding")
    if posemb is None:
        return dataclasses.replace(ckpt, grid=grid, grid_ambiguity="")
    slots = posemb.shape[1] - grid[0] * grid[1]
    if slots < 0 or slots > 64:
        raise ValueError(
            f"{ckpt.path}: checkpoint_grid={grid} does not fit the position embedding {tuple(posemb.shape)}"
            f" ({posemb.shape[1]} rows: {grid[0] * grid[1]} for the grid and {slots} in front)"
        )
    return dataclasses.replace(ckpt, grid=grid, num_prefix_tokens=slots, grid_ambiguity="")


# Origins whose own FlexiViT code resizes with jax.image.resize (bilinear); the others as timm.
BILINEAR_PATCH_ORIGINS = ("big_vision", "vt")


def with_patch_size(
    ckpt: Checkpoint, model: VisionTransformer, patch_size: int | tuple[int, int]
) -> Checkpoint:
    """``ckpt`` with its patch embedding resampled to ``patch_size`` (see ``fit_to_model``)."""
    patch = to_pair(patch_size)
    if patch != to_pair(model.patch_size):
        raise ValueError(
            f"patch_size={patch_size} must be the model's, which has patch_size={model.patch_size}"
        )
    kernel = ckpt.params.get("patch_embed/kernel")
    if kernel is None or kernel.ndim != 4:
        raise ValueError(f"{ckpt.path}: no (p, q, channels, width) patch embedding to resample")
    method = "bilinear" if ckpt.origin in BILINEAR_PATCH_ORIGINS else "bicubic"
    resampled = np.asarray(resample_patch_embed(kernel, patch, method))
    log.info(
        "resampling the patch embedding of %s from %s to %s (%s)", ckpt.path, kernel.shape[:2], patch, method
    )
    return dataclasses.replace(ckpt, params={**ckpt.params, "patch_embed/kernel": resampled})


def fit_to_model(
    ckpt: Checkpoint,
    model: VisionTransformer,
    image_size: ImageSize = 224,
    *,
    checkpoint_grid: tuple[int, int] | None = None,
    patch_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A read ``Checkpoint`` -> params for ``model`` at ``image_size`` (scanned if ``model.scan``).

    ``patch_size``: resample the checkpoint's patch embedding to it (FlexiViT's
    pseudo-inverse, ``resample_patch_embed``), the way its origin does: bilinear
    for big_vision and vision_transformer files, timm's antialiased bicubic for
    the others. It must be the model's patch size.
    """
    h, w = to_pair(image_size)
    if patch_size is not None:
        ckpt = with_patch_size(ckpt, model, patch_size)
    if checkpoint_grid is not None:
        ckpt = with_checkpoint_grid(ckpt, checkpoint_grid)
    if ckpt.grid_ambiguity:
        raise ValueError(ckpt.grid_ambiguity)
    # Everything the file says is checked before the model is traced.
    check_weights(ckpt)
    check_architecture(ckpt, model)
    check_rotary(ckpt, model)
    target = target_shapes(model, (h, w))
    p, q = to_pair(model.patch_size)
    flat = layouts.fuse_attention(ckpt.params, model.num_heads, model.pool_heads)
    # a table of its own grid (NaFlex) is resized inside the model, not here
    table_grid = to_pair(model.posemb_grid) if model.posemb_grid else (h // p, w // q)
    flat = _fit_posemb(flat, ckpt, model, target, table_grid, checkpoint_grid)
    flat = _fit_rel_pos_tables(flat, ckpt, target, (h // p, w // q), checkpoint_grid)
    flat = _fit_head(flat, ckpt, model, target)
    check_keys(flat, ckpt.unmatched, target, ckpt.path)
    params = {k: jnp.asarray(np.asarray(v, np.float32), target[k].dtype) for k, v in flat.items()}
    tree = flax.traverse_util.unflatten_dict(params, sep="/")
    return unrolled_to_scan(tree) if model.scan else tree
