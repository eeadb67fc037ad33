"""Pretrained weights in and out: the peers' checkpoints <-> jaxvit params.

Reading goes in three steps:

1. ``read_checkpoint(path)`` reads the file(s) safely and renames the keys
   into jaxvit's names (``jaxvit.convert.layouts``), telling the origin from
   the content: google-research/vision_transformer / AugReg ``.npz``,
   big_vision ``.npz`` (also scanned), a timm state dict (safetensors or
   ``.pth``), or a Hugging Face ViT folder.
2. ``fit_to_model(checkpoint, model, image_size)`` checks it against the
   model's parameter shapes (from ``jax.eval_shape``), fuses attention,
   adapts the position embedding (class slot, grid) and the head.
3. ``load_pretrained(path, model)`` does both.

``export(params, path, format, model=...)`` writes the same layouts back out
for the peers' own loaders. ``load_for_inference(path)`` builds the model
from the checkpoint alone and says how to preprocess images for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxvit.convert import files, layouts
from jaxvit.model import (
    MODEL_FIELDS,
    VARIANTS,
    VisionTransformer,
    create_model,
    posemb_sincos_2d,
    resample_posemb,
    scan_to_unrolled,
    to_pair,
    unrolled_to_scan,
)

log = logging.getLogger(__name__)

ImageSize = int | tuple[int, int]
ORIGINS = ("vt", "big_vision", "timm", "hf", "workdir")
FORMATS = ("npz", "timm", "hf")

# Preprocessing per origin: (mean, std, crop_pct, interpolation).
# VT/AugReg, big_vision and HF ViT resize the whole image and map [0, 1] to [-1, 1];
# timm's ViT defaults are ImageNet statistics, shorter side to size/0.875, center crop.
_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PREPROCESSING = {
    "vt": (*_INCEPTION, 1.0, "bilinear"),
    "big_vision": (*_INCEPTION, 1.0, "bilinear"),
    "hf": (*_INCEPTION, 1.0, "bilinear"),
    "workdir": (*_INCEPTION, 1.0, "bilinear"),
    "timm": (*_IMAGENET, 0.875, "bicubic"),
}

_HF_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}
_BLOCK_INDEX = re.compile(r"encoder/block_(\d+)/")


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint in jaxvit's names, before it is fitted to a model.

    ``params``: flat ``/``-joined keys, unrolled blocks, attention still in
    the checkpoint's split (see ``layouts.fuse_attention``). ``unmatched``:
    checkpoint keys with no jaxvit counterpart, under their own names.
    ``posemb_prefix``: slots in front of the grid in the checkpoint's position
    embedding (0 for big_vision). ``grid``, ``num_heads``: when the checkpoint
    says them. ``config``: Hugging Face ``config.json`` or the metadata
    ``export`` wrote.
    """

    path: str
    origin: str
    params: dict[str, np.ndarray]
    unmatched: dict[str, np.ndarray]
    posemb_prefix: int = 1
    grid: tuple[int, int] | None = None
    num_heads: int | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a checkpoint file or Hugging Face folder into jaxvit's names (no model needed)."""
    path = Path(path)
    if path.is_dir():
        return _read_hf_folder(path)
    kind, arrays, metadata = files.read_weights(path)
    if kind == "npz":
        return _from_npz(path, arrays)
    return _from_state_dict(path, arrays, metadata)


def _strip_prefix(arrays: Mapping[str, np.ndarray], prefixes: Sequence[str]) -> tuple[str, dict]:
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in arrays):
            kept = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            if len(kept) < len(arrays):
                log.info("ignoring %d entries outside %r", len(arrays) - len(kept), prefix)
            return prefix, kept
    return "", dict(arrays)


def _from_npz(path: Path, arrays: dict[str, np.ndarray]) -> Checkpoint:
    prefix, arrays = _strip_prefix(arrays, ("opt/target/", "params/img/", "params/"))
    scanned = any(k.startswith("Transformer/encoderblock/") for k in arrays)
    big_vision = (
        prefix.startswith("params/")
        or scanned
        or "pos_embedding" in arrays
        or any("/MultiHeadDotProductAttention_0/" in k for k in arrays if k.startswith("Transformer/"))
    )
    if scanned:
        arrays = layouts.unstack_scanned(arrays, "Transformer/encoderblock", "Transformer/encoderblock_{i}")
    rules = layouts.BIG_VISION_RULES if big_vision else layouts.VT_RULES
    params, unmatched = layouts.rename(arrays, rules)
    if "patch_embed/kernel" not in params:
        raise ValueError(
            f"{path} is an .npz without 'embedding/kernel' (nor under 'params/'): not a ViT checkpoint"
            f" of google-research/vision_transformer or big_vision. Its first keys: {sorted(arrays)[:5]}"
        )
    query = params.get("encoder/block_0/attn/query/kernel")
    return Checkpoint(
        path=str(path),
        origin="big_vision" if big_vision else "vt",
        params=params,
        unmatched=unmatched,
        # big_vision adds the position embedding before the class token goes in front.
        posemb_prefix=0 if big_vision else int("cls_token/token" in params),
        num_heads=int(query.shape[1]) if query is not None and query.ndim == 3 else None,
    )


def _is_hf_state_dict(keys: Sequence[str]) -> bool:
    return any(
        k.startswith(("vit.", "embeddings.patch_embeddings", "encoder.layer.", "layers.")) for k in keys
    )


def _from_state_dict(path: Path, arrays: dict[str, np.ndarray], metadata: Mapping[str, str]) -> Checkpoint:
    _, arrays = _strip_prefix(arrays, ("module.",))
    if _is_hf_state_dict(list(arrays)):
        return _from_hf(path, arrays, {})
    params, unmatched = layouts.rename(arrays, layouts.TIMM_RULES)
    if "patch_embed/kernel" not in params:
        raise ValueError(
            f"{path} holds neither a timm ViT state dict (no 'patch_embed.proj.weight') nor a Hugging Face"
            f" ViT one. Its first keys: {sorted(arrays)[:5]}"
        )
    config = json.loads(metadata["jaxvit_model"]) if "jaxvit_model" in metadata else {}
    saved = config.get("model", {})
    has_cls = "cls_token/token" in params
    prefix = int(has_cls)
    posemb = params.get("pos_embed/embedding")
    if posemb is not None and has_cls and not _is_square(posemb.shape[1] - 1) and _is_square(posemb.shape[1]):
        prefix = 0  # timm's no_embed_class: the class token gets no position embedding
    return Checkpoint(
        path=str(path),
        origin="timm",
        params=params,
        unmatched=unmatched,
        posemb_prefix=prefix,
        num_heads=saved.get("num_heads"),
        grid=_grid_from_config({**saved, **config}),
        config=config,
    )


def _grid_from_config(config: Mapping[str, Any]) -> tuple[int, int] | None:
    if "image_size" not in config or "patch_size" not in config:
        return None
    (h, w), (p, q) = to_pair(config["image_size"]), to_pair(config["patch_size"])
    return (h // p, w // q)


def _read_hf_folder(folder: Path) -> Checkpoint:
    if (folder / "checkpoints").is_dir():
        raise ValueError(
            f"{folder} is a training workdir, not a pretrained checkpoint: use jaxvit.load_for_inference"
            " (or jaxvit.checkpointing.restore_params) to read it"
        )
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{folder} is a folder without config.json: expected a Hugging Face ViT folder"
            " (config.json + model.safetensors, as save_pretrained writes them)"
        )
    config = files.read_json(config_path)
    arrays: dict[str, np.ndarray] = {}
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(files.read_json(index).get("weight_map", {}).values()))
        for shard in shards:
            arrays.update(files.read_safetensors(folder / shard)[0])
    elif (folder / "model.safetensors").exists():
        arrays = files.read_safetensors(folder / "model.safetensors")[0]
    elif (folder / "pytorch_model.bin").exists():
        arrays = files.read_torch(folder / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{folder} has config.json but no model.safetensors (nor pytorch_model.bin)")
    return _from_hf(folder, arrays, config)


def _from_hf(path: Path, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Checkpoint:
    if config and config.get("model_type", "vit") != "vit":
        raise ValueError(f"{path}: config.json has model_type={config.get('model_type')!r}, expected 'vit'")
    stripped = {(k[4:] if k.startswith("vit.") else k): v for k, v in arrays.items()}
    params, unmatched = layouts.rename(stripped, layouts.HF_RULES)
    return Checkpoint(
        path=str(path),
        origin="hf",
        params=params,
        unmatched=unmatched,
        posemb_prefix=1,
        num_heads=config.get("num_attention_heads"),
        grid=_grid_from_config(config),
        config=config,
    )


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


# ---------------------------------------------------------------------------
# Fitting to a model
# ---------------------------------------------------------------------------


def _target_shapes(model: VisionTransformer, image_size: ImageSize) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat ``/``-joined parameter shapes of ``model`` (unrolled) at ``image_size``."""
    h, w = to_pair(image_size)
    unrolled = model.clone(scan=False) if model.scan else model
    images = jax.ShapeDtypeStruct((1, h, w, model.num_channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: unrolled.init(jax.random.key(0), x), images)
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes["params"]), sep="/")


def _depth(params: Mapping[str, Any]) -> int:
    indices = {int(m.group(1)) for k in params if (m := _BLOCK_INDEX.match(k))}
    return max(indices) + 1 if indices else 0


def _check_architecture(ckpt: Checkpoint, model: VisionTransformer) -> None:
    p = ckpt.params
    problems = []
    bias = p.get("patch_embed/bias")
    if bias is not None and bias.shape[0] != model.width:
        problems.append(
            f"width {bias.shape[0]} (patch_embed/bias {bias.shape}) but the model has width={model.width}"
        )
    depth = _depth(p)
    if depth != model.depth:
        problems.append(
            f"depth {depth} (encoder blocks 0..{depth - 1}) but the model has depth={model.depth}"
        )
    if ckpt.num_heads is not None and ckpt.num_heads != model.num_heads:
        problems.append(f"{ckpt.num_heads} attention heads but the model has num_heads={model.num_heads}")
    kernel = p.get("patch_embed/kernel")
    patch = (model.patch_size,) * 2 if isinstance(model.patch_size, int) else tuple(model.patch_size)
    if kernel is not None and tuple(kernel.shape[:2]) != patch:
        problems.append(
            f"patch size {tuple(kernel.shape[:2])} (patch_embed/kernel {kernel.shape}) but the model has"
            f" patch_size={model.patch_size}"
        )
    if problems:
        raise ValueError(f"{ckpt.path} does not fit the model: the checkpoint has " + "; ".join(problems))


def _padded_sincos(model: VisionTransformer, grid: tuple[int, int]) -> np.ndarray:
    table = np.asarray(posemb_sincos_2d(grid, model.width))
    return np.pad(table, ((0, 0), (int(model.class_token), 0), (0, 0)))


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
    prefix = int(model.class_token)
    if ckpt.posemb_prefix == 0 and prefix == 1:
        # The checkpoint adds its embedding to the patches before the class token goes in
        # front; adding a zero in the class slot after is the same computation.
        posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    elif ckpt.posemb_prefix == 1 and prefix == 0:
        raise ValueError(
            f"{ckpt.path}: the position embedding {posemb.shape} has a class-token slot but the model"
            " has class_token=False"
        )
    if key not in target:
        if model.posemb == "sincos2d" and posemb.shape == _padded_sincos(model, grid).shape:
            if np.allclose(posemb, _padded_sincos(model, grid), atol=1e-5):
                log.info("the checkpoint's position embedding is the fixed sincos2d table; not loading it")
                return {k: v for k, v in flat.items() if k != key}
        return {**flat, key: posemb}  # reported as unexpected
    if posemb.shape[1] != target[key].shape[1]:
        old_len = posemb.shape[1] - prefix
        old_grid = checkpoint_grid or ckpt.grid
        if old_grid is None:
            if not _is_square(old_len):
                raise ValueError(
                    f"{ckpt.path}: cannot tell the grid of the position embedding {posemb.shape}"
                    f" ({old_len} grid tokens is not a square): pass checkpoint_grid=(h, w)"
                )
            old_grid = (math.isqrt(old_len),) * 2
        if old_grid[0] * old_grid[1] != old_len:
            raise ValueError(
                f"{ckpt.path}: checkpoint grid {old_grid} does not match the position embedding"
                f" {posemb.shape} ({old_len} grid tokens)"
            )
        log.info(
            "resampling the position embedding of %s from a %dx%d grid to %dx%d (bilinear, class slot kept)",
            ckpt.path,
            *old_grid,
            *grid,
        )
        posemb = np.asarray(resample_posemb(posemb, grid, tuple(old_grid), prefix))
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
    kernel_key, bias_key = "head/classifier/kernel", "head/classifier/bias"
    if kernel_key in target:
        want = tuple(target[kernel_key].shape)
        have = flat.get(kernel_key)
        if have is None or tuple(have.shape) != want:
            why = "it has no classifier" if have is None else f"its classifier is {tuple(have.shape)}"
            log.info(
                "new zero-initialised head %s for %d classes: %s of %s",
                want,
                model.num_classes,
                why,
                ckpt.path,
            )
            flat[kernel_key] = np.zeros(want, np.float32)
            flat[bias_key] = np.full(want[-1:], model.head_bias_init, np.float32)
    elif kernel_key in flat:
        shape = flat.pop(kernel_key).shape
        flat.pop(bias_key, None)
        log.info("dropping the classifier %s of %s: the model has num_classes=0", shape, ckpt.path)
    return flat


def _hint(key: str) -> str:
    for fragment, hint in layouts.UNSUPPORTED_HINTS.items():
        if fragment in key:
            return f" ({hint})"
    if key == "pos_embed/embedding":
        return " (the model has posemb='sincos2d', which has no parameter)"
    return ""


def _check_keys(
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
    target = _target_shapes(model, (h, w))
    p, q = to_pair(model.patch_size)
    _check_architecture(ckpt, model)
    flat = layouts.fuse_attention(ckpt.params, model.num_heads)
    flat = _fit_posemb(flat, ckpt, model, target, (h // p, w // q), checkpoint_grid)
    flat = _fit_head(flat, ckpt, model, target)
    _check_keys(flat, ckpt.unmatched, target, ckpt.path)
    params = {k: jnp.asarray(np.asarray(v, np.float32), target[k].dtype) for k, v in flat.items()}
    tree = flax.traverse_util.unflatten_dict(params, sep="/")
    return unrolled_to_scan(tree) if model.scan else tree


def load_pretrained(
    path: str | os.PathLike,
    model: VisionTransformer,
    image_size: ImageSize = 224,
    *,
    checkpoint_grid: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A checkpoint file or folder -> ``params`` for ``model`` (``variables["params"]``).

    The format is told from the content: VT/AugReg or big_vision ``.npz``
    (unrolled or scanned), a timm state dict (``.safetensors``, or
    ``.pth``/``.bin`` when PyTorch is installed), a Hugging Face ViT folder.
    ``image_size`` (int or ``(h, w)``) fixes the model's patch grid; a
    position embedding of another grid is resampled bilinearly (its grid is
    taken as square unless the checkpoint says otherwise or
    ``checkpoint_grid`` is given). A classifier of another class count is
    replaced by a zero-initialised one; ``pre_logits`` is dropped when the
    model has no ``representation_size``. Any other mismatch raises
    ``ValueError`` naming the keys and shapes.
    """
    return fit_to_model(read_checkpoint(path), model, image_size, checkpoint_grid=checkpoint_grid)


# ---------------------------------------------------------------------------
# Models from checkpoints
# ---------------------------------------------------------------------------


def _hf_config(folder_or_config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(folder_or_config, Mapping):
        return dict(folder_or_config)
    path = Path(folder_or_config)
    return files.read_json(path / "config.json" if path.is_dir() else path)


def model_from_hf_config(
    folder_or_config: str | os.PathLike | Mapping[str, Any], **overrides: Any
) -> VisionTransformer:
    """A Hugging Face ViT ``config.json`` (its folder, path or dict) -> the matching ``VisionTransformer``.

    ``ViTForImageClassification`` gets ``num_classes=len(id2label)``; other
    architectures (``ViTModel``) give features (``num_classes=0``).
    """
    config = _hf_config(folder_or_config)
    act = config.get("hidden_act", "gelu")
    if act not in _HF_GELU:
        raise ValueError(f"hidden_act={act!r} is not supported: expected one of {sorted(_HF_GELU)}")
    if not config.get("qkv_bias", True):
        raise ValueError("qkv_bias=False is not supported: jaxvit's attention projections have biases")
    architectures = config.get("architectures") or ["ViTForImageClassification"]
    classify = any(a.endswith("ForImageClassification") for a in architectures)
    num_labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    fields = dict(
        num_classes=num_labels if classify else 0,
        width=config.get("hidden_size", 768),
        depth=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 12),
        mlp_dim=config.get("intermediate_size", 3072),
        patch_size=config.get("patch_size", 16),
        num_channels=config.get("num_channels", 3),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        gelu_approximate=_HF_GELU[act],
        class_token=True,
        pool="tok",
        posemb="learn",
    )
    fields.update(overrides)
    return create_model(None, **fields)


def _guess_num_heads(width: int, path: str) -> int:
    for name, sizes in VARIANTS.items():
        if sizes["width"] == width:
            log.warning(
                "%s does not say its number of heads; using %d, that of ViT-%s",
                path,
                sizes["num_heads"],
                name,
            )
            return sizes["num_heads"]
    if width % 64 == 0:
        log.warning("%s does not say its number of heads; using %d (head_dim 64)", path, width // 64)
        return width // 64
    raise ValueError(f"{path} does not say its number of attention heads (width {width}): pass num_heads=...")


def model_from_checkpoint(ckpt: Checkpoint, **overrides: Any) -> tuple[VisionTransformer, tuple[int, int]]:
    """``(model, image_size)`` that a read checkpoint was made for, from its shapes and config.

    Fields the weights cannot tell take the origin's defaults (exact GELU,
    LayerNorm epsilon 1e-6); ``overrides`` set any model field.
    """
    if ckpt.origin == "hf" and ckpt.config:
        size = to_pair(ckpt.config.get("image_size", 224))
        return model_from_hf_config(ckpt.config, **overrides), size
    p = ckpt.params
    if "patch_embed/kernel" not in p:
        raise ValueError(f"{ckpt.path} has no patch embedding: cannot tell the model")
    saved = ckpt.config.get("model", {})
    if saved:
        fields = {k: v for k, v in saved.items() if k in MODEL_FIELDS}
        fields.update(overrides)
        model = create_model(None, **fields)
        return model, to_pair(ckpt.config.get("image_size", 224))
    kp, kq, channels, width = p["patch_embed/kernel"].shape
    class_token = "cls_token/token" in p
    pool = "map" if any(k.startswith("head/map/") for k in p) else ("tok" if class_token else "gap")
    fields: dict[str, Any] = dict(
        num_classes=p["head/classifier/bias"].shape[0] if "head/classifier/bias" in p else 0,
        patch_size=kp if kp == kq else (kp, kq),
        width=width,
        depth=_depth(p),
        mlp_dim=p["encoder/block_0/mlp/fc1/kernel"].shape[-1]
        if "encoder/block_0/mlp/fc1/kernel" in p
        else None,
        num_channels=channels,
        class_token=class_token,
        pool=pool,
        posemb="learn" if "pos_embed/embedding" in p else "sincos2d",
        representation_size=(
            p["head/pre_logits/kernel"].shape[-1] if "head/pre_logits/kernel" in p else None
        ),
    )
    fields.update(overrides)
    if "num_heads" not in fields:
        fields["num_heads"] = ckpt.num_heads or _guess_num_heads(width, ckpt.path)
    model = create_model(None, **fields)
    size = (224, 224)
    if "pos_embed/embedding" in p:
        grid_len = p["pos_embed/embedding"].shape[1] - ckpt.posemb_prefix
        grid = ckpt.grid or ((math.isqrt(grid_len),) * 2 if _is_square(grid_len) else None)
        if grid is None:
            raise ValueError(
                f"{ckpt.path}: {grid_len} position-embedding grid tokens is not a square: pass image_size"
            )
        size = (grid[0] * kp, grid[1] * kq)
    return model, size


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def _flat_params(params: Mapping[str, Any], model: VisionTransformer) -> dict[str, np.ndarray]:
    params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else dict(params)
    if set(params) == {"params"}:
        params = dict(params["params"])
    if "blocks" in params.get("encoder", {}):
        params = scan_to_unrolled(params)
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in flat.items()}


def _export_image_size(
    flat: Mapping[str, np.ndarray], model: VisionTransformer, image_size: ImageSize | None
):
    if image_size is not None:
        return to_pair(image_size)
    p, q = to_pair(model.patch_size)
    posemb = flat.get("pos_embed/embedding")
    if posemb is None:
        return (224, 224)
    grid_len = posemb.shape[1] - int(model.class_token)
    if not _is_square(grid_len):
        raise ValueError(
            f"the position embedding {posemb.shape} is not a square grid: pass image_size=(h, w)"
        )
    side = math.isqrt(grid_len)
    return (side * p, side * q)


def _check_params_fit(
    flat: Mapping[str, np.ndarray], model: VisionTransformer, size: tuple[int, int]
) -> None:
    target = _target_shapes(model, size)
    _check_keys(flat, {}, target, "the params to export")


def _timm_kwargs(model: VisionTransformer, size: tuple[int, int]) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        img_size=list(size),
        patch_size=model.patch_size,
        in_chans=model.num_channels,
        num_classes=model.num_classes,
        embed_dim=model.width,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=(model.mlp_dim or 4 * model.width) / model.width,
        class_token=model.class_token,
        global_pool={"tok": "token", "gap": "avg", "map": "map"}[model.pool],
        fc_norm=False,
    )
    if model.gelu_approximate:
        kwargs["act_layer"] = "gelu_tanh"
    return kwargs


def _model_fields(model: VisionTransformer) -> dict[str, Any]:
    fields = {}
    for name in MODEL_FIELDS:
        value = getattr(model, name)
        if isinstance(value, (bool, int, float, str, type(None), tuple, list)):
            fields[name] = value
    return fields


def _hf_export_config(model: VisionTransformer, size: tuple[int, int], labels: Sequence[str] | None) -> dict:
    names = list(labels) if labels else [f"LABEL_{i}" for i in range(model.num_classes)]
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": model.width,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "intermediate_size": model.mlp_dim or 4 * model.width,
        "hidden_act": "gelu_pytorch_tanh" if model.gelu_approximate else "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": model.layer_norm_eps,
        "image_size": size[0] if size[0] == size[1] else list(size),
        "patch_size": model.patch_size,
        "num_channels": model.num_channels,
        "qkv_bias": True,
        "encoder_stride": to_pair(model.patch_size)[0],
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }


def export(
    params: Mapping[str, Any],
    path: str | os.PathLike,
    format: str = "npz",
    *,
    model: VisionTransformer,
    image_size: ImageSize | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Writes ``params`` of ``model`` for a peer's own loader; returns the path written.

    ``format="npz"``: the google-research/vision_transformer layout (what
    timm's ``_load_weights`` reads). ``"timm"``: a timm ``VisionTransformer``
    state dict as safetensors; its metadata holds the matching timm kwargs
    (``timm_kwargs``) and the jaxvit model fields. ``"hf"``: a folder with
    ``config.json`` + ``model.safetensors`` for ``ViTForImageClassification``
    (``labels`` name the classes). ``image_size`` defaults to the position
    embedding's square grid. Scanned or unrolled params both work.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: expected one of {FORMATS}")
    path = Path(path)
    flat = _flat_params(params, model)
    size = _export_image_size(flat, model, image_size)
    _check_params_fit(flat, model, size)
    if format == "npz":
        out = layouts.rename_back(
            layouts.split_attention(flat, model.num_heads, "heads", "heads"), layouts.VT_RULES, "npz"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # np.savez(str) would append ".npz" to other names
            np.savez(f, **out)
        return path

    if model.representation_size:
        raise ValueError(f"format={format!r} has no pre_logits layer: the model has representation_size set")
    p, q = to_pair(model.patch_size)
    if model.posemb == "sincos2d":
        # The peers have no fixed sin-cos option; a learned table with these values computes the same.
        flat["pos_embed/embedding"] = _padded_sincos(model, (size[0] // p, size[1] // q))
    if format == "timm":
        out = layouts.rename_back(
            layouts.split_attention(flat, model.num_heads, "fused", "flat_kv"), layouts.TIMM_RULES, "timm"
        )
        metadata = {
            "jaxvit_model": json.dumps(
                {"model": _model_fields(model), "image_size": list(size), "labels": list(labels or [])}
            ),
            "timm_kwargs": json.dumps(_timm_kwargs(model, size)),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_safetensors(out, path, metadata)
        return path

    if model.pool != "tok" or not model.class_token or not model.num_classes:
        raise ValueError(
            "format='hf' writes ViTForImageClassification, which needs pool='tok', class_token=True and"
            f" num_classes > 0; the model has pool={model.pool!r}, class_token={model.class_token},"
            f" num_classes={model.num_classes}"
        )
    if labels is not None and len(labels) != model.num_classes:
        raise ValueError(f"{len(labels)} labels for a model with num_classes={model.num_classes}")
    out = layouts.rename_back(
        layouts.split_attention(flat, model.num_heads, "flat", "heads"), layouts.HF_RULES, "hf"
    )
    out = {(k if k.startswith("classifier.") else f"vit.{k}"): v for k, v in out.items()}
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(_hf_export_config(model, size, labels), f, indent=2)
    files.write_safetensors(out, path / "model.safetensors")
    return path


# ---------------------------------------------------------------------------
# Inference bundles
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class InferenceBundle:
    """Everything needed to classify images with a checkpoint.

    ``image_size`` is ``(h, w)``; images are scaled to [0, 1] then
    normalised with ``mean``/``std`` (per RGB channel). ``crop_pct`` < 1 means
    resize the shorter side to ``size / crop_pct`` and center-crop (timm);
    1.0 means resize the whole image to ``image_size``. ``origin`` is one of
    ``ORIGINS``; ``labels`` the class names, when the checkpoint has them.
    """

    model: VisionTransformer
    params: Any
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...] | None
    origin: str
    crop_pct: float = 1.0
    interpolation: str = "bilinear"


def _hf_labels(config: Mapping[str, Any]) -> tuple[str, ...] | None:
    id2label = config.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return tuple(names)


def read_labels(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names from a text file, one per line in class-index order (blank lines skipped)."""
    with open(path) as f:
        return tuple(line.rstrip("\n") for line in f if line.strip())


def _workdir_bundle(workdir: Path, image_size: ImageSize | None) -> InferenceBundle:
    try:
        from jaxvit.checkpointing import restore_params
    except ImportError as e:
        raise ValueError(
            f"{workdir} is a training workdir; reading it needs jaxvit.checkpointing.restore_params,"
            f" which this installation lacks ({e})"
        ) from None
    model, params, config = restore_params(str(workdir))
    size = to_pair(config.get("image_size", 224))
    if image_size is not None and to_pair(image_size) != size:
        params = _resize_posemb_tree(params, model, size, to_pair(image_size))
        size = to_pair(image_size)
    labels_path = workdir / "labels.txt"
    # as the run's own evaluation prepared its inputs
    _, _, crop, interp = PREPROCESSING["workdir"]
    data = config.get("data", {})
    mean, std = tuple(data.get("mean", (0.5,))), tuple(data.get("std", (0.5,)))
    crop = data.get("crop_fraction", crop)
    return InferenceBundle(
        model,
        params,
        size,
        mean,
        std,
        read_labels(labels_path) if labels_path.exists() else None,
        "workdir",
        crop,
        interp,
    )


def _resize_posemb_tree(
    params: Any, model: VisionTransformer, old: tuple[int, int], new: tuple[int, int]
) -> Any:
    if model.posemb != "learn":
        return params
    p, q = to_pair(model.patch_size)
    params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
    posemb = params["pos_embed"]["embedding"]
    log.info("resampling the position embedding from %s to %s pixels", old, new)
    resized = resample_posemb(
        posemb, (new[0] // p, new[1] // q), (old[0] // p, old[1] // q), int(model.class_token)
    )
    return {**params, "pos_embed": {**params["pos_embed"], "embedding": resized}}


def load_for_inference(
    path: str | os.PathLike, image_size: ImageSize | None = None, **model_overrides: Any
) -> InferenceBundle:
    """A checkpoint file, Hugging Face folder or training workdir -> an ``InferenceBundle``.

    The model is built from the checkpoint itself (``model_from_checkpoint``;
    ``model_overrides`` set fields the weights cannot tell, e.g.
    ``num_heads`` of a foreign timm file). ``image_size`` defaults to the
    checkpoint's; another size resamples the position embedding.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir() and (path / "checkpoints").is_dir():
        return _workdir_bundle(path, image_size)
    ckpt = read_checkpoint(path)
    model, native = model_from_checkpoint(ckpt, **model_overrides)
    size = to_pair(image_size) if image_size is not None else native
    params = fit_to_model(ckpt, model, size)
    labels = _hf_labels(ckpt.config) if ckpt.origin == "hf" else None
    if labels is None and ckpt.config.get("labels"):
        labels = tuple(ckpt.config["labels"])
    mean, std, crop, interp = PREPROCESSING[ckpt.origin]
    return InferenceBundle(model, params, size, mean, std, labels, ckpt.origin, crop, interp)
