"""The checkpoint formats jaxvit reads and writes: one module each, one row each here.

A format module has ``NAME`` (the origin it reports), ``PREPROCESSING`` (how
its images were prepared), ``claims(kind, arrays)`` (whether a file of
``kind`` "npz" or "state_dict" with these keys is its own) and
``read(path, arrays, metadata) -> Checkpoint``. Optional:

- ``EXPORT_FORMAT`` and ``write(flat, model, size, path, labels)`` for
  ``jaxvit.export``, with ``exports(model)`` when several modules write one
  format (``EXPORT_ORDER``: the first that takes the model writes it; the
  generic layout comes last), ``TARGET`` (what the peer loads, for messages),
  ``CARRIES`` (the architecture fields besides ``ALWAYS_CARRIED`` that the
  written file expresses: ``export`` refuses a model whose other architecture
  fields are not at their defaults; a writer that can express only some
  values of a carried field refuses the others by name) and
  ``HAS_PRE_LOGITS`` / ``HAS_SINCOS`` (whether the layout holds a
  ``pre_logits`` layer and can leave out a fixed sin-cos table);
- ``HF_MODEL_TYPES``: the ``config.json`` ``model_type``s of the Hugging Face
  folders it reads (folders are told apart by their config, not their keys);
- ``build_model(ckpt, **overrides)`` when the file says its architecture
  (otherwise it is told from the shapes), ``guess_fields(ckpt)`` for model
  fields the weights cannot tell, ``labels(ckpt)``, and
  ``preprocessing(ckpt)`` when one format holds families prepared differently.

Adding a format means adding its module and a row to ``FORMATS`` (and to
``EXPORT_ORDER`` if it writes).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from jaxvit.checkpoints.checkpoint import Preprocessing
from jaxvit.checkpoints.formats import (
    big_vision,
    hf_clip,
    hf_deit,
    hf_dinov2,
    hf_dinov3,
    hf_siglip,
    hf_vit,
    timm,
    timm_dinov3,
    vision_transformer,
)

# Asked in this order: the first format that claims a file reads it.
FORMATS: tuple[ModuleType, ...] = (
    big_vision,
    vision_transformer,
    hf_clip,
    hf_siglip,
    hf_deit,
    hf_dinov2,
    hf_dinov3,
    hf_vit,
    timm_dinov3,
    timm,
)

# The writers of each export format, asked in this order; the last takes any model.
EXPORT_ORDER: tuple[ModuleType, ...] = (
    vision_transformer,
    hf_clip,
    hf_siglip,
    hf_dinov3,
    hf_deit,
    hf_dinov2,
    hf_vit,
    timm_dinov3,
    timm,
)
EXPORTERS: dict[str, tuple[ModuleType, ...]] = {}
for _fmt in EXPORT_ORDER:
    EXPORTERS[_fmt.EXPORT_FORMAT] = (*EXPORTERS.get(_fmt.EXPORT_FORMAT, ()), _fmt)
# the generic writer of each export format (it names what it cannot write)
EXPORTS: dict[str, ModuleType] = {name: mods[-1] for name, mods in EXPORTERS.items()}

# The sizes every layout states, in its shapes or its config: carried by every writer.
ALWAYS_CARRIED = ("num_classes", "patch_size", "width", "depth", "mlp_dim", "num_heads", "num_channels")


def carries(writer: ModuleType) -> frozenset[str]:
    """The architecture fields ``writer`` expresses: ``ALWAYS_CARRIED`` and its ``CARRIES``."""
    return frozenset(ALWAYS_CARRIED) | frozenset(writer.CARRIES)


# config.json's model_type -> the format that reads the folder.
HF_MODEL_TYPES: dict[str, ModuleType] = {t: f for f in FORMATS for t in getattr(f, "HF_MODEL_TYPES", ())}


def format_for(kind: str, arrays: Mapping[str, np.ndarray]) -> ModuleType:
    """The format module that reads a file of ``kind`` with these arrays."""
    for fmt in FORMATS:
        if fmt.claims(kind, arrays):
            return fmt
    raise ValueError(f"no checkpoint format reads a {kind} with keys {sorted(arrays)[:5]}")


def hf_format(config: Mapping[str, Any], path: str | Path = "the folder") -> ModuleType:
    """The format module of a Hugging Face folder, by its ``config.json``'s ``model_type``.

    Raises ``ValueError`` listing the supported model types for any other.
    """
    model_type = config.get("model_type", "vit")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"{path}: config.json has model_type={model_type!r}, which jaxvit does not read;"
            f" supported model types: {sorted(HF_MODEL_TYPES)}"
        )
    return HF_MODEL_TYPES[model_type]


def exporter(format: str, model: Any) -> ModuleType:
    """The module that writes ``model`` in ``format``: the first family whose layout takes it."""
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
