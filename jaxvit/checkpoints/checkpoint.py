"""What every checkpoint format reads into: a ``Checkpoint`` in jaxvit's names.

Also the small facts shared by the formats: how images are prepared for a
checkpoint's origin (``Preprocessing``), and what the keys say of the
architecture (depth, grid).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxvit.sizes import to_pair

log = logging.getLogger("jaxvit.checkpoints.pretrained")

Flat = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How the origin of a checkpoint prepared its images.

    Images are scaled to [0, 1], then normalised with ``mean``/``std`` per
    channel. ``crop_pct`` < 1: resize the shorter side to ``size / crop_pct``
    and center-crop (timm); 1.0: resize the whole image to the model's size,
    unless ``center_crop`` (CLIP: shorter side to the size, then center-crop).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    center_crop: bool = False


# VT/AugReg, big_vision and HF ViT resize the whole image and map [0, 1] to [-1, 1].
INCEPTION = Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# timm's ViT defaults: ImageNet statistics, shorter side to size / 0.875, center crop.
IMAGENET_TIMM = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, "bicubic")
# OpenAI CLIP's statistics, as transformers' and timm's CLIP image processors use them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' CLIPImageProcessor: shorter side to the size (bicubic), center crop.
CLIP_HF = Preprocessing(CLIP_MEAN, CLIP_STD, 1.0, "bicubic", center_crop=True)
# transformers' SiglipImageProcessor: the whole image to the size, bicubic, to [-1, 1].
SIGLIP_HF = Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bicubic")


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint in jaxvit's names, before it is fitted to a model.

    ``params``: flat ``/``-joined keys, unrolled blocks, attention still in
    the checkpoint's split (see ``layouts.fuse_attention``). ``unmatched``:
    checkpoint keys with no jaxvit counterpart, under their own names.
    ``num_prefix_tokens``: slots in front of the grid in the checkpoint's
    position embedding (0 for big_vision, which adds it before the class
    token goes in front). ``grid``, ``num_heads``: when the checkpoint says
    them. ``config``: Hugging Face ``config.json`` or the metadata ``export``
    wrote. ``posemb_resample`` / ``posemb_antialias``: how the checkpoint's
    own code resizes its position embedding for another image size (see
    ``jaxvit.resample_posemb``), so that features at a new size equal the
    peer's there. ``implied_fields``: model fields the format implies but
    the shapes cannot tell (e.g. a rotary position embedding and its
    LayerNorm epsilon), used when the model is told from the shapes.
    ``grid_ambiguity``: why the file cannot tell its grid (a bare timm state
    dict whose position embedding reads two ways), raised unless the caller
    states ``checkpoint_grid``; ``""`` when the grid is known.
    ``unstated``: model fields the file cannot tell and no default settles
    (field -> why), which the caller must pass when the model is told from
    the checkpoint.
    """

    path: str
    origin: str
    params: Flat
    unmatched: Flat
    num_prefix_tokens: int = 1
    grid: tuple[int, int] | None = None
    num_heads: int | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    posemb_resample: str = "bilinear"
    posemb_antialias: bool = False
    # how its relative position tables are resized (BEiT): see jaxvit.layers.resample_rel_pos_bias
    rel_pos_resample: str = "bilinear"
    implied_fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid_ambiguity: str = ""
    unstated: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def posemb_prefix(self) -> int:
        """Deprecated name of ``num_prefix_tokens`` (until jaxvit 0.3)."""
        warnings.warn(
            "Checkpoint.posemb_prefix is deprecated: use num_prefix_tokens", DeprecationWarning, stacklevel=2
        )
        return self.num_prefix_tokens


def strip_prefix(arrays: Mapping[str, np.ndarray], prefixes: Sequence[str]) -> tuple[str, Flat]:
    """The first of ``prefixes`` that some key starts with, and the keys under it without it."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in arrays):
            kept = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            if len(kept) < len(arrays):
                log.info("ignoring %d entries outside %r", len(arrays) - len(kept), prefix)
            return prefix, kept
    return "", dict(arrays)


_BLOCK_INDEX = re.compile(r"encoder/block_(\d+)/")


def depth_of(params: Mapping[str, Any]) -> int:
    """The number of encoder blocks named in jaxvit keys (``encoder/block_{i}/...``)."""
    indices = {int(m.group(1)) for k in params if (m := _BLOCK_INDEX.match(k))}
    return max(indices) + 1 if indices else 0


def block_indices(params: Mapping[str, Any]) -> set[int]:
    """The encoder block indices named in jaxvit keys."""
    return {int(m.group(1)) for k in params if (m := _BLOCK_INDEX.match(k))}


def grid_from_config(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """The patch grid a config's ``image_size`` and ``patch_size`` give, if it has both."""
    if "image_size" not in config or "patch_size" not in config:
        return None
    (h, w), (p, q) = to_pair(config["image_size"]), to_pair(config["patch_size"])
    return (h // p, w // q)
