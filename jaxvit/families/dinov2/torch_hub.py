"""DINOv2's own ``torch.hub`` checkpoints (``dinov2_vits14_pretrain.pth``, ``dinov2_vitb14_reg4_pretrain.pth``, ...).

The state dict of facebookresearch/dinov2's ``DinoVisionTransformer``:
``cls_token``, ``pos_embed`` with a slot for the class token only,
``register_tokens`` (the ``_reg`` models; inserted after the class token,
with no position-embedding slot), ``blocks.{i}`` with LayerScale
(``ls1.gamma``, ``ls2.gamma``) and an MLP that is plain (``mlp.fc1``,
``mlp.fc2``) or, for the giant, a packed SwiGLU (``mlp.w12`` = [gate; value],
hidden ``silu(gate) * value``, then ``mlp.w3``), and the final ``norm``.
Models trained with ``block_chunks`` name their blocks
``blocks.{chunk}.{i}``; ``i`` counts across the chunks, and the chunks are
checked to be the consecutive runs of one size that DINOv2 makes.

``mask_token`` is dropped on purpose: it replaces masked patches in iBOT's
training loss only, and the backbone never reads it otherwise. It is also
what tells these files apart from timm's and transformers' DINOv2 layouts.

The file does not say its number of heads: it is that of DINOv2's published
model of the file's width (S 6, B 12, L 16, g 24); any other width needs
``num_heads=``. The pooled output is the final-normed class token
(``num_classes=0, pool="tok"``). At another image size the position
embedding is resized as the hub models do it: bicubic at a scale factor of
``(new + 0.1) / old`` without antialiasing (``"bicubic_offset"``) for the
models without registers; bicubic to the new size with antialiasing for those
with registers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import IMAGENET_TIMM, Checkpoint, Flat, Preprocessing
from jaxvit.families.dinov2 import SIZES
from jaxvit.sizes import square_grid

NAME = "dinov2"
# DINOv2's evaluation transform: shorter side to 256 (bicubic), center crop 224, ImageNet statistics.
PREPROCESSING = Preprocessing(IMAGENET_TIMM.mean, IMAGENET_TIMM.std, 224 / 256, "bicubic")

RULES = tuple(
    layouts.torch_rules("patch_embed.proj", "patch_embed", "conv")
    + [
        layouts.Rule("cls_token", "cls_token/token"),
        layouts.Rule("register_tokens", "registers/tokens"),
        layouts.Rule("pos_embed", "pos_embed/embedding"),
        layouts.Rule("blocks.{i}.ls1.gamma", "encoder/block_{i}/ls1/scale"),
        layouts.Rule("blocks.{i}.ls2.gamma", "encoder/block_{i}/ls2/scale"),
    ]
    + layouts.TIMM_ENCODER_RULES
    # the giant's SwiGLU: w12 packs gate then value, as jaxvit's SwiGLUMlp fc1 does
    + layouts.torch_rules("blocks.{i}.mlp.w12", "encoder/block_{i}/mlp/fc1", "linear")
    + layouts.torch_rules("blocks.{i}.mlp.w3", "encoder/block_{i}/mlp/fc2", "linear")
)
# width -> heads of DINOv2's published models
HEADS_OF_WIDTH = {sizes["width"]: sizes["num_heads"] for sizes in SIZES.values()}
_CHUNKED = re.compile(r"blocks\.(\d+)\.(\d+)\.(.+)")


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A state dict with DINOv2's top-level ``mask_token`` beside a ``pos_embed`` table.

    timm's and transformers' DINOv2 layouts have no top-level mask token;
    DINOv3's own files have one but no position table.
    """
    return kind == "state_dict" and "mask_token" in arrays and "pos_embed" in arrays


def unchunk_blocks(arrays: Mapping[str, np.ndarray], path: Path | str) -> Flat:
    """``blocks.{chunk}.{i}.*`` (DINOv2's ``block_chunks``) -> ``blocks.{i}.*``; other keys as they are.

    DINOv2 puts block ``i`` into chunk ``i // size`` for one chunk size; a file
    whose chunks are not such runs, or that mixes chunked and plain block
    keys, is refused.
    """
    chunk_of: dict[int, int] = {}
    out: Flat = {}
    for key, value in arrays.items():
        match = _CHUNKED.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        chunk, index = int(match.group(1)), int(match.group(2))
        if chunk_of.setdefault(index, chunk) != chunk:
            raise ValueError(f"{path}: block {index} is in chunks {chunk_of[index]} and {chunk} ({key})")
        out[f"blocks.{index}.{match.group(3)}"] = value
    if not chunk_of:
        return out
    plain = sorted(k for k in arrays if k.startswith("blocks.") and not _CHUNKED.fullmatch(k))
    if plain:
        raise ValueError(f"{path} names its blocks both chunked (blocks.C.I.*) and not ({plain[0]})")
    size = sum(1 for chunk in chunk_of.values() if chunk == 0)
    stray = sorted(i for i, chunk in chunk_of.items() if size == 0 or i // size != chunk)
    if stray:
        raise ValueError(
            f"{path}: its block chunks are not DINOv2's consecutive runs of {size} blocks"
            f" (block {stray[0]} is in chunk {chunk_of[stray[0]]})"
        )
    return out


def read(path: Path, arrays: Flat, metadata: Mapping[str, Any]) -> Checkpoint:
    """A DINOv2 hub state dict -> a ``Checkpoint`` in jaxvit's names (``mask_token`` dropped)."""
    arrays = {k: v for k, v in unchunk_blocks(arrays, path).items() if k != "mask_token"}
    params, unmatched = layouts.rename(arrays, RULES)
    posemb = params.get("pos_embed/embedding")
    if "patch_embed/kernel" not in params or posemb is None or posemb.ndim != 3:
        raise ValueError(
            f"{path} has a DINOv2 mask token but no patch embedding or no (1, 1 + M*M, D) position table:"
            f" not a DINOv2 backbone. Its first keys: {sorted(arrays)[:5]}"
        )
    registers = "registers/tokens" in params
    # the heads of DINOv2's published model of this width; another width cannot say them
    width = int(params["patch_embed/kernel"].shape[-1])
    unknown = (
        f"width {width} is none of DINOv2's published models' ({sorted(HEADS_OF_WIDTH)}), so its number"
        " of attention heads is unknown"
    )
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=1,
        # DINOv2 resizes unless the grid is its own square one, also for a same-length other grid
        grid=square_grid(posemb.shape[1] - 1),
        posemb_resample="bicubic" if registers else "bicubic_offset",
        posemb_antialias=registers,
        num_heads=HEADS_OF_WIDTH.get(width),
        unstated={} if width in HEADS_OF_WIDTH else {"num_heads": unknown},
    )


def guess_fields(ckpt: Checkpoint) -> dict[str, Any]:
    """DINOv2's own settings: LayerNorm epsilon 1e-6, exact GELU (the giant's SwiGLU is told from
    its shapes), the class token pooled."""
    return dict(layer_norm_eps=1e-6, activation="gelu", num_classes=0, pool="tok")
