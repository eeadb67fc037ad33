"""google-research/vision_transformer (and AugReg) ``.npz`` files.

flax auto-names, numbered in call order within a block; the position
embedding (with a class slot) sits under ``Transformer/posembed_input``. This
is also the layout timm's ``_load_weights`` reads, so ``export(format="npz")``
writes it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit import schema
from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import INCEPTION, Checkpoint, Flat, strip_prefix
from jaxvit.families.vit.timm import saved_config

NAME = "vt"
# any .npz that big_vision's format does not claim
CLAIMS = "fallback"
# timm's _load_weights needs a position table: a fixed sin-cos embedding is written as one
HAS_SINCOS = False
EXPORT_FORMAT = "npz"
TARGET = "the vision_transformer .npz layout (timm's _load_weights)"
# The file holds weights only: who loads it builds the model, and timm's VisionTransformer
# takes the activation (act_layer), the LayerNorm epsilon (norm_layer), SwiGLU
# (mlp_layer=SwiGLUPacked), the pooling and the class token. Its loader needs the patch,
# qkv and position-table weights, loads the head only with its bias, and reads no
# norm_pre, LayerScale, registers nor distillation token. pre_logits is the layout's own
# (the original ViT-B/16 ImageNet-21k files have it); timm's loader leaves it out.
CARRIES = ("posemb", "class_token", "pool", "representation_size", "activation", "layer_norm_eps", "mlp_type")
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=5)
POSEMBS = ("learn", "sincos2d", "sincos2d_mae")
POOLS = ("tok", "gap", "map")
PREPROCESSING = INCEPTION
# jaxvit's own exports: the model fields as the UTF-8 bytes of a JSON object
SAVED_KEY = "jaxvit_model"
RULES = layouts.flax_vit_rules(
    "Transformer/posembed_input/pos_embedding",
    dict(norm1="LayerNorm_0", attn="MultiHeadDotProductAttention_1", norm2="LayerNorm_2", mlp="MlpBlock_3"),
)


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """Any ``.npz`` (``CLAIMS = "fallback"``: asked after big_vision's format)."""
    return kind == "npz"


def read(path: Path, arrays: Flat, metadata: Mapping[str, Any]) -> Checkpoint:
    """A vision_transformer ``.npz``'s arrays -> a ``Checkpoint`` in jaxvit's names."""
    _, arrays = strip_prefix(arrays, ("opt/target/",))
    saved = arrays.pop(SAVED_KEY, None)
    has_cls = "cls" in arrays
    ckpt = layouts.flax_checkpoint(path, NAME, arrays, RULES, num_prefix_tokens=int(has_cls))
    if saved is None:
        return ckpt
    if saved.dtype != np.uint8 or saved.ndim != 1:
        raise ValueError(f"{path}: {SAVED_KEY} must be the UTF-8 bytes of a JSON object (uint8, 1-D)")
    try:
        text = saved.tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {SAVED_KEY} is not UTF-8 ({e})") from None
    config = saved_config(path, {"jaxvit_model": text})
    return dataclasses.replace(
        ckpt, config=config, num_heads=config["model"].get("num_heads", ckpt.num_heads)
    )


def guess_fields(ckpt: Checkpoint) -> dict[str, Any]:
    """What the origin computed and the file cannot say: flax's ``nn.gelu``, the tanh form (timm and
    transformers compute exact GELU for these weights; jaxvit follows the code that trained them)."""
    return dict(activation="gelu_tanh")


def write(flat: Flat, model: Any, size: tuple[int, int], path: Path, labels: Sequence[str] | None) -> Path:
    """jaxvit params (flat, unrolled) -> an ``.npz`` in this layout at ``path``."""
    if model.posemb not in POSEMBS:
        raise ValueError(
            f"format='npz' writes {TARGET}, whose position embedding is a table; the model has"
            f" posemb={model.posemb!r} (expected one of {POSEMBS})"
        )
    if model.pool not in POOLS:
        raise ValueError(
            f"format='npz' writes {TARGET}, whose loader pools {POOLS}; the model has pool={model.pool!r}"
        )
    out = layouts.rename_back(layouts.split_attention(flat, model.num_heads, "heads", "heads"), RULES, "npz")
    # The layout holds weights only; the model fields ride along as bytes, which peers' loaders skip.
    saved = {"model": schema.json_fields(model), "image_size": list(size), "labels": list(labels or [])}
    out[SAVED_KEY] = np.frombuffer(json.dumps(saved).encode("utf-8"), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez(str) would append ".npz" to other names
        np.savez(f, **out)
    return path
