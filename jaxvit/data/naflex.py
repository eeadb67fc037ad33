"""NaFlex inputs: images at their own aspect ratio, resized to a patch budget, as padded patch sequences.

An image of ``H x W`` is resized to the largest size whose sides are
multiples of the patch and whose patch grid ``h x w`` holds at most
``max_patches`` patches, keeping its aspect ratio as nearly as the multiples
allow (``size_for_budget``: big_vision's ``resize_to_sequence`` and
transformers' ``Siglip2ImageProcessor`` search the same scale). Its patches,
in ``(h w)`` order and each flattened ``(p q c)`` (``jaxvit.patchify``), are
padded to ``max_patches`` rows; the grid and a mask of the real rows go with
them. ``VisionTransformer`` takes the three as ``model.apply(v, patches,
grids=grids, mask=mask)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from jaxvit.data.augment import normalize
from jaxvit.data.preprocess import _RESAMPLE, load_image


def size_for_budget(
    height: int, width: int, patch_size: int, max_patches: int, eps: float = 1e-5
) -> tuple[int, int]:
    """``(H', W')``, multiples of ``patch_size``, for an ``height x width`` image: the largest scale
    found by bisection (to ``eps``) whose patch grid holds at most ``max_patches``; each side at
    least one patch."""
    if min(height, width, patch_size, max_patches) < 1:
        raise ValueError(
            f"size_for_budget needs positive sizes, got image {height}x{width}, patch {patch_size},"
            f" max_patches {max_patches}"
        )

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        if (side(scale, height) // patch_size) * (side(scale, width) // patch_size) <= max_patches:
            low = scale
        else:
            high = scale
    return side(low, height), side(low, width)


def patch_sequence(
    pixels: np.ndarray, patch_size: int, max_patches: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(H, W, C)`` pixels (sides multiples of ``patch_size``) -> ``patches`` ``(max_patches,
    p*p*C)`` float32 (the ``h * w`` patches then zeros), ``grid`` ``(2,)`` int32 and ``mask``
    ``(max_patches,)`` bool."""
    height, width, channels = pixels.shape
    h, w = height // patch_size, width // patch_size
    if h * patch_size != height or w * patch_size != width or h * w > max_patches:
        raise ValueError(
            f"an image of {height}x{width} is not a grid of {patch_size}-pixel patches within"
            f" {max_patches} patches"
        )
    rows = pixels.reshape(h, patch_size, w, patch_size, channels).transpose(0, 2, 1, 3, 4)
    patches = np.zeros((max_patches, patch_size * patch_size * channels), np.float32)
    patches[: h * w] = rows.reshape(h * w, -1)
    mask = np.arange(max_patches) < h * w
    return patches, np.asarray([h, w], np.int32), mask


def prepare(
    image: Image.Image,
    patch_size: int,
    max_patches: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    interpolation: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A PIL image -> ``(patches, grid, mask)`` of ``patch_sequence``: resized to ``size_for_budget``
    (``interpolation``, PIL's), scaled to [0, 1] and normalised by ``mean``/``std``, as
    ``Siglip2ImageProcessor`` prepares it (its defaults are these)."""
    if interpolation not in _RESAMPLE:
        raise ValueError(f"unknown interpolation {interpolation!r}: expected one of {sorted(_RESAMPLE)}")
    height, width = size_for_budget(image.height, image.width, patch_size, max_patches)
    pixels = np.asarray(image.resize((width, height), _RESAMPLE[interpolation]))
    pixels = normalize(pixels.reshape(height, width, -1), mean, std)
    return patch_sequence(pixels, patch_size, max_patches)


def stack(examples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """``prepare``'s outputs -> ``{"patches": (N, L, F), "grids": (N, 2), "mask": (N, L)}``."""
    if not examples:
        raise ValueError("stack needs at least one example")
    patches, grids, masks = zip(*examples, strict=True)
    return {"patches": np.stack(patches), "grids": np.stack(grids), "mask": np.stack(masks)}


def budget_of(model: Any, max_patches: int | None) -> int:
    """The patch budget for ``model``: ``max_patches``, else its table's (``posemb_grid``) patch count;
    ``ValueError`` for a model that does not take patch sequences (no ``posemb_grid``)."""
    if not getattr(model, "posemb_grid", None):
        raise ValueError(
            "max_patches is for NaFlex models (posemb_grid: a position table resized to each image's"
            " grid); this one takes images of one size"
        )
    if max_patches is None:
        h, w = (
            (model.posemb_grid, model.posemb_grid)
            if isinstance(model.posemb_grid, int)
            else model.posemb_grid
        )
        return h * w
    if max_patches < 1:
        raise ValueError(f"max_patches must be positive, got {max_patches}")
    return max_patches


def prepare_files(paths: Sequence[str | os.PathLike], bundle: Any, max_patches: int) -> dict[str, np.ndarray]:
    """Image files -> ``stack``'s batch at ``max_patches``, prepared as ``bundle`` (an
    ``InferenceBundle``) asks: its mean, std and interpolation."""
    patch = bundle.model.patch_size
    if not isinstance(patch, int):
        raise ValueError(f"NaFlex patch sequences take square patches, the model's are {patch}")
    examples = []
    for path in paths:
        try:
            examples.append(
                prepare(load_image(path), patch, max_patches, bundle.mean, bundle.std, bundle.interpolation)
            )
        except ValueError as e:
            raise ValueError(f"image {path}: {e}") from None
    return stack(examples)
