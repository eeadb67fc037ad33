"""Decoding untrusted image files: size-checked before a pixel is decoded, 8-bit out."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxvit.data import augment
from jaxvit.safety import validate


def is_image(file: str | BinaryIO) -> bool:
    """Whether Pillow can identify ``file`` (a path or a binary file object) as an intact image."""
    try:
        with Image.open(file) as img:
            img.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def decode_image(file: str | BinaryIO, channels: int, name: str) -> np.ndarray:
    """An encoded image (a path or a binary file object) -> uint8 ``(H, W, channels)``.

    16-bit grayscale is scaled to 8 bits; anything Pillow cannot decode, and
    32-bit integer or float pixels, raise ``ValueError`` naming ``name``.
    """
    try:
        with Image.open(file) as img:
            # The header's size is checked before a pixel is decoded.
            validate.check_image_pixels(*img.size, f"image {name!r}")
            return augment.from_pil(augment.to_8bit(img), channels)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode image {name!r}: {err}") from err
