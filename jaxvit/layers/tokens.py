"""Step 2 of the ViT, tokens: the class (and distillation) token in front, DINOv2's registers after the position embedding."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax.numpy as jnp

from jaxvit.layers.common import Array, DType


class ClassToken(nn.Module):
    """``(N, S, D) -> (N, 1+S, D)``: a learnable token ``(1, 1, D)`` in front."""

    param_dtype: DType = jnp.float32
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        n, s, d = tokens.shape
        cls = self.param("token", nn.initializers.zeros, (1, 1, d), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (n, 1, d))
        out = jnp.concatenate([cls, tokens.astype(self.dtype)], axis=1)
        chex.assert_shape(out, (n, 1 + s, d))
        return out


class RegisterTokens(nn.Module):
    """``(N, P + S, D) -> (N, P + R + S, D)``: ``R`` learnable registers after the ``P`` prefix tokens.

    DINOv2's registers ("Vision Transformers Need Registers"): extra tokens
    with no position embedding of their own, inserted after the class token
    once the position embedding is added, so the order is ``[cls,
    registers..., patches]`` as in transformers and timm. Initialised from
    normal(1e-6), as DINOv2 does.
    """

    num_tokens: int
    num_prefix_tokens: int = 1
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        n, t, d = tokens.shape
        registers = self.param(
            "tokens", nn.initializers.normal(stddev=1e-6), (1, self.num_tokens, d), self.param_dtype
        )
        registers = jnp.broadcast_to(registers.astype(self.dtype), (n, self.num_tokens, d))
        tokens = tokens.astype(self.dtype)
        p = self.num_prefix_tokens
        out = jnp.concatenate([tokens[:, :p], registers, tokens[:, p:]], axis=1)
        chex.assert_shape(out, (n, t + self.num_tokens, d))
        return out
