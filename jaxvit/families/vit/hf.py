"""Hugging Face ViT: ``ViTModel`` / ``ViTForImageClassification`` folders and state dicts.

A folder is ``config.json`` plus ``model.safetensors`` (or shards named in
``model.safetensors.index.json``, or ``pytorch_model.bin``); the config says
the architecture, so the model is built from it (``model_from_config``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import INCEPTION, Checkpoint, Flat, grid_from_config
from jaxvit.model import VisionTransformer, create_model
from jaxvit.safety import files, validate
from jaxvit.sizes import to_pair

NAME = "hf"
# transformers' state dicts that no family of transformers claims
CLAIMS = "family"
HF_MODEL_TYPES = ("vit",)
MODEL_TYPES = ("vit",)
HAS_SINCOS = False
EXPORT_FORMAT = "hf"
TARGET = "transformers ViTForImageClassification"
# config.json says these (posemb: a learned table, or the fixed sin-cos one written as such).
CARRIES = ("posemb", "activation", "qkv_bias", "layer_norm_eps")
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=5)
# The position embeddings transformers' ViT-like models can take: a table (the sin-cos one written).
POSEMBS = ("learn", "sincos2d", "sincos2d_mae")
PREPROCESSING = INCEPTION
# Hugging Face ViT, without the "vit." prefix. The first block names are those of the
# google/vit-* checkpoints (and what export writes); the second those that
# transformers 5 writes, which it also reads the first ones as.
# a block's names under encoder.layer.{i} (the Hub's) and under layers.{i} (transformers 5's)
HUB_BLOCK = {
    "norm1": "layernorm_before",
    "attn/query": "attention.attention.query",
    "attn/key": "attention.attention.key",
    "attn/value": "attention.attention.value",
    "attn/out": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp/fc1": "intermediate.dense",
    "mlp/fc2": "output.dense",
}
NEW_BLOCK = {
    "norm1": "layernorm_before",
    "attn/query": "attention.q_proj",
    "attn/key": "attention.k_proj",
    "attn/value": "attention.v_proj",
    "attn/out": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
RULES = tuple(
    layouts.torch_rules("embeddings.patch_embeddings.projection", "patch_embed", "conv")
    + [
        layouts.Rule("embeddings.cls_token", "cls_token/token"),
        layouts.Rule("embeddings.position_embeddings", "pos_embed/embedding"),
    ]
    + layouts.torch_block_rules("encoder.layer.{i}", HUB_BLOCK)
    + layouts.torch_block_rules("layers.{i}", NEW_BLOCK)
    + layouts.torch_rules("layernorm", "encoder/norm", "ln")
    + layouts.torch_rules("pooler.dense", "head/pre_logits", "linear")
    + layouts.torch_rules("classifier", "head/classifier", "linear")
)


# transformers' hidden_act -> jaxvit's activation
HIDDEN_ACT = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}
# jaxvit's activation -> the hidden_act an export writes
HIDDEN_ACT_OF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}


def _is_state_dict(keys: Sequence[str]) -> bool:
    return any(
        k.startswith(("vit.", "embeddings.patch_embeddings", "encoder.layer.", "layers.")) for k in keys
    )


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A state dict with Hugging Face ViT names (folders go by their ``model_type``)."""
    return kind == "state_dict" and _is_state_dict(list(arrays))


def read(path: Path, arrays: Flat, config: Mapping[str, Any]) -> Checkpoint:
    """A Hugging Face ViT state dict (and its ``config.json``, if any) -> a ``Checkpoint``."""
    stripped = {(k[4:] if k.startswith("vit.") else k): v for k, v in arrays.items()}
    params, unmatched = layouts.rename(stripped, RULES)
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=1,
        num_heads=config.get("num_attention_heads"),
        grid=grid_from_config(config),
        config=dict(config),
    )


def model_from_config(
    config: Mapping[str, Any], *, source: str = "config.json", **overrides: Any
) -> VisionTransformer:
    """A Hugging Face ViT ``config.json`` dict -> the matching ``VisionTransformer``.

    ``ViTForImageClassification`` gets ``num_classes=len(id2label)``; other
    architectures (``ViTModel``) give features (``num_classes=0``).
    """
    config = validate.hf_config(config, source)
    act = config.get("hidden_act", "gelu")
    if act not in HIDDEN_ACT:
        raise ValueError(
            f"{source}: hidden_act={act!r} is not supported: expected one of {sorted(HIDDEN_ACT)}"
        )
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
        activation=HIDDEN_ACT[act],
        qkv_bias=bool(config.get("qkv_bias", True)),
        class_token=True,
        pool="tok",
        posemb="learn",
    )
    fields.update(overrides)
    return create_model(None, **fields)


def build_model(ckpt: Checkpoint, **overrides: Any) -> tuple[VisionTransformer, tuple[int, int]] | None:
    """``(model, image_size)`` from the folder's config; None for a bare state dict."""
    if not ckpt.config:
        return None
    model = model_from_config(ckpt.config, source=f"{ckpt.path}/config.json", **overrides)
    return model, to_pair(ckpt.config.get("image_size", 224))


def labels(ckpt: Checkpoint) -> tuple[str, ...] | None:
    """The class names of ``id2label``, unless they are transformers' placeholders ``LABEL_i``."""
    id2label = ckpt.config.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return tuple(names)


def check_posemb(model: VisionTransformer, target: str) -> None:
    """Raises ``ValueError`` unless ``model``'s position embedding is a table ``target`` holds."""
    if model.posemb not in POSEMBS:
        raise ValueError(
            f"format='hf' writes {target}, whose position embedding is a table; the model has"
            f" posemb={model.posemb!r} (expected one of {POSEMBS})"
        )


def export_config(model: VisionTransformer, size: tuple[int, int], labels: Sequence[str] | None) -> dict:
    """The ``config.json`` of a Hugging Face ViT with ``model``'s architecture at ``size``."""
    names = list(labels) if labels else [f"LABEL_{i}" for i in range(model.num_classes)]
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": model.width,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "intermediate_size": model.mlp_dim or 4 * model.width,
        "hidden_act": HIDDEN_ACT_OF[model.config.activation],
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": model.layer_norm_eps,
        "image_size": size[0] if size[0] == size[1] else list(size),
        "patch_size": model.patch_size,
        "num_channels": model.num_channels,
        "qkv_bias": model.qkv_bias,
        "encoder_stride": to_pair(model.patch_size)[0],
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }


def write(
    flat: Flat, model: VisionTransformer, size: tuple[int, int], path: Path, labels: Sequence[str] | None
) -> Path:
    """jaxvit params (flat, unrolled) -> a ``ViTForImageClassification`` folder at ``path``."""
    if model.pool != "tok" or not model.class_token or not model.num_classes:
        raise ValueError(
            "format='hf' writes ViTForImageClassification, which needs pool='tok', class_token=True and"
            f" num_classes > 0; the model has pool={model.pool!r}, class_token={model.class_token},"
            f" num_classes={model.num_classes}"
        )
    if labels is not None and len(labels) != model.num_classes:
        raise ValueError(f"{len(labels)} labels for a model with num_classes={model.num_classes}")
    check_posemb(model, TARGET)
    out = layouts.rename_back(layouts.split_attention(flat, model.num_heads, "flat", "heads"), RULES, "hf")
    out = {(k if k.startswith("classifier.") else f"vit.{k}"): v for k, v in out.items()}
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(export_config(model, size, labels), f, indent=2)
    files.write_safetensors(out, path / "model.safetensors")
    return path
