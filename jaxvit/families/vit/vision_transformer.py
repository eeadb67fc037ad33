"""google-research/vision_transformer (and AugReg) ``.npz`` files.

flax auto-names, numbered in call order within a block; the position
embedding (with a class slot) sits under ``Transformer/posembed_input``. This
is also the layout timm's ``_load_weights`` reads, so ``export(format="npz")``
writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import INCEPTION, Checkpoint, Flat, strip_prefix

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
POSEMBS = ("learn", "sincos2d")
PREPROCESSING = INCEPTION
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
    has_cls = "cls" in arrays
    return layouts.flax_checkpoint(path, NAME, arrays, RULES, num_prefix_tokens=int(has_cls))


def write(flat: Flat, model: Any, size: tuple[int, int], path: Path, labels: Sequence[str] | None) -> Path:
    """jaxvit params (flat, unrolled) -> an ``.npz`` in this layout at ``path``."""
    if model.posemb not in POSEMBS:
        raise ValueError(
            f"format='npz' writes {TARGET}, whose position embedding is a table; the model has"
            f" posemb={model.posemb!r} (expected one of {POSEMBS})"
        )
    out = layouts.rename_back(layouts.split_attention(flat, model.num_heads, "heads", "heads"), RULES, "npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez(str) would append ".npz" to other names
        np.savez(f, **out)
    return path
