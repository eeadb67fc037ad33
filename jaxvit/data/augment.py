"""Image augmentations, per example on uint8 ``(H, W, C)`` arrays (numpy + Pillow).

Each function takes a ``np.random.Generator`` so that a pipeline seeded per
example is deterministic, whatever worker or host runs it. Batch-level
mixing (mixup / cutmix) lives in ``jaxvit.training.train_lib`` where it runs on device.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def to_pil(image: np.ndarray) -> Image.Image:
    """``(H, W, C)`` uint8 -> a Pillow image (mode L for one channel, RGB for three)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def from_pil(image: Image.Image, channels: int) -> np.ndarray:
    """A Pillow image -> ``(H, W, channels)`` uint8."""
    mode = "L" if channels == 1 else "RGB"
    # convert() copies even when the mode is already right; asarray copies once more.
    array = np.asarray(image if image.mode == mode else image.convert(mode), dtype=np.uint8)
    return array[..., None] if channels == 1 else array


# Pillow's convert() clips 16-bit values to 255 instead of scaling them, and reads a
# float image as grey levels of 1/255: both would train on white or black images.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits; ``ValueError`` for 32-bit integer and float images."""
    if img.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray((np.asarray(img).astype(np.uint32) // 257).astype(np.uint8))
    if img.mode in ("I", "F"):
        raise ValueError(
            f"mode {img.mode!r} pixels (32-bit integer or float) have no known range;"
            " convert the file to 8 or 16 bits per channel"
        )
    return img


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, C) -> (h, w, C)`` bilinear (antialiased when shrinking)."""
    if image.shape[:2] == tuple(size):
        return image
    pil = to_pil(image).resize((size[1], size[0]), Image.BILINEAR)
    return from_pil(pil, image.shape[-1])


def center_crop(image: np.ndarray, size: tuple[int, int], crop_fraction: float = 1.0) -> np.ndarray:
    """Crop the central ``crop_fraction`` of the shorter side, then resize to ``size``."""
    h, w = image.shape[:2]
    side = max(1, round(min(h, w) * crop_fraction))
    ch, cw = (side, side) if crop_fraction < 1.0 else (h, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return resize(image[top : top + ch, left : left + cw], size)


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Inception-style crop: a random area fraction in ``scale`` and aspect ratio in
    ``ratio`` (log-uniform), resized to ``size``; falls back to the whole image."""
    h, w = image.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw = int(round(np.sqrt(target * aspect)))
        ch = int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return resize(image[top : top + ch, left : left + cw], size)
    return resize(image, size)


def pad_and_random_crop(image: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
    """Zero-pad by ``padding`` on each side and crop back to the original size at random:
    a random shift of up to ``padding`` pixels (the CIFAR recipe)."""
    if padding <= 0:
        return image
    h, w = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top = int(rng.integers(0, 2 * padding + 1))
    left = int(rng.integers(0, 2 * padding + 1))
    return padded[top : top + h, left : left + w]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Horizontal flip with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


# RandAugment (Cubuk et al. 2020): ``num_ops`` ops drawn uniformly, each at a
# magnitude on a 0..10 scale, with a random sign for the signed ones, and each
# applied with probability ``prob``: 0.5 is timm's default ("rand-m10-n2"), and
# the mean of the probability big_vision's TF-derived randaug draws per op.


def _signed(level: float, maximum: float, rng: np.random.Generator) -> float:
    value = level / 10.0 * maximum
    return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    fill = (128,) * len(img.getbands())
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=fill)


_RandOp = Callable[[Image.Image, float, np.random.Generator], Image.Image]

RANDAUGMENT_OPS: dict[str, _RandOp] = {
    "Identity": lambda img, m, rng: img,
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": lambda img, m, rng: img.rotate(_signed(m, 30.0, rng), resample=Image.BILINEAR, fillcolor=128),
    "Posterize": lambda img, m, rng: ImageOps.posterize(img, max(1, 8 - int(m / 10.0 * 4))),
    "Solarize": lambda img, m, rng: ImageOps.solarize(img, 256 - int(m / 10.0 * 256)),
    "Color": lambda img, m, rng: ImageEnhance.Color(img).enhance(1.0 + _signed(m, 0.9, rng)),
    "Contrast": lambda img, m, rng: ImageEnhance.Contrast(img).enhance(1.0 + _signed(m, 0.9, rng)),
    "Brightness": lambda img, m, rng: ImageEnhance.Brightness(img).enhance(1.0 + _signed(m, 0.9, rng)),
    "Sharpness": lambda img, m, rng: ImageEnhance.Sharpness(img).enhance(1.0 + _signed(m, 0.9, rng)),
    "ShearX": lambda img, m, rng: _affine(img, (1, _signed(m, 0.3, rng), 0, 0, 1, 0)),
    "ShearY": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(m, 0.3, rng), 1, 0)),
    "TranslateX": lambda img, m, rng: _affine(img, (1, 0, _signed(m, 0.45, rng) * img.size[0], 0, 1, 0)),
    "TranslateY": lambda img, m, rng: _affine(img, (1, 0, 0, 0, 1, _signed(m, 0.45, rng) * img.size[1])),
}


def randaugment(
    image: np.ndarray,
    rng: np.random.Generator,
    num_ops: int = 2,
    magnitude: float = 10.0,
    prob: float = 0.5,
) -> np.ndarray:
    """``(H, W, C)`` uint8 -> the same shape, after ``num_ops`` random RandAugment ops, each
    applied with probability ``prob``."""
    if num_ops <= 0:
        return image
    if not 0 <= magnitude <= 10:
        raise ValueError(f"RandAugment magnitude must be in [0, 10], got {magnitude}")
    if not 0 <= prob <= 1:
        raise ValueError(f"RandAugment prob must be in [0, 1], got {prob}")
    names = list(RANDAUGMENT_OPS)
    chosen = [names[i] for i in rng.integers(0, len(names), size=num_ops) if rng.random() < prob]
    if not chosen:
        return image
    img = to_pil(image)
    for name in chosen:
        img = RANDAUGMENT_OPS[name](img, magnitude, rng)
    return from_pil(img, image.shape[-1])


def normalize(
    image: np.ndarray, mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.5,)
) -> np.ndarray:
    """uint8 ``(H, W, C)`` -> float32 ``(x / 255 - mean) / std``; the default maps to [-1, 1]."""
    # In place on one float32 copy: the same float32 operations as (x / 255 - mean) / std,
    # the same bits, without three temporaries (about half the time at 224 px).
    x = image.astype(np.float32)
    x /= np.float32(255.0)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return x
