"""What the layers share: array types, the checks of their options, and sowing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

Array = jax.Array
DType = Any
PatchSize = int | tuple[int, int]

# One function per validation rule, so a bad value gets the same message
# wherever it arrives: the model's check_config runs them all before
# tracing, and a module used on its own checks the fields it owns.


def check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``; the message lists them."""
    if value not in choices:
        raise ValueError(f"unknown {field} {value!r}: expected one of {tuple(choices)}")


def check_heads(width: int, num_heads: int) -> None:
    """Raises ``ValueError`` unless ``width`` splits evenly into ``num_heads`` heads."""
    if width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads={num_heads}")


def check_sincos_width(width: int, kind: str = "sincos2d") -> None:
    """Raises ``ValueError`` unless the 2-D sin-cos table ``kind`` fits ``width`` (sin, cos of x and
    y: 4 parts)."""
    if width % 4:
        raise ValueError(f"posemb={kind!r} needs a width divisible by 4, got {width} (a multiple of 4)")


def check_pool_has_token(pool: str, class_token: bool) -> None:
    """Raises ``ValueError`` for ``pool="tok"`` without a class token to pool."""
    if pool == "tok" and not class_token:
        raise ValueError("pool='tok' needs class_token=True; use pool='gap' or 'map' without it")


def check_attn_pool_heads(pool_width: int, pool_heads: int, pool: str = "attn_pool") -> None:
    """Raises ``ValueError`` unless the attention pooling's width splits evenly into its heads."""
    if pool_width % pool_heads:
        raise ValueError(
            f"pool={pool!r} needs a pooler width divisible by its heads, got pool_width={pool_width},"
            f" pool_heads={pool_heads}"
        )


def check_distill_pool(pool: str) -> None:
    """Raises ``ValueError`` unless a model with a distillation token pools its tokens (``pool="tok"``)."""
    if pool != "tok":
        raise ValueError(
            f"distill_token=True reads the class and distillation tokens: needs pool='tok', got {pool!r}"
        )


def sow(module: nn.Module, collection: str, name: str, value: Array) -> None:
    # init makes every collection mutable; sowing there would leave
    # intermediates inside the returned variables.
    if not module.is_initializing():
        module.sow(collection, name, value)
