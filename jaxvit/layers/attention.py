"""Multi-head self-attention with one fused ``qkv`` projection (and the rotary embeddings of
DINOv3 and timm's ``Eva``, BEiT's relative position bias)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvit import ops
from jaxvit.layers.common import Array, DType, check_choice, check_heads, sow
from jaxvit.layers.patch import Dense
from jaxvit.layers.posemb import (
    apply_rope,
    init_rope_mixed_freqs,
    rope_2d_tables,
    rope_axial_tables,
    rope_mixed_tables,
)
from jaxvit.sizes import to_pair

# The rotary embeddings SelfAttention computes: DINOv3's (posemb="rope") and timm Eva's (rope=).
ROTARY_KINDS = ("dinov3", "axial", "mixed")


def _per_projection_init(init: Any, parts: int) -> Any:
    """An initializer for a fused ``(D, parts*D)`` kernel that draws each ``(D, D)``
    projection on its own, so q, k and v start as separate xavier layers would
    (a fan-out of ``parts*D`` would shrink them)."""

    def fused(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
        d_in, d_out = shape
        keys = jax.random.split(key, parts)
        return jnp.concatenate([init(k, (d_in, d_out // parts), dtype) for k in keys], axis=1)

    return fused


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """BEiT's ``(1 + h*w, 1 + h*w)`` index into a relative position table of ``(2h-1)(2w-1) + 3`` rows.

    Patch ``i`` attending to patch ``j`` reads row ``(dy + h - 1) * (2w - 1) + dx + w - 1`` of
    their offset ``(dy, dx) = i - j``; the last three rows are class-to-patch, patch-to-class and
    class-to-class, for the class token in front. As BEiT, timm and transformers compute it.
    """
    h, w = grid
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([ys.reshape(-1), xs.reshape(-1)])
    offsets = coords[:, :, None] - coords[:, None, :]
    rows = 2 * h - 1, 2 * w - 1
    patches = (offsets[0] + h - 1) * rows[1] + offsets[1] + w - 1
    distances = rows[0] * rows[1]
    index = np.zeros((h * w + 1, h * w + 1), np.int32)
    index[1:, 1:] = patches
    index[0, :], index[:, 0], index[0, 0] = distances, distances + 1, distances + 2
    return index


def rel_pos_table_rows(grid: tuple[int, int]) -> int:
    """Rows of BEiT's relative position table for a patch ``grid``: ``(2h-1)(2w-1) + 3``."""
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


# How a relative position table is resized: transformers' (bilinear over the offsets) or timm's
# (BEiT's fine-tuning: the old offsets placed on a geometric progression, then linear).
REL_POS_RESAMPLE_METHODS = ("bilinear", "geometric")


def _geometric_offsets(src: int, dst: int) -> np.ndarray:
    """Where BEiT's fine-tuning (and timm's ``resize_rel_pos_bias_table``) places the ``src`` old
    offsets for ``dst`` new ones: symmetric, spaced by the ratio whose progression over half of
    ``src`` reaches half of ``dst``, found by bisection as they find it."""
    left, right = 1.01, 1.5
    ratio = left
    while right - left > 1e-6:
        ratio = (left + right) / 2.0
        if (1.0 - ratio ** (src // 2)) / (1.0 - ratio) > dst // 2:
            right = ratio
        else:
            left = ratio
    steps, current = [], 1.0
    for i in range(src // 2):
        steps.append(current)
        current += ratio ** (i + 1)
    return np.asarray([-s for s in reversed(steps)] + [0.0] + steps, np.float32)


def _linear_matrix(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``(len(target), len(source))`` weights of linear interpolation on the sorted ``source`` points."""
    weights = np.zeros((len(target), len(source)), np.float64)
    for row, point in enumerate(target):
        right = min(int(np.searchsorted(source, point, side="left")), len(source) - 1)
        left = max(right - 1, 0)
        to_left, to_right = max(point - source[left], 0.0), max(source[right] - point, 0.0)
        if to_left == 0.0 and to_right == 0.0:
            to_left = to_right = 1.0
        weights[row, left] += to_right / (to_left + to_right)
        weights[row, right] += to_left / (to_left + to_right)
    return weights


def square_rel_pos_grid(rows: int) -> tuple[int, int] | None:
    """The square grid ``(s, s)`` whose relative position table has ``rows`` rows, or None."""
    side = (math.isqrt(max(rows - 3, 0)) + 1) // 2
    return (side, side) if rel_pos_table_rows((side, side)) == rows else None


def resample_rel_pos_bias(
    table: Array, new_grid: tuple[int, int], old_grid: tuple[int, int], method: str = "bilinear"
) -> Array:
    """``(rows, H)`` for ``old_grid`` -> ``(rows', H)`` for ``new_grid``, the three class rows kept.

    ``method="bilinear"``: the ``(2h-1, 2w-1)`` offsets resized as
    ``torch.nn.functional.interpolate(mode="bilinear")`` resizes them (transformers'
    ``BeitRelativePositionBias``); ``"geometric"``: BEiT's own fine-tuning, as timm's
    ``resize_rel_pos_bias_table`` computes it (the old offsets on a geometric progression, the
    new ones at the integers, linear in between).
    """
    check_choice("relative position resample method", method, REL_POS_RESAMPLE_METHODS)
    table = jnp.asarray(table)
    if table.ndim != 2 or table.shape[0] != rel_pos_table_rows(old_grid):
        raise ValueError(
            f"a relative position table for the grid {tuple(old_grid)} has shape"
            f" ({rel_pos_table_rows(old_grid)}, heads), got {table.shape}"
        )
    if tuple(new_grid) == tuple(old_grid):
        return table
    old = (2 * old_grid[0] - 1, 2 * old_grid[1] - 1)
    new = (2 * new_grid[0] - 1, 2 * new_grid[1] - 1)
    heads = table.shape[1]
    offsets = table[:-3].reshape(*old, heads).astype(jnp.float32)
    if method == "bilinear":
        resized = jax.image.resize(offsets, (*new, heads), "bilinear", antialias=False)
    else:
        rows, cols = (
            _linear_matrix(_geometric_offsets(o, n), np.arange(-(n // 2), n // 2 + 1, dtype=np.float32))
            for o, n in zip(old, new, strict=True)
        )
        resized = jnp.einsum("Yy,yxh,Xx->YXh", rows, offsets, cols)
    return jnp.concatenate([resized.reshape(-1, heads).astype(table.dtype), table[-3:]])


class RelativePositionBias(nn.Module):
    """``() -> (H, 1 + h*w, 1 + h*w)``: BEiT's learned relative position bias of a patch ``grid``
    behind one class token, gathered from a ``table`` ``((2h-1)(2w-1) + 3, H)`` (zero init)."""

    grid: tuple[int, int]
    num_heads: int
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self) -> Array:
        shape = (rel_pos_table_rows(self.grid), self.num_heads)
        if self.has_variable("params", "table"):
            stored = tuple(self.get_variable("params", "table").shape)
            if stored != shape:
                raise ValueError(
                    f"the relative position table has shape {stored} but these images give a"
                    f" {self.grid[0]}x{self.grid[1]} grid, which needs {shape}: resample it with"
                    " jaxvit.layers.resample_rel_pos_bias (load_pretrained does this for you)"
                )
        table = self.param("table", nn.initializers.zeros, shape, self.param_dtype)
        return jnp.transpose(table[relative_position_index(self.grid)], (2, 0, 1))


def _heads_major_attention(
    qkv: Array,
    bias: Array | None,
    weights_fn: Callable[[Array], Array] | None = None,
    mask: Array | None = None,
) -> Array:
    """``(N, T, 3, H, Dh) -> (N, T, H, Dh)`` through ``ops.explicit_attention``."""
    # One transpose of qkv to (3, N, H, T, Dh); split (not indexing) so
    # the backward pass concatenates rather than pads and adds.
    q, k, v = (a[0] for a in jnp.split(jnp.transpose(qkv, (2, 0, 3, 1, 4)), 3, axis=0))
    if mask is not None:
        masked = ops.key_mask_bias(mask)
        bias = masked if bias is None else bias[None].astype(jnp.float32) + masked
    # Without a reader of the weights, explicit_attention normalizes after the product with v.
    return jnp.transpose(ops.explicit_attention(q, k, v, weights_fn, bias=bias), (0, 2, 1, 3))


def _fused_attention(qkv: Array, bias: Array | None, mask: Array | None = None) -> Array:
    """``(N, T, 3, H, Dh) -> (N, T, H, Dh)`` through ``jax.nn.dot_product_attention`` (XLA's)."""
    q, k, v = (a[:, :, 0] for a in jnp.split(qkv, 3, axis=2))
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=None if bias is None else bias[None],
        mask=None if mask is None else mask[:, None, None, :],
    )


def _cudnn_attention(qkv: Array, bias: Array | None, mask: Array | None, forced: bool) -> Array:
    """cuDNN's fused attention where ``ops.cudnn_refusal`` and this process allow, else XLA's (logged)."""
    q, k, v = (a[:, :, 0] for a in jnp.split(qkv, 3, axis=2))
    reason = ops.cudnn_refusal(q, bias, mask)
    if reason is None:
        try:
            return ops.cudnn_attention(q, k, v, bias)
        except RuntimeError as err:  # no cuDNN in this process: a CPU or TPU jaxlib
            reason = f"{err} (this process cannot trace it)"
    # "auto" tries cuDNN in every process; only a forced choice is worth a line at INFO.
    ops.log_fallback_once("cuDNN", reason, logging.INFO if forced else logging.DEBUG)
    return _fused_attention(qkv, bias, mask)


def _splash_attention(qkv: Array, bias: Array | None, mask: Array | None) -> Array:
    """Pallas's Splash attention where ``ops.splash_refusal`` allows, else XLA's (logged)."""
    q, k, v = (a[0] for a in jnp.split(jnp.transpose(qkv, (2, 0, 3, 1, 4)), 3, axis=0))
    reason = ops.splash_refusal(q, bias)
    if reason is not None:
        ops.log_fallback_once("Splash", reason)
        return _fused_attention(qkv, bias, mask)
    out = ops.splash_attention(q, k, v, ops.splash_interpreted(), mask=mask)
    return jnp.transpose(out, (0, 2, 1, 3))


def attend(qkv: Array, bias: Array | None = None, mask: Array | None = None) -> Array:
    """``(N, T, 3, H, Dh) -> (N, T, H, Dh)``: attention by the path ``ops.set_attention_impl`` chooses,
    for the platform the function is compiled for (``jax.lax.platform_dependent``).

    ``bias``: ``(H, T, T)`` added to the logits; ``mask``: ``(N, T)`` bool, the keys each query may
    attend to (a padded sequence's valid tokens). A padding query's output is computed like any
    other and means nothing; the valid tokens' outputs do not depend on the padding.
    """
    impl = ops.get_attention_impl()
    explicit = lambda qkv: _heads_major_attention(qkv, bias, mask=mask)  # noqa: E731
    xla = lambda qkv: _fused_attention(qkv, bias, mask)  # noqa: E731
    cudnn = lambda qkv: _cudnn_attention(qkv, bias, mask, forced=impl == "cudnn")  # noqa: E731
    splash = lambda qkv: _splash_attention(qkv, bias, mask)  # noqa: E731
    if impl == "explicit":
        return explicit(qkv)
    if impl == "fused":
        return xla(qkv)
    if impl == "splash" and ops.splash_interpreted():
        return splash(qkv)
    if impl == "auto":
        return jax.lax.platform_dependent(qkv, cpu=explicit, cuda=cudnn, default=xla)
    if impl == "cudnn":
        return jax.lax.platform_dependent(qkv, cuda=cudnn, default=xla)
    return jax.lax.platform_dependent(qkv, tpu=splash, default=xla)


class SelfAttention(nn.Module):
    """``(N, T, D) -> (N, T, D)``: multi-head self-attention with one fused ``qkv`` projection.

    The ``qkv`` kernel is ``(D, 3*D)`` with outputs ordered ``(3, heads,
    head_dim)``. On GPU/TPU attention runs through
    ``jax.nn.dot_product_attention`` (fused kernels where the backend has
    them); on CPU, and whenever the weights are needed (the ``"attention"``
    collection is mutable, or attention dropout is active), through
    ``ops.explicit_attention`` (``jaxvit.ops.set_attention_impl`` chooses).
    ``rope_grid``: queries and keys of the patch tokens, which follow ``rope_prefix_tokens``
    prefix tokens and form that grid, are rotated (``apply_rope``) before attention, by the
    rotary embedding of ``rope_kind``: ``"dinov3"``, or timm ``Eva``'s ``"axial"`` and
    ``"mixed"`` (learned frequencies ``rope_freqs`` in each block). ``out_norm``: a LayerNorm
    (``norm``) on the attention output before its projection (EVA-CLIP). ``rel_pos_grid`` (BEiT): a learned relative
    position bias of that patch grid behind one class token (``RelativePositionBias``, under
    ``rel_pos_bias``) is added to the attention logits.
    """

    num_heads: int
    attention_dropout: float = 0.0
    qkv_bias: bool = True
    deterministic: bool = True
    rope_grid: tuple[int, int] | None = None
    rope_prefix_tokens: int = 0
    rope_theta: float = 100.0
    rope_kind: str = "dinov3"
    rope_ref_grid: int | tuple[int, int] | None = None
    rope_grid_offset: float = 0.0
    rope_xy: bool = False
    rel_pos_grid: tuple[int, int] | None = None
    out_norm: bool = False
    layer_norm_eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: Array, bias: Array | None = None, mask: Array | None = None) -> Array:
        """``bias``: ``(heads, T, T)`` added to the logits besides the module's own (BEiT's shared
        table). ``mask``: ``(N, T)`` bool, the tokens that may be attended to (see ``attend``)."""
        n, t, d = x.shape
        check_heads(d, self.num_heads)
        head_dim = d // self.num_heads
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        qkv_init = _per_projection_init(self.kernel_init, 3)
        qkv = Dense(3 * d, use_bias=self.qkv_bias, name="qkv", **{**dense, "kernel_init": qkv_init})(
            x
        ).reshape(n, t, 3, self.num_heads, head_dim)
        if self.rope_grid is not None:
            cos, sin = self._rotary_tables(head_dim)
            q, k, v = (qkv[:, :, i] for i in range(3))
            interleaved = self.rope_kind != "dinov3"
            q, k = (apply_rope(a, cos, sin, self.rope_prefix_tokens, interleaved) for a in (q, k))
            qkv = jnp.stack([q, k, v], axis=2)
        if self.rel_pos_grid is not None:
            own = RelativePositionBias(
                self.rel_pos_grid, self.num_heads, self.param_dtype, name="rel_pos_bias"
            )()
            bias = own if bias is None else bias + own
        if bias is not None:
            chex.assert_shape(bias, (self.num_heads, t, t))
        if mask is not None:
            chex.assert_shape(mask, (n, t))
        dropout_active = self.attention_dropout > 0.0 and not self.deterministic
        want_weights = self.is_mutable_collection("attention") and not self.is_initializing()
        if dropout_active or want_weights:

            def weights_fn(weights: Array) -> Array:
                sow(self, "attention", "weights", weights)
                return nn.Dropout(self.attention_dropout)(weights, deterministic=self.deterministic)

            out = _heads_major_attention(qkv, bias, weights_fn, mask)
        elif self.is_initializing():  # parameters only: no kernel needed, nor a mesh for one
            out = _fused_attention(qkv, bias, mask)
        else:
            out = attend(qkv, bias, mask)
        chex.assert_shape(out, (n, t, self.num_heads, head_dim))
        out = out.reshape(n, t, d)
        if self.out_norm:
            out = nn.LayerNorm(
                epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
            )(out)
        return Dense(d, name="out", **dense)(out)

    def _rotary_tables(self, head_dim: int) -> tuple[Array, Array]:
        """``(cos, sin)`` of the rotary embedding of ``rope_kind`` at ``rope_grid``; for ``"mixed"``
        from this block's learned ``rope_freqs`` ``(2, heads, head_dim / 2)``."""
        check_choice("rope_kind", self.rope_kind, ROTARY_KINDS)
        if self.rope_kind == "dinov3":
            return rope_2d_tables(self.rope_grid, head_dim, self.rope_theta)
        if head_dim % 4:
            raise ValueError(f"rope={self.rope_kind!r} needs a head dimension divisible by 4, got {head_dim}")
        if self.rope_kind == "axial":
            ref = None if self.rope_ref_grid is None else to_pair(self.rope_ref_grid)
            return rope_axial_tables(
                self.rope_grid, head_dim, self.rope_theta, ref, self.rope_grid_offset, self.rope_xy
            )
        freqs = self.param(
            "rope_freqs",
            init_rope_mixed_freqs(self.rope_theta),
            (2, self.num_heads, head_dim // 2),
            self.param_dtype,
        )
        return rope_mixed_tables(freqs, self.rope_grid, self.rope_xy)
