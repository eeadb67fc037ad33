"""The checkpoint formats jaxvit reads and writes: one module each, one row each here.

A format module has ``NAME`` (the origin it reports), ``PREPROCESSING`` (how
its images were prepared), ``claims(kind, arrays)`` (whether a file of
``kind`` "npz" or "state_dict" with these keys is its own) and
``read(path, arrays, metadata) -> Checkpoint``. Optional: ``EXPORT_FORMAT``,
``write(flat, model, size, path, labels)``, ``HAS_PRE_LOGITS`` and
``HAS_SINCOS`` (whether the layout can hold a ``pre_logits`` layer and leave
out a fixed sin-cos table) for ``jaxvit.export``, and ``exports(model)`` when
several modules share an ``EXPORT_FORMAT`` (the first that takes the model
writes it); ``build_model(ckpt, **overrides)`` when the file says its
architecture (otherwise it is told from the shapes); ``labels(ckpt)``;
``preprocessing(ckpt)`` when one format holds families prepared differently;
``guess_fields(ckpt)`` for model fields the weights cannot tell.

Hugging Face folders are not claimed by their keys: ``config.json``'s
``model_type`` picks the module (``HF_MODEL_TYPES``).

Adding a format means adding its module and a row to ``FORMATS`` (and its
model types to ``HF_MODEL_TYPES``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from jaxvit.convert import big_vision, hf_clip, hf_siglip, hf_vit, timm, vision_transformer
from jaxvit.convert.checkpoint import Preprocessing

# Asked in this order: the first format that claims a file reads it.
FORMATS: tuple[ModuleType, ...] = (big_vision, vision_transformer, hf_clip, hf_siglip, hf_vit, timm)

# config.json's model_type -> the format that reads the folder.
HF_MODEL_TYPES: dict[str, ModuleType] = {
    "vit": hf_vit,
    "clip_vision_model": hf_clip,
    "clip": hf_clip,
    "siglip_vision_model": hf_siglip,
    "siglip": hf_siglip,
}

# export format -> the modules that write it, asked in this order
EXPORTERS: dict[str, tuple[ModuleType, ...]] = {}
for _fmt in FORMATS:
    if hasattr(_fmt, "EXPORT_FORMAT"):
        EXPORTERS[_fmt.EXPORT_FORMAT] = (*EXPORTERS.get(_fmt.EXPORT_FORMAT, ()), _fmt)
# the last module of each export format takes any model (and names what it cannot write)
EXPORTS: dict[str, ModuleType] = {name: mods[-1] for name, mods in EXPORTERS.items()}


def format_for(kind: str, arrays: Mapping[str, np.ndarray]) -> ModuleType:
    """The format module that reads a file of ``kind`` with these arrays."""
    for fmt in FORMATS:
        if fmt.claims(kind, arrays):
            return fmt
    raise ValueError(f"no checkpoint format reads a {kind} with keys {sorted(arrays)[:5]}")


def hf_format(config: Mapping[str, Any], path: str | Path = "the folder") -> ModuleType:
    """The format module of a Hugging Face folder, by its ``config.json``'s ``model_type``."""
    model_type = config.get("model_type", "vit")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"{path}: config.json has model_type={model_type!r}, which jaxvit does not read;"
            f" supported model types: {sorted(HF_MODEL_TYPES)}"
        )
    return HF_MODEL_TYPES[model_type]


def exporter(format: str, model: Any) -> ModuleType:
    """The module that writes ``model`` in ``format`` (for "hf": the family whose class fits the model)."""
    candidates = EXPORTERS[format]
    for fmt in candidates[:-1]:
        if fmt.exports(model):
            return fmt
    return candidates[-1]


def by_origin(origin: str) -> ModuleType:
    """The format module whose ``NAME`` is ``origin``."""
    for fmt in FORMATS:
        if fmt.NAME == origin:
            return fmt
    raise ValueError(f"unknown origin {origin!r}: expected one of {[f.NAME for f in FORMATS]}")


def preprocessing(origin: str) -> Preprocessing:
    """How images are prepared for checkpoints of ``origin``."""
    return by_origin(origin).PREPROCESSING
