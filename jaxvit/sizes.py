"""Sizes of images, patches and grids: the small helpers every layer of jaxvit shares."""

from __future__ import annotations

import math
from collections.abc import Sequence


def to_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``16 -> (16, 16)``, ``(16, 8) -> (16, 8)``: a patch, image or grid size as ``(h, w)``."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def square_grid(num_tokens: int) -> tuple[int, int] | None:
    """``196 -> (14, 14)``: the square patch grid of ``num_tokens`` tokens, or None if there is none."""
    side = math.isqrt(num_tokens) if num_tokens > 0 else 0
    return (side, side) if side and side * side == num_tokens else None
