"""big_vision ``.npz`` files: ViTs (also scanned) and the image tower of two-tower models.

The position embedding sits at the top level and is added before the class
token goes in front (so it has no class slot), and a block's children number
from 0. Scanned checkpoints stack the blocks under ``Transformer/encoderblock``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import INCEPTION, Checkpoint, Flat, strip_prefix

NAME = "big_vision"
PREPROCESSING = INCEPTION
RULES = layouts.flax_vit_rules(
    "pos_embedding",
    dict(norm1="LayerNorm_0", attn="MultiHeadDotProductAttention_0", norm2="LayerNorm_1", mlp="MlpBlock_0"),
)
# Optimizer state wraps the params in opt/target/; two-tower models keep the image tower in params/img/.
PREFIXES = ("opt/target/", "params/img/", "params/")
_SCANNED = "Transformer/encoderblock"


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether an ``.npz`` has big_vision's names (rather than vision_transformer's)."""
    if kind != "npz":
        return False
    prefix, arrays = strip_prefix(arrays, PREFIXES)
    if np.ndim(arrays.get("embedding/kernel")) == 2:
        return False  # a flat patch kernel: NaFlex's (families/siglip/big_vision_naflex.py)
    return (
        prefix.startswith("params/")
        or any(k.startswith(_SCANNED + "/") for k in arrays)
        or "pos_embedding" in arrays
        or any("/MultiHeadDotProductAttention_0/" in k for k in arrays if k.startswith("Transformer/"))
    )


def read(path: Path, arrays: Flat, metadata: Mapping[str, Any]) -> Checkpoint:
    """A big_vision ``.npz``'s arrays -> a ``Checkpoint`` in jaxvit's names."""
    _, arrays = strip_prefix(arrays, PREFIXES)
    if any(k.startswith(_SCANNED + "/") for k in arrays):
        try:
            arrays = layouts.unstack_scanned(arrays, _SCANNED, _SCANNED + "_{i}")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return layouts.flax_checkpoint(path, NAME, arrays, RULES, num_prefix_tokens=0)


def guess_fields(ckpt: Checkpoint) -> dict[str, Any]:
    """What big_vision computed and the file cannot say: flax's ``nn.gelu``, the tanh form (timm and
    transformers compute exact GELU for these weights; jaxvit follows the code that trained them)."""
    return dict(activation="gelu_tanh")
