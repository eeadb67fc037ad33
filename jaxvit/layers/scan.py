"""Scanned <-> unrolled parameter trees of the encoder.

``Encoder(scan=True)`` keeps its blocks under ``blocks`` with a leading depth
axis; ``scan=False`` keeps ``block_0 ... block_{depth-1}``. Both functions
work on any subtree that holds an encoder (the whole params, or a model that
composes jaxvit's ``Encoder``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


def _is_mapping(x: Any) -> bool:
    return isinstance(x, Mapping)


def _to_dict(tree: Any) -> Any:
    if _is_mapping(tree):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def scan_to_unrolled(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params of a ``scan=True`` model -> the ``scan=False`` layout (any subtree works)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key == "blocks" and _is_mapping(value):
            depth = jax.tree_util.tree_leaves(value)[0].shape[0]
            for i in range(depth):
                out[f"block_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], _to_dict(value))
        elif _is_mapping(value):
            out[key] = scan_to_unrolled(value)
        else:
            out[key] = value
    return out


def unrolled_to_scan(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params of a ``scan=False`` model -> the ``scan=True`` layout (any subtree works)."""
    out: dict[str, Any] = {}
    block_keys = sorted(
        (k for k in params if k.startswith("block_") and k[6:].isdigit()), key=lambda k: int(k[6:])
    )
    if block_keys:
        if [int(k[6:]) for k in block_keys] != list(range(len(block_keys))):
            raise ValueError(f"block keys are not block_0..block_{len(block_keys) - 1}: {block_keys}")
        blocks = [_to_dict(params[k]) for k in block_keys]
        out["blocks"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *blocks)
    for key, value in params.items():
        if key in block_keys:
            continue
        out[key] = unrolled_to_scan(value) if _is_mapping(value) else value
    return out
