"""The checkpoint formats jaxvit reads and writes: one module each, one row each here.

A format module has ``NAME`` (the origin it reports), ``PREPROCESSING`` (how
its images were prepared), ``claims(kind, arrays)`` (whether a file of
``kind`` "npz", "state_dict" or "hf_folder" with these keys is its own) and
``read(path, arrays, metadata) -> Checkpoint``. Optional: ``EXPORT_FORMAT``,
``write(flat, model, size, path, labels)``, ``HAS_PRE_LOGITS`` and
``HAS_SINCOS`` (whether the layout can hold a ``pre_logits`` layer and leave
out a fixed sin-cos table) for ``jaxvit.export``;
``build_model(ckpt, **overrides)`` when the file says its architecture
(otherwise it is told from the shapes); ``labels(ckpt)``. Hugging Face
formats also have ``HF_MODEL_TYPES`` (the ``config.json`` ``model_type``s
they read: a folder goes to the format of its model type) and
``writes(model)`` (whether ``export(format="hf")`` writes ``model`` in their
family's layout; asked in ``HF_FORMATS`` order, Hugging Face ViT last).

Adding a format means adding its module and a row to ``FORMATS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from jaxvit.convert import (
    big_vision,
    hf_deit,
    hf_dinov2,
    hf_dinov3,
    hf_vit,
    timm,
    timm_dinov3,
    vision_transformer,
)
from jaxvit.convert.checkpoint import Preprocessing

# Asked in this order: the first format that claims a file reads it.
FORMATS: tuple[ModuleType, ...] = (
    big_vision,
    vision_transformer,
    hf_deit,
    hf_dinov2,
    hf_dinov3,
    hf_vit,
    timm_dinov3,
    timm,
)

EXPORTS: dict[str, ModuleType] = {f.EXPORT_FORMAT: f for f in FORMATS if hasattr(f, "EXPORT_FORMAT")}

# Hugging Face families: folders are told apart by config.json's model_type.
HF_FORMATS: tuple[ModuleType, ...] = (hf_dinov3, hf_deit, hf_dinov2, hf_vit)
HF_MODEL_TYPES: dict[str, ModuleType] = {
    "vit": hf_vit,
    **{t: f for f in HF_FORMATS for t in getattr(f, "HF_MODEL_TYPES", ())},
}


def hf_format(config: Mapping[str, Any], path: object = "") -> ModuleType:
    """The format module for a Hugging Face folder whose ``config.json`` is ``config``.

    Raises ``ValueError`` listing the supported model types for any other.
    """
    model_type = config.get("model_type", "vit")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"{path}: config.json has model_type={model_type!r}, which jaxvit does not read;"
            f" supported model types: {sorted(HF_MODEL_TYPES)}"
        )
    return HF_MODEL_TYPES[model_type]


def writer(format: str, model: Any) -> ModuleType:
    """The format module that ``export(format=...)`` writes ``model`` with: the family's own layout."""
    if format == "hf":
        return hf_writer(model)
    if format == "timm" and timm_dinov3.writes(model):
        return timm_dinov3
    return EXPORTS[format]


def hf_writer(model: Any) -> ModuleType:
    """The Hugging Face format that ``export(format="hf")`` writes ``model`` in."""
    for fmt in HF_FORMATS:
        if not hasattr(fmt, "writes") or fmt.writes(model):
            return fmt
    return hf_vit


def format_for(kind: str, arrays: Mapping[str, np.ndarray]) -> ModuleType:
    """The format module that reads a file of ``kind`` with these arrays."""
    for fmt in FORMATS:
        if fmt.claims(kind, arrays):
            return fmt
    raise ValueError(f"no checkpoint format reads a {kind} with keys {sorted(arrays)[:5]}")


def by_origin(origin: str) -> ModuleType:
    """The format module whose ``NAME`` is ``origin``."""
    for fmt in FORMATS:
        if fmt.NAME == origin:
            return fmt
    raise ValueError(f"unknown origin {origin!r}: expected one of {[f.NAME for f in FORMATS]}")


def preprocessing(origin: str) -> Preprocessing:
    """How images are prepared for checkpoints of ``origin``."""
    return by_origin(origin).PREPROCESSING
