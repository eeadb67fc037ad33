"""Hugging Face MAE: ``ViTMAEModel`` folders and state dicts, the encoder alone.

The layout is Hugging Face ViT's (``encoder.layer.{i}`` or transformers 5's
``layers.{i}``) without a pooler. The position embedding is a frozen table,
MAE's sin-cos (``posemb="sincos2d_mae"``) with a zero class slot; it is read
as the table the file holds, and resized for another image size bicubically,
as transformers' ``interpolate_pos_encoding`` and MAE's own fine-tuning
(``interpolate_pos_embed``) do.

transformers' ``ViTMAEModel`` drops ``mask_ratio`` of the patch tokens at
random and shuffles the rest even at ``mask_ratio=0``; jaxvit's features are
those of the whole image in order, the encoder as MAE fine-tunes it
(``ViTMAEModel(pixel_values, noise=arange)`` at ``mask_ratio=0``). A
``ViTMAEForPreTraining`` file also holds the pixel decoder, which jaxvit
does not compute: it is refused.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import Checkpoint, Flat, Preprocessing
from jaxvit.families.vit import hf as hf_vit
from jaxvit.model import VisionTransformer
from jaxvit.safety import files
from jaxvit.sizes import to_pair

NAME = "hf_mae"
HAS_SINCOS = False
EXPORT_FORMAT = "hf"
TARGET = "transformers ViTMAEModel"
CARRIES = ("posemb", "activation", "qkv_bias", "layer_norm_eps")
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=0, posemb="sincos2d_mae")
HF_MODEL_TYPES = ("vit_mae",)
# facebook/vit-mae-*'s image processor: the whole image to the size (bicubic), ImageNet statistics.
PREPROCESSING = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0, "bicubic")
RULES = tuple(r for r in hf_vit.RULES if not r.src.startswith(("classifier.", "pooler.")))


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """Folders only (by ``model_type``): a bare ``ViTMAEModel`` state dict is a plain HF ViT's."""
    return False


def read(path: Path, arrays: Flat, config: Mapping[str, Any]) -> Checkpoint:
    """A ``ViTMAEModel`` state dict and its ``config.json`` -> a ``Checkpoint``."""
    decoder = sorted(k for k in arrays if k.startswith("decoder."))
    if decoder:
        raise ValueError(
            f"{path}: ViTMAEForPreTraining's pixel decoder ({decoder[0]}, ...) is not supported: jaxvit"
            " reads MAE's encoder (ViTMAEModel.from_pretrained(...).save_pretrained(...) keeps it alone)"
        )
    # the plain ViT's layout; a pooler or classifier would be left unmatched and refused
    ckpt = hf_vit.read(path, arrays, config)
    return dataclasses.replace(ckpt, origin=NAME, posemb_resample="bicubic", posemb_antialias=False)


def build_model(ckpt: Checkpoint, **overrides: Any) -> tuple[VisionTransformer, tuple[int, int]]:
    """``(model, image_size)`` from the folder's config: the encoder's features (``num_classes=0``)."""
    source = f"{ckpt.path}/config.json"
    config = {**ckpt.config, "architectures": ["ViTModel"]}
    model = hf_vit.model_from_config(config, source=source, **{"num_classes": 0, **overrides})
    return model, to_pair(ckpt.config.get("image_size", 224))


def exports(model: VisionTransformer) -> bool:
    """Whether ``format="hf"`` writes ``model`` as a ``ViTMAEModel``: a ViT backbone without
    classifier (which ``ViTForImageClassification`` cannot be) with a learned or MAE's sin-cos
    position embedding, and no feature of another family's writer."""
    other_family = (
        model.distill_token
        or model.pre_norm
        or model.posemb == "rope"
        or model.layer_scale_init is not None
        or model.num_registers > 0
        or model.mlp_type == "swiglu"
        or (model.pool == "map" and not model.class_token)
        or model.rel_pos_bias != "none"  # BEiT
    )
    return model.num_classes == 0 and model.posemb in ("learn", "sincos2d_mae") and not other_family


def export_config(model: VisionTransformer, size: tuple[int, int]) -> dict[str, Any]:
    """The ``config.json`` of a ``ViTMAEModel`` with ``model``'s encoder at ``size``, masking off."""
    config = hf_vit.export_config(model, size, labels=[])
    for key in ("id2label", "label2id", "encoder_stride"):
        config.pop(key)
    return {**config, "architectures": ["ViTMAEModel"], "model_type": "vit_mae", "mask_ratio": 0.0}


def write(
    flat: Flat, model: VisionTransformer, size: tuple[int, int], path: Path, labels: Sequence[str] | None
) -> Path:
    """jaxvit params (flat, unrolled) -> a ``ViTMAEModel`` folder at ``path``."""
    wanted = dict(num_classes=0, pool="tok", class_token=True, fc_norm=False)
    wrong = {k: getattr(model, k) for k, v in wanted.items() if getattr(model, k) != v}
    if wrong or size[0] != size[1]:
        raise ValueError(
            f"format='hf' writes {TARGET}, a square encoder without head: it needs {wanted} and a square"
            f" image size; the model has {wrong or ''} image size {size}"
        )
    hf_vit.check_posemb(model, TARGET)
    out = layouts.rename_back(layouts.split_attention(flat, model.num_heads, "flat", "heads"), RULES, "hf")
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(export_config(model, size), f, indent=2)
    files.write_safetensors(out, path / "model.safetensors")
    return path
