"""Images for inference: load, resize (and center-crop), normalise.

``load_image`` is the only function that touches files; the rest are pure
functions of PIL images and arrays. Two resizing modes cover the origins
(see ``jaxvit.checkpoints.inference.PREPROCESSING``):

- ``crop_pct=1.0`` (VT/AugReg, big_vision, Hugging Face ViT, jaxvit
  workdirs): resize the whole image to ``(h, w)``, ignoring its aspect ratio.
- ``crop_pct<1`` (timm), or ``center_crop=True`` (CLIP): resize so the image
  covers ``(h, w) / crop_pct`` keeping its aspect ratio (the shorter side for
  a square target), then take the center ``(h, w)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxvit.data.augment import normalize, to_8bit
from jaxvit.safety import validate

# What predict and visualize pick from a folder; an ImageFolder tells images by content instead.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB PIL image from ``path``; grayscale, palette and RGBA images are converted.

    Raises ``ValueError`` naming the file when it is not a readable image.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with validate.open_regular(path, "image") as f, Image.open(f) as image:
            # The header's size is checked before a pixel is decoded.
            validate.check_image_pixels(*image.size, f"image {path}")
            image.load()  # decode now, so a truncated file fails here
            return to_8bit(image).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if str(path) in str(e):
            raise ValueError(str(e)) from None
        raise ValueError(f"cannot read image {path}: {e}") from None


def resize_and_crop(
    image: Image.Image,
    size: tuple[int, int],
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    center_crop: bool = False,
) -> Image.Image:
    """``image`` -> an image of ``size`` ``(h, w)``; see the module docstring for ``crop_pct``."""
    if interpolation not in _RESAMPLE:
        raise ValueError(f"unknown interpolation {interpolation!r}: expected one of {sorted(_RESAMPLE)}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = size
    resample = _RESAMPLE[interpolation]
    if crop_pct == 1.0 and not center_crop:
        return image.resize((w, h), resample)
    # The smallest scale at which the image covers (h, w) / crop_pct.
    scale = max(h / crop_pct / image.height, w / crop_pct / image.width)
    new_w, new_h = max(w, round(image.width * scale)), max(h, round(image.height * scale))
    # A very thin image would grow its long side to millions of pixels here.
    validate.check_image_pixels(
        new_w, new_h, f"resizing a {image.width}x{image.height} image to cover {w}x{h}"
    )
    image = image.resize((new_w, new_h), resample)
    left, top = (new_w - w) // 2, (new_h - h) // 2
    return image.crop((left, top, left + w, top + h))


def preprocess(
    image: Image.Image,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    channels: int = 3,
    center_crop: bool = False,
) -> np.ndarray:
    """An RGB PIL image -> ``(h, w, 3)`` float32 (``(h, w, 1)`` for ``channels=1``), ready for the model."""
    if channels == 1:
        image = image.convert("L")
    pixels = np.asarray(resize_and_crop(image, size, crop_pct, interpolation, center_crop))
    return normalize(pixels.reshape(*pixels.shape[:2], -1), mean, std)


def preprocess_files(paths: Sequence[str | os.PathLike], bundle) -> np.ndarray:
    """Image files -> ``(N, h, w, C)`` float32, prepared as ``bundle`` (an ``InferenceBundle``) asks."""
    images = []
    for p in paths:
        image = load_image(p)
        try:
            images.append(
                preprocess(
                    image,
                    bundle.image_size,
                    bundle.mean,
                    bundle.std,
                    bundle.crop_pct,
                    bundle.interpolation,
                    bundle.model.num_channels,
                    getattr(bundle, "center_crop", False),
                )
            )
        except ValueError as e:
            raise ValueError(f"image {p}: {e}") from None
    return np.stack(images)


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files and folders -> image files (a folder gives its images with known extensions, sorted)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif item.exists():
            found.append(item)
        else:
            raise FileNotFoundError(f"image {item} does not exist")
    if not found:
        raise ValueError(f"no images found in {[str(i) for i in inputs]} (extensions: {IMAGE_EXTENSIONS})")
    return found
