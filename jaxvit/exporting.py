"""Writing jaxvit params in the peers' own layouts (``jaxvit.export``).

The format modules in ``jaxvit.convert`` write the files; this module puts
the params in their common form first (flat, unrolled, float32) and checks
them against the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from jaxvit.convert import registry
from jaxvit.convert.checkpoint import Flat
from jaxvit.fitting import check_keys, sincos_table, target_shapes
from jaxvit.model import VisionTransformer, scan_to_unrolled, square_grid, to_pair

ImageSize = int | tuple[int, int]
FORMATS = tuple(registry.EXPORTS)


def flat_params(params: Mapping[str, Any]) -> Flat:
    """Params (or variables with a ``params`` entry), scanned or not -> flat, unrolled float32 arrays."""
    params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else dict(params)
    if set(params) == {"params"}:
        params = dict(params["params"])
    if "blocks" in params.get("encoder", {}):
        params = scan_to_unrolled(params)
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in flat.items()}


def _image_size(flat: Flat, model: VisionTransformer, image_size: ImageSize | None) -> tuple[int, int]:
    if image_size is not None:
        return to_pair(image_size)
    p, q = to_pair(model.patch_size)
    posemb = flat.get("pos_embed/embedding")
    if posemb is None:
        return (224, 224)
    grid = square_grid(posemb.shape[1] - model.num_posemb_prefix_tokens)
    if grid is None:
        raise ValueError(
            f"the position embedding {posemb.shape} is not a square grid: pass image_size=(h, w)"
        )
    return (grid[0] * p, grid[1] * q)


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
    ``config.json`` + ``model.safetensors`` for the model's family in
    transformers: ``DeiTForImageClassificationWithTeacher`` / ``DeiTModel``
    with a distillation token, ``Dinov2Model`` / ``Dinov2WithRegistersModel``
    with LayerScale, registers or SwiGLU, else ``ViTForImageClassification``
    (``labels`` name the classes). ``image_size`` defaults to the position
    embedding's square grid. Scanned or unrolled params both work.
    """
    if format not in registry.EXPORTS:
        raise ValueError(f"unknown export format {format!r}: expected one of {FORMATS}")
    path = Path(path)
    flat = flat_params(params)
    size = _image_size(flat, model, image_size)
    check_keys(flat, {}, target_shapes(model, size), "the params to export")
    writer = registry.exporter(format, model)
    if model.representation_size and not writer.HAS_PRE_LOGITS:
        raise ValueError(f"format={format!r} has no pre_logits layer: the model has representation_size set")
    if model.posemb == "sincos2d" and not writer.HAS_SINCOS:
        # The peer has no fixed sin-cos option; a learned table with these values computes the same.
        p, q = to_pair(model.patch_size)
        flat["pos_embed/embedding"] = sincos_table(model, (size[0] // p, size[1] // q))
    return writer.write(flat, model, size, path, labels)
