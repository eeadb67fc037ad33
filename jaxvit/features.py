"""Dense features: chosen blocks' patch tokens as image-shaped grids.

``intermediate_features(model, variables, images, layers=4)`` is what
DINOv2's ``get_intermediate_layers`` and timm's ``forward_intermediates``
give: the outputs of some encoder blocks, the prefix tokens (class,
distillation, registers) split off, the patch tokens laid out as an
``(N, h, w, D)`` grid, optionally through the final LayerNorm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvit.model import VisionTransformer

Array = jax.Array


def block_indices(depth: int, layers: int | Sequence[int] | None) -> list[int]:
    """Absolute block indices: all for None, the last ``n`` for an int, else each (negative from the end)."""
    if layers is None:
        return list(range(depth))
    if isinstance(layers, int):
        if not 0 < layers <= depth:
            raise ValueError(f"layers={layers}: the last n blocks needs 1 <= n <= depth={depth}")
        return list(range(depth - layers, depth))
    indices = []
    for i in layers:
        if not -depth <= i < depth:
            raise ValueError(f"block index {i} is out of range for depth={depth}")
        indices.append(i % depth)
    return indices


def _block_outputs(model: VisionTransformer, state: Mapping[str, Any]) -> list[Array]:
    encoder = state["intermediates"]["encoder"]
    if model.scan:
        stacked = encoder["blocks"]["out"][0]  # (depth, N, T, D)
        return [stacked[i] for i in range(model.depth)]
    return [encoder[f"block_{i}"]["out"][0] for i in range(model.depth)]


def intermediate_features(
    model: VisionTransformer,
    variables: Mapping[str, Any],
    images: Array,
    layers: int | Sequence[int] | None = 4,
    norm: bool = True,
    return_prefix_tokens: bool = False,
    grids: Any = None,
    mask: Any = None,
) -> list[Any]:
    """The patch tokens of chosen blocks, as grids ``(N, h, w, D)``, one per block in ``layers`` order.

    ``layers``: the last ``n`` blocks for an int, block indices (negative from
    the end) for a sequence, every block for None. ``norm`` passes each
    through the encoder's final LayerNorm (timm's ``norm=True``, DINOv2's
    ``norm=True``). ``return_prefix_tokens`` gives ``(grid, prefix)`` pairs,
    ``prefix`` ``(N, P, D)`` in the model's token order ``[cls, dist,
    registers...]``. Runs the model once in eval mode.

    NaFlex: with ``grids`` ``(N, 2)`` (concrete) and ``mask``, ``images`` are patch sequences
    ``(N, L, p*q*C)`` (``jaxvit.data.naflex``), and each block's entry is a list of ``N`` grids
    ``(h_n, w_n, D)``, each image at its own grid (with ``return_prefix_tokens``, ``(grid,
    prefix)`` pairs, ``prefix`` ``(P, D)``).
    """
    sequence = grids is not None
    if sequence:
        grids = np.asarray(grids)
        model.check_sequence(images, grids, mask)
        grid = None
    else:
        grid = model.patch_grid(images)
    if norm and (model.pool == "attn_pool" or model.fc_norm or not model.final_norm):
        raise ValueError(
            "norm=True: a model with pool='attn_pool' (CoCa), fc_norm=True (its LayerNorm comes after"
            " the pooling) or final_norm=False has no final LayerNorm of its tokens: pass norm=False"
        )
    indices = block_indices(model.depth, layers)
    extra = {"grids": jnp.asarray(grids), "mask": mask} if sequence else {}
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"], **extra)
    outputs = _block_outputs(model, state)
    final_norm = nn.LayerNorm(epsilon=model.layer_norm_eps, dtype=model.dtype, param_dtype=model.param_dtype)
    norm_params = {"params": variables["params"]["encoder"]["norm"]}
    prefix = model.num_prefix_tokens
    features = []
    for i in indices:
        tokens = final_norm.apply(norm_params, outputs[i]) if norm else outputs[i]
        n, _, d = tokens.shape
        if sequence:  # each image's own h * w patches, in (h w) order behind the prefix
            per_image = [
                jnp.reshape(tokens[j, prefix : prefix + h * w], (h, w, d)) for j, (h, w) in enumerate(grids)
            ]
            pairs = [(g, tokens[j, :prefix]) for j, g in enumerate(per_image)]
            features.append(pairs if return_prefix_tokens else per_image)
            continue
        patches = jnp.reshape(tokens[:, prefix:], (n, grid[0], grid[1], d))
        features.append((patches, tokens[:, :prefix]) if return_prefix_tokens else patches)
    return features
