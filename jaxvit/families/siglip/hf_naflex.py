"""Hugging Face SigLIP 2 NaFlex image towers: ``Siglip2VisionModel`` and the image half of ``Siglip2Model``.

SigLIP's tower (``families/siglip/hf.py``) with two differences, both of NaFlex:
the patch embedding is a ``Linear`` on patches flattened in ``(p q c)`` order
(jaxvit's ``PatchEmbed`` kernel ``(p, q, C, D)``, reshaped), and the position
table is kept at its own grid (``sqrt(num_patches)`` a side: the model's
``posemb_grid``) and resized to each image's grid inside the model. The
model takes patch sequences (``grids=``, ``mask=``; ``jaxvit.data.naflex``
prepares them as ``Siglip2ImageProcessor`` does) or plain images.
``last_hidden_state`` is ``encoded``, ``pooler_output`` the pooled features.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import Checkpoint, Flat, Preprocessing, log
from jaxvit.families.siglip import hf as siglip
from jaxvit.model import VisionTransformer
from jaxvit.safety import files
from jaxvit.sizes import to_pair

NAME = "hf_siglip2"
HF_MODEL_TYPES = ("siglip2_vision_model", "siglip2")
EXPORT_FORMAT = "hf"
HAS_SINCOS = False
TARGET = "transformers Siglip2VisionModel"
CARRIES = (*siglip.CARRIES, "posemb_grid")
EXAMPLE = dict(num_classes=0, pool="map", class_token=False, posemb_grid=2)
# Images keep their aspect ratio (jaxvit.data.naflex); these are the values' scale and resize.
PREPROCESSING = Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear")
_PATCH = "embeddings.patch_embedding.weight"


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A state dict with SigLIP's image-tower names whose patch embedding is a ``Linear`` (2-D)."""
    weight = arrays.get(_PATCH, arrays.get(siglip.TOWER + _PATCH))
    return kind == "state_dict" and weight is not None and np.ndim(weight) == 2


def _sizes(tower: Mapping[str, Any], path: Path) -> tuple[int, int, int]:
    """``(patch, channels, table side)`` from a ``Siglip2VisionConfig``; ``ValueError`` without one."""
    if not tower:
        raise ValueError(
            f"{path}: a SigLIP 2 NaFlex state dict does not say its patch size and channels (its patch"
            " embedding is one flat matrix): load its folder, with config.json"
        )
    patch = tower.get("patch_size", 16)
    if not isinstance(patch, int) or isinstance(patch, bool):
        raise ValueError(f"{path}: patch_size must be one integer in a Siglip2VisionConfig, got {patch!r}")
    patches = tower.get("num_patches", 256)
    side = math.isqrt(patches) if isinstance(patches, int) and patches > 0 else 0
    if side * side != patches:
        raise ValueError(f"{path}: num_patches must be a square (the table's grid), got {patches!r}")
    return patch, tower.get("num_channels", 3), side


def read(path: Path, arrays: Flat, config: Mapping[str, Any]) -> Checkpoint:
    """A SigLIP 2 NaFlex image tower's state dict and ``config.json`` -> a ``Checkpoint``."""
    tower = siglip.vision_config(config) if config else {}
    patch, channels, side = _sizes(tower, path)
    kept, left_out = layouts.image_tower(arrays)
    if left_out:
        log.info("%s: reading the image tower, leaving out %d other entries", path, left_out)
    weight = kept.get(_PATCH)
    if weight is not None:
        if weight.ndim != 2 or weight.shape[1] != patch * patch * channels:
            raise ValueError(
                f"{path}: {_PATCH} has shape {weight.shape}, not (width, {patch * patch * channels}) for"
                f" {patch}x{patch} patches of {channels} channels"
            )
        # (D, p*q*C) in (p q c) order -> torch's conv layout (D, C, p, q)
        kept[_PATCH] = weight.reshape(-1, patch, patch, channels).transpose(0, 3, 1, 2)
    params, unmatched = layouts.rename(siglip.split_in_proj(kept), siglip.RULES)
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=0,
        num_heads=tower.get("num_attention_heads"),
        grid=(side, side),
        config=tower,
        # the model resizes its table to each image's grid, antialiased bilinear
        posemb_resample="bilinear",
        posemb_antialias=True,
    )


def model_from_config(config: Mapping[str, Any], **overrides: Any) -> VisionTransformer:
    """A ``Siglip2VisionConfig`` (or ``Siglip2Config``) dict -> the matching ``VisionTransformer``."""
    _, _, side = _sizes(siglip.vision_config(config), Path("config.json"))
    return siglip.model_from_config(config, **{"posemb_grid": side, **overrides})


def build_model(ckpt: Checkpoint, **overrides: Any) -> tuple[VisionTransformer, tuple[int, int]]:
    """``(model, image size)``: the image size is the table's grid in pixels (a square image whose
    grid needs no resize)."""
    patch, _, side = _sizes(ckpt.config, Path(ckpt.path))
    return model_from_config(ckpt.config, **overrides), (side * patch, side * patch)


def guess_fields(ckpt: Checkpoint) -> dict[str, Any]:
    """Never asked: ``read`` refuses a state dict without its config."""
    return dict(layer_norm_eps=1e-6, activation="gelu_tanh")


def exports(model: VisionTransformer) -> bool:
    """Whether ``format="hf"`` writes ``model`` as a SigLIP 2 NaFlex tower: SigLIP's with a table of
    its own grid (``posemb_grid``)."""
    return siglip.exports(model.clone(posemb_grid=None)) and model.posemb_grid is not None


def export_config(model: VisionTransformer) -> dict[str, Any]:
    """The ``Siglip2VisionConfig`` of ``model``."""
    side = to_pair(model.posemb_grid)
    config = siglip.export_config(model, (side[0], side[0]))
    config.pop("image_size")
    config.update(architectures=["Siglip2VisionModel"], model_type="siglip2_vision_model")
    config["num_patches"] = side[0] * side[1]
    return config


def write(
    flat: Flat, model: VisionTransformer, size: tuple[int, int], path: Path, labels: Sequence[str] | None
) -> Path:
    """jaxvit params (flat, unrolled) -> a ``Siglip2VisionModel`` folder at ``path``."""
    side, (p, q) = to_pair(model.posemb_grid), to_pair(model.patch_size)
    if side[0] != side[1] or p != q:
        raise ValueError(
            "format='hf' writes a Siglip2VisionModel, whose position table and patches are square; the"
            f" model has posemb_grid={model.posemb_grid}, patch_size={model.patch_size}"
        )
    out = siglip.state_dict(flat, model, (side[0] * p, side[0] * p))
    weight = out[siglip.TOWER + _PATCH]  # (D, C, p, q) -> (D, p*q*C) in (p q c) order
    out[siglip.TOWER + _PATCH] = np.ascontiguousarray(weight.transpose(0, 2, 3, 1).reshape(len(weight), -1))
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(export_config(model), f, indent=2)
    files.write_safetensors(out, path / "model.safetensors")
    return path
