"""Multi-head self-attention with one fused ``qkv`` projection (and DINOv3's rotary embedding)."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvit import ops
from jaxvit.layers.common import Array, DType, check_heads, sow
from jaxvit.layers.patch import Dense
from jaxvit.layers.posemb import apply_rope, rope_2d_tables


def _per_projection_init(init: Any, parts: int) -> Any:
    """An initializer for a fused ``(D, parts*D)`` kernel that draws each ``(D, D)``
    projection on its own, so q, k and v start as separate xavier layers would
    (a fan-out of ``parts*D`` would shrink them)."""

    def fused(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
        d_in, d_out = shape
        keys = jax.random.split(key, parts)
        return jnp.concatenate([init(k, (d_in, d_out // parts), dtype) for k in keys], axis=1)

    return fused


class SelfAttention(nn.Module):
    """``(N, T, D) -> (N, T, D)``: multi-head self-attention with one fused ``qkv`` projection.

    The ``qkv`` kernel is ``(D, 3*D)`` with outputs ordered ``(3, heads,
    head_dim)``. On GPU/TPU attention runs through
    ``jax.nn.dot_product_attention`` (fused kernels where the backend has
    them); on CPU, and whenever the weights are needed (the ``"attention"``
    collection is mutable, or attention dropout is active), through
    ``ops.explicit_attention`` (``jaxvit.ops.set_attention_impl`` chooses).
    ``rope_grid`` (DINOv3): queries and keys of the patch tokens, which
    follow ``rope_prefix_tokens`` prefix tokens and form that grid, are
    rotated (``apply_rope``) before attention.
    """

    num_heads: int
    attention_dropout: float = 0.0
    qkv_bias: bool = True
    deterministic: bool = True
    rope_grid: tuple[int, int] | None = None
    rope_prefix_tokens: int = 0
    rope_theta: float = 100.0
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, t, d = x.shape
        check_heads(d, self.num_heads)
        head_dim = d // self.num_heads
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        qkv_init = _per_projection_init(self.kernel_init, 3)
        qkv = Dense(3 * d, use_bias=self.qkv_bias, name="qkv", **{**dense, "kernel_init": qkv_init})(
            x
        ).reshape(n, t, 3, self.num_heads, head_dim)
        if self.rope_grid is not None:
            cos, sin = rope_2d_tables(self.rope_grid, head_dim, self.rope_theta)
            q, k, v = (qkv[:, :, i] for i in range(3))
            q, k = (apply_rope(a, cos, sin, self.rope_prefix_tokens) for a in (q, k))
            qkv = jnp.stack([q, k, v], axis=2)
        dropout_active = self.attention_dropout > 0.0 and not self.deterministic
        want_weights = self.is_mutable_collection("attention") and not self.is_initializing()
        if dropout_active or want_weights or ops.use_explicit_attention():

            def weights_fn(weights: Array) -> Array:
                sow(self, "attention", "weights", weights)
                return nn.Dropout(self.attention_dropout)(weights, deterministic=self.deterministic)

            # One transpose of qkv to (3, N, H, T, Dh); split (not indexing) so
            # the backward pass concatenates rather than pads and adds.
            q, k, v = (a[0] for a in jnp.split(jnp.transpose(qkv, (2, 0, 3, 1, 4)), 3, axis=0))
            # Without a reader of the weights, explicit_attention normalizes after the product with v.
            out = ops.explicit_attention(q, k, v, weights_fn if dropout_active or want_weights else None)
            out = jnp.transpose(out, (0, 2, 1, 3))
        else:
            q, k, v = (a[:, :, 0] for a in jnp.split(qkv, 3, axis=2))
            out = jax.nn.dot_product_attention(q, k, v)
        chex.assert_shape(out, (n, t, self.num_heads, head_dim))
        return Dense(d, name="out", **dense)(out.reshape(n, t, d))
