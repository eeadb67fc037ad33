"""The blocks' MLPs: GELU-family ``MlpBlock``, DINOv2-g's packed ``SwiGLUMlp``, and ``LayerScale``."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvit import ops
from jaxvit.layers.common import Array, DType, check_choice
from jaxvit.layers.patch import Dense


def _mlp_dense(dtype: DType, param_dtype: DType) -> dict[str, Any]:
    # The MLP init of the references: xavier kernels, near-zero biases.
    return dict(
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6),
    )


class MlpBlock(nn.Module):
    """``(N, T, D) -> (N, T, D)``: Dense -> activation -> dropout -> Dense.

    ``activation`` is one of ``ops.ACTIVATIONS``: ``"gelu"`` (exact),
    ``"gelu_tanh"``, ``"quick_gelu"`` (CLIP's ``x * sigmoid(1.702 x)``). ``norm=True``: a
    LayerNorm of the hidden activations before ``fc2`` (NormFormer's, timm's ``scale_mlp``).
    """

    mlp_dim: int
    dropout: float = 0.0
    activation: str = "gelu"
    norm: bool = False
    layer_norm_eps: float = 1e-6
    deterministic: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = _mlp_dense(self.dtype, self.param_dtype)
        check_choice("activation", self.activation, ops.ACTIVATIONS)
        y = Dense(self.mlp_dim, activation=self.activation, name="fc1", **dense)(x)
        y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
        y = _hidden_norm(self, y)
        # no dropout after fc2: the residual in EncoderBlock applies it, once, as the references do
        return Dense(x.shape[-1], name="fc2", **dense)(y)


def _hidden_norm(mlp: nn.Module, y: Array) -> Array:
    """The sub-LN of ``norm=True`` (EVA02's, timm's ``scale_mlp``): a LayerNorm ``norm`` of the
    hidden activations, before ``fc2``."""
    if not mlp.norm:
        return y
    return nn.LayerNorm(
        epsilon=mlp.layer_norm_eps, dtype=mlp.dtype, param_dtype=mlp.param_dtype, parent=mlp, name="norm"
    )(y)


def swiglu_hidden_size(mlp_dim: int) -> int:
    """DINOv2's SwiGLU width for a nominal MLP width: two thirds, rounded up to a multiple of 8.

    ``(int(mlp_dim * 2 / 3) + 7) // 8 * 8``, as transformers' ``Dinov2SwiGLUFFN``
    and timm's ``vit_giant_patch14_dinov2`` compute it: 6144 -> 4096 for
    DINOv2-g. ``SwiGLUMlp`` takes the result as its ``mlp_dim``.
    """
    return (int(mlp_dim * 2 / 3) + 7) // 8 * 8


class SwiGLUMlp(nn.Module):
    """``(N, T, D) -> (N, T, D)``: ``fc2(silu(gate) * value)`` with ``gate, value = split(fc1(x))``.

    DINOv2-g's packed layout: one ``fc1`` ``(D, 2*mlp_dim)`` whose first half
    is the gate (through SiLU) and second half the value, as in transformers'
    ``weights_in`` (``gate_proj`` then ``up_proj``) and timm's
    ``SwiGLUPacked`` (``gate_last=False``); ``fc2`` is ``(mlp_dim, D)``. ``norm=True``: EVA02's
    sub-LN before ``fc2`` (timm's ``SwiGLU`` with ``fc1_g``, ``fc1_x``, ``norm``).
    """

    mlp_dim: int
    dropout: float = 0.0
    norm: bool = False
    layer_norm_eps: float = 1e-6
    deterministic: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = _mlp_dense(self.dtype, self.param_dtype)
        gate, value = jnp.split(Dense(2 * self.mlp_dim, name="fc1", **dense)(x), 2, axis=-1)
        y = jax.nn.silu(gate) * value
        y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
        y = _hidden_norm(self, y)
        return Dense(x.shape[-1], name="fc2", **dense)(y)


class LayerScale(nn.Module):
    """``(..., D) -> (..., D)``: a learned per-channel scale ``(D,)`` on a residual branch (CaiT, DeiT-3, DINOv2)."""

    init_value: float = 1e-5
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", nn.initializers.constant(self.init_value), (x.shape[-1],), self.param_dtype
        )
        return x.astype(self.dtype) * scale.astype(self.dtype)
