"""big_vision's NaFlex ViT ``.npz`` (``models/proj/image_text/naflex_vit.py``: SigLIP 2 NaFlex), the
image tower of a two-tower file (``params/img/``) or a bare one, blocks unrolled or scanned.

Its names are big_vision's ViT's (``families/vit/big_vision.py``) but for two arrays: the patch
embedding ``embedding/kernel`` is a ``Dense`` on flattened ``(p q c)`` patches, ``(p*p*3, D)``,
and the position table ``pos_embedding`` keeps its grid, ``(n, n, D)`` (the model's
``posemb_grid``), resized to each image's grid inside the model. The patch is told from the kernel
with 3 channels, the only images the origin's preprocessing takes (``resize_to_sequence``
asserts them). ``patchln_pre``/``patchln_post`` LayerNorms are not read (refused as unmatched).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints.checkpoint import Checkpoint, Flat, strip_prefix
from jaxvit.families.siglip import hf_naflex
from jaxvit.families.vit import big_vision

NAME = "big_vision_naflex"
PREPROCESSING = hf_naflex.PREPROCESSING
CHANNELS = 3


def _is_naflex(arrays: Mapping[str, np.ndarray]) -> bool:
    kernel, table = arrays.get("embedding/kernel"), arrays.get("pos_embedding")
    return kernel is not None and np.ndim(kernel) == 2 and table is not None and np.ndim(table) == 3


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """An ``.npz`` with big_vision's names, a flat patch kernel and a position table of its own grid."""
    return kind == "npz" and _is_naflex(strip_prefix(arrays, big_vision.PREFIXES)[1])


def read(path: Path, arrays: Flat, metadata: Mapping[str, Any]) -> Checkpoint:
    """A big_vision NaFlex ``.npz``'s arrays -> a ``Checkpoint`` (``posemb_grid`` implied)."""
    _, arrays = strip_prefix(arrays, big_vision.PREFIXES)
    kernel, table = arrays["embedding/kernel"], arrays["pos_embedding"]
    patch = math.isqrt(kernel.shape[0] // CHANNELS)
    if patch * patch * CHANNELS != kernel.shape[0]:
        raise ValueError(
            f"{path}: embedding/kernel has shape {kernel.shape}: {kernel.shape[0]} values are not the"
            f" square patches of {CHANNELS} channels big_vision's NaFlex preprocessing gives"
        )
    if table.shape[0] != table.shape[1] or table.shape[2] != kernel.shape[1]:
        raise ValueError(f"{path}: pos_embedding has shape {table.shape}, expected (n, n, {kernel.shape[1]})")
    arrays = {
        **arrays,
        "embedding/kernel": kernel.reshape(patch, patch, CHANNELS, -1),
        "pos_embedding": table.reshape(1, -1, table.shape[2]),
    }
    ckpt = big_vision.read(path, arrays, metadata)
    return dataclasses.replace(
        ckpt,
        origin=NAME,
        grid=tuple(table.shape[:2]),
        posemb_antialias=True,
        implied_fields={"posemb_grid": int(table.shape[0]), "class_token": False},
    )


def guess_fields(ckpt: Checkpoint) -> dict[str, Any]:
    """What the origin computes and the file cannot say: flax's tanh GELU, LayerNorm epsilon 1e-6."""
    return big_vision.guess_fields(ckpt)
