"""Step 1 of the ViT: patch embedding, a strided conv computed as ``patchify`` plus one matmul."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from jaxvit import ops
from jaxvit.layers.common import Array, DType, PatchSize, check_choice
from jaxvit.layers.posemb import resize_matrix
from jaxvit.sizes import to_pair


def patchify(images: Array, patch_size: PatchSize) -> Array:
    """``(N, H, W, C) -> (N, h*w, p*q*C)``: ``n (h p) (w q) c -> n (h w) (p q c)``.

    The feature order ``(p q c)`` is the row-major flattening of a conv kernel
    ``(p, q, C, D)``, so ``patchify(x) @ kernel.reshape(-1, D)`` equals the
    VALID conv with stride = kernel size.
    """
    p, q = to_pair(patch_size)
    n, height, width, c = images.shape
    h, w = height // p, width // q
    x = images.reshape(n, h, p, w, q, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(n, h * w, p * q * c)


def unpatchify(patches: Array, patch_size: PatchSize, grid: tuple[int, int]) -> Array:
    """``(N, h*w, p*q*C) -> (N, h*p, w*q, C)``: the inverse of ``patchify``."""
    p, q = to_pair(patch_size)
    h, w = grid
    n, s, f = patches.shape
    if s != h * w or f % (p * q):
        raise ValueError(f"patches of shape {patches.shape} do not fit grid {grid} with patch {(p, q)}")
    c = f // (p * q)
    x = patches.reshape(n, h, w, p, q, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(n, h * p, w * q, c)


class Dense(nn.Module):
    """``(..., K) -> (..., features)``: ``nn.Dense``'s parameters, names and initializers,
    computed with ``ops.dense_activation`` (XLA:CPU's fast bfloat16 path)."""

    features: int
    use_bias: bool = True
    dtype: DType | None = None
    param_dtype: DType = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    activation: str | None = None  # one of ops.ACTIVATIONS, applied to the output

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        )
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        return ops.dense_activation(x, kernel, bias, self.activation)


class PatchEmbed(nn.Module):
    """``(N, H, W, C) -> (N, h*w, D)``: a VALID conv with stride = kernel = patch.

    The kernel is kept in conv layout ``(p, q, C, D)`` so weights of conv-based
    checkpoints load unchanged; it is applied as one matmul on ``patchify``.
    ``use_bias=False`` leaves out the bias (CLIP's patch embedding has none).
    Called with another ``patch_size`` (FlexiViT), the kernel, still ``(p, q, C, D)``, is
    resampled to it first (``resample_patch_embed``, ``FLEXI_RESAMPLE``). Called with patches
    ``(N, L, p*q*C)`` (NaFlex's sequences, in ``patchify``'s ``(p q c)`` order), it embeds them:
    ``(N, L, D)``.
    """

    width: int
    patch_size: PatchSize = 16
    use_bias: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, images: Array, patch_size: PatchSize | None = None) -> Array:
        p, q = to_pair(self.patch_size)
        if images.ndim == 3:  # already patches
            n, length, features = images.shape
            if features % (p * q) or patch_size is not None and to_pair(patch_size) != (p, q):
                raise ValueError(
                    f"patches of {features} values are not {p}x{q} patches of whole channels (and a"
                    f" patch sequence is embedded at the model's patch size, got patch_size={patch_size})"
                )
            c = features // (p * q)
            patches = images
        else:
            chex.assert_rank(images, 4)
            n, height, width, c = images.shape
            length = (height // p) * (width // q)
        kernel = self.param("kernel", self.kernel_init, (p, q, c, self.width), self.param_dtype)
        if images.ndim == 4:
            if patch_size is not None and to_pair(patch_size) != (p, q):
                kernel = resample_patch_embed(kernel, patch_size, FLEXI_RESAMPLE)
                p, q = to_pair(patch_size)
                length = (height // p) * (width // q)
            patches = patchify(images, (p, q))
        patches, kernel = promote_dtype(patches, kernel, dtype=self.dtype)
        tokens = ops.dot_general(patches, kernel.reshape(p * q * c, self.width), (((2,), (0,)), ((), ())))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.width,), self.param_dtype)
            tokens = ops.add_bias(tokens, bias.astype(tokens.dtype))
        chex.assert_shape(tokens, (n, length, self.width))
        return tokens


PATCH_RESAMPLE_METHODS = ("bicubic", "bilinear")
# How a model called at another patch size resamples its kernel: big_vision's FlexiViT, which
# trains that way.
FLEXI_RESAMPLE = "bilinear"


def _resize_operator(old: tuple[int, int], new: tuple[int, int], method: str) -> np.ndarray:
    """``(new_h * new_w, old_h * old_w)``: the image resize ``method`` as a matrix on flat patches.

    ``"bicubic"``: PyTorch's antialiased bicubic (timm's ``resample_patch_embed``);
    ``"bilinear"``: ``jax.image.resize``'s antialiased bilinear (big_vision's FlexiViT).
    """
    if method == "bicubic":
        return np.kron(
            resize_matrix(old[0], new[0], "bicubic", antialias=True),
            resize_matrix(old[1], new[1], "bicubic", antialias=True),
        )
    basis = np.eye(old[0] * old[1]).reshape(-1, *old)
    with jax.ensure_compile_time_eval():  # a constant, also when the kernel is being traced
        resized = jax.vmap(lambda b: jax.image.resize(b, new, "bilinear", antialias=True))(jnp.asarray(basis))
        return np.asarray(resized, np.float64).reshape(len(basis), -1).T


def resample_patch_embed(kernel: Array, new_patch_size: PatchSize, method: str = "bicubic") -> Array:
    """``(p, q, C, D) -> (p', q', C, D)``: FlexiViT's pseudo-inverse resize of a patch kernel.

    With ``A`` the resize of a ``p x q`` patch to ``p' x q'`` (``method``),
    the new kernel is ``pinv(A^T) w``, so that a resized patch ``A x`` meets
    it as ``x`` met the old one: ``<A x, w'> = <x, w>`` exactly when
    upsampling (Beyer et al. 2023). ``method="bicubic"`` gives timm's
    ``resample_patch_embed``, ``"bilinear"`` big_vision's ``resample_patchemb``.
    """
    check_choice("patch resample method", method, PATCH_RESAMPLE_METHODS)
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must have shape (p, q, channels, width), got {kernel.shape}")
    old, new = tuple(kernel.shape[:2]), to_pair(new_patch_size)
    if old == new:
        return kernel
    operator = _resize_operator(old, new, method)
    inverse = jnp.asarray(np.linalg.pinv(operator.T), jnp.float32)
    flat = kernel.reshape(old[0] * old[1], -1).astype(jnp.float32)
    return (inverse @ flat).reshape(*new, *kernel.shape[2:]).astype(kernel.dtype)
