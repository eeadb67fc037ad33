"""Hugging Face DeiT: ``DeiTForImageClassificationWithTeacher`` and ``DeiTModel`` folders and state dicts.

The key layout is Hugging Face ViT's under ``deit.``, plus the distillation
token and two classifiers (``cls_classifier``, ``distillation_classifier``)
whose logits are averaged at inference. Every transformers DeiT has the
distillation token, so every one becomes a jaxvit model with
``distill_token=True``. The position embedding is resized as transformers'
``interpolate_pos_encoding`` does it (bicubic, no antialiasing).

``DeiTModel``'s pooler (``tanh(dense(cls))``) has no jaxvit counterpart
with a distillation token: a file with one is refused. jaxvit's features of
the backbone are the mean of the class and distillation tokens, as timm's
distilled models give them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import IMAGENET_TIMM, Checkpoint, Flat, grid_from_config
from jaxvit.families.vit import hf as hf_vit
from jaxvit.model import VisionTransformer
from jaxvit.safety import files
from jaxvit.sizes import to_pair

NAME = "hf_deit"
HAS_SINCOS = False
EXPORT_FORMAT = "hf"
TARGET = "transformers DeiTForImageClassificationWithTeacher / DeiTModel"
CARRIES = ("posemb", "activation", "qkv_bias", "layer_norm_eps", "distill_token")
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=5, distill_token=True)
HF_MODEL_TYPES = ("deit",)
# The DeiT image processor: shorter side to 256, center crop 224, bicubic, ImageNet statistics.
PREPROCESSING = IMAGENET_TIMM
RULES = tuple(
    [
        layouts.Rule("embeddings.distillation_token", "dist_token/token"),
        *layouts.torch_rules("cls_classifier", "head/classifier", "linear"),
        *layouts.torch_rules("distillation_classifier", "head/dist_classifier", "linear"),
    ]
    + [r for r in hf_vit.RULES if not r.src.startswith(("classifier.", "pooler."))]
)
SUPPORTED_ARCHITECTURES = ("DeiTForImageClassificationWithTeacher", "DeiTModel")


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A state dict with DeiT's distillation token."""
    return kind == "state_dict" and any(k.endswith("embeddings.distillation_token") for k in arrays)


def read(path: Path, arrays: Flat, config: Mapping[str, Any]) -> Checkpoint:
    """A DeiT state dict (and its ``config.json``, if any) -> a ``Checkpoint``."""
    if config and config.get("model_type") not in HF_MODEL_TYPES:
        raise ValueError(f"{path}: config.json has model_type={config.get('model_type')!r}, expected 'deit'")
    unsupported = set(config.get("architectures") or []) - set(SUPPORTED_ARCHITECTURES)
    if unsupported or any(k.startswith("classifier.") for k in arrays):
        raise ValueError(
            f"{path}: DeiTForImageClassification (one classifier on the class token of a model with a"
            f" distillation token) is not supported; supported DeiT architectures: {SUPPORTED_ARCHITECTURES}"
        )
    stripped = {(k[5:] if k.startswith("deit.") else k): v for k, v in arrays.items()}
    if any(k.startswith("pooler.") for k in stripped):
        raise ValueError(
            f"{path}: DeiTModel's pooler (tanh(dense) of the class token alone) is not supported: jaxvit's"
            " DeiT features pool the class and distillation tokens (DeiTModel(config, add_pooling_layer=False)"
            " saves the model without it)"
        )
    params, unmatched = layouts.rename(stripped, RULES)
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=2,
        num_heads=config.get("num_attention_heads"),
        grid=grid_from_config(config),
        config=dict(config),
        posemb_resample="bicubic",
        posemb_antialias=False,
    )


def model_from_config(config: Mapping[str, Any], **overrides: Any) -> VisionTransformer:
    """A DeiT ``config.json`` dict -> the matching ``VisionTransformer`` (with the distillation token)."""
    teacher = "DeiTForImageClassificationWithTeacher" in (config.get("architectures") or [])
    num_labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    fields: dict[str, Any] = dict(num_classes=num_labels if teacher else 0, distill_token=True)
    fields.update(overrides)
    return hf_vit.model_from_config({**config, "architectures": ["ViTModel"]}, **fields)


def build_model(ckpt: Checkpoint, **overrides: Any) -> tuple[VisionTransformer, tuple[int, int]] | None:
    """``(model, image_size)`` from the folder's config; None for a bare state dict."""
    if not ckpt.config:
        return None
    return model_from_config(ckpt.config, **overrides), to_pair(ckpt.config.get("image_size", 224))


labels = hf_vit.labels


def exports(model: VisionTransformer) -> bool:
    """Whether ``format="hf"`` writes ``model`` as a DeiT: a distillation token (and neither CLIP's
    norm before the blocks nor DINOv3's rotary embedding)."""
    return model.distill_token and not model.pre_norm and model.posemb != "rope"


def write(
    flat: Flat, model: VisionTransformer, size: tuple[int, int], path: Path, labels: Sequence[str] | None
) -> Path:
    """jaxvit params (flat, unrolled) -> a ``DeiTForImageClassificationWithTeacher`` (or ``DeiTModel``) folder."""
    if model.layer_scale_init is not None or model.num_registers or model.mlp_type != "mlp":
        raise ValueError(
            "format='hf' writes DeiT, which has no LayerScale, registers or SwiGLU; the model has"
            f" layer_scale_init={model.layer_scale_init}, num_registers={model.num_registers},"
            f" mlp_type={model.mlp_type!r}"
        )
    if size[0] != size[1]:
        raise ValueError(f"transformers' DeiT interpolates from a square grid; the image size is {size}")
    hf_vit.check_posemb(model, TARGET)
    if labels is not None and len(labels) != model.num_classes:
        raise ValueError(f"{len(labels)} labels for a model with num_classes={model.num_classes}")
    out = layouts.rename_back(layouts.split_attention(flat, model.num_heads, "flat", "heads"), RULES, "hf")
    out = {(k if "classifier." in k else f"deit.{k}"): v for k, v in out.items()}
    config = hf_vit.export_config(model, size, labels)
    config.pop("encoder_stride", None)
    config.update(
        model_type="deit",
        architectures=["DeiTForImageClassificationWithTeacher" if model.num_classes else "DeiTModel"],
    )
    if not model.num_classes:
        config.pop("id2label"), config.pop("label2id")
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    files.write_safetensors(out, path / "model.safetensors")
    return path
