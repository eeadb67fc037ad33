"""The Vision Transformer, top to bottom.

The file follows the four steps of the model:

1. ``PatchEmbed``: a strided conv, computed as ``patchify`` + one matmul.
2. ``ClassToken`` and ``PositionEmbedding``: the learnable class token (and
   DeiT's distillation token) in front, a learned or fixed 2-D sin-cos
   position embedding, then ``RegisterTokens`` (DINOv2's registers, which get
   no position embedding).
3. ``Encoder``: pre-LayerNorm blocks (``SelfAttention`` + ``MlpBlock`` or
   ``SwiGLUMlp``, each branch optionally scaled by ``LayerScale``), with
   optional ``nn.scan`` over the blocks and ``nn.remat``.
4. ``Head``: pooling (class token, mean, or attention pooling), an optional
   representation layer, and the classifier (two, averaged, with a
   distillation token).

``VisionTransformer`` composes them; ``create_model("B/16")`` builds one by
name (the sizes are in ``jaxvit/variants.py``). Every module threads ``dtype`` (compute) and ``param_dtype`` down to each
layer it creates. Pure functions (``patchify``, ``posemb_sincos_2d``,
``resample_posemb``, ...) sit beside the module that uses them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from jaxvit import ops

# Kept importable from here for code written against jaxvit 0.1; they live in
# jaxvit.convert.scan and jaxvit.ops now.
from jaxvit.convert.scan import scan_to_unrolled, unrolled_to_scan  # noqa: F401
from jaxvit.ops import explicit_attention, resize_matrix, use_explicit_attention  # noqa: F401
from jaxvit.variants import FAMILY_VARIANTS, VARIANTS, decode_variant  # noqa: F401

Array = jax.Array
DType = Any
PatchSize = int | tuple[int, int]

POOLINGS = ("tok", "gap", "map")
# How an encoder with unrolled parameters (scan=False) runs its blocks: "auto" runs them as
# one lax.scan over the stacked parameters when training and unrolled otherwise.
BLOCK_LOOPS = ("auto", "scan", "unrolled")
POSEMBS = ("learn", "sincos2d", "rope", "none")
MLP_TYPES = ("mlp", "swiglu")
RESAMPLE_METHODS = ("bilinear", "bicubic")
# Policies that need no arguments; the others (save_only_these_names, ...) are
# factories and belong in user code. "auto" is dots_with_no_batch_dims_saveable
# wherever the blocks run as one scan and "none" where they run unrolled.
REMAT_POLICIES = (
    "auto",
    "none",
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)

# One function per validation rule, so a bad value gets the same message
# wherever it arrives: VisionTransformer.check_config runs them all before
# tracing, and a module used on its own checks the fields it owns.


def check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``; the message lists them."""
    if value not in choices:
        raise ValueError(f"unknown {field} {value!r}: expected one of {tuple(choices)}")


def check_heads(width: int, num_heads: int) -> None:
    """Raises ``ValueError`` unless ``width`` splits evenly into ``num_heads`` heads."""
    if width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads={num_heads}")


def check_sincos_width(width: int) -> None:
    """Raises ``ValueError`` unless the 2-D sin-cos table fits ``width`` (sin, cos of x and y: 4 parts)."""
    if width % 4:
        raise ValueError(f"posemb='sincos2d' needs a width divisible by 4, got {width} (a multiple of 4)")


def resolve_activation(activation: str, gelu_approximate: bool | None) -> str:
    """The MLP activation's name, with the deprecated ``gelu_approximate=True`` read as ``"gelu_tanh"``.

    Raises ``ValueError`` for an unknown name, or for ``gelu_approximate=True``
    beside an activation other than GELU.
    """
    if gelu_approximate:
        warnings.warn(
            "gelu_approximate is deprecated (until jaxvit 0.3): use activation='gelu_tanh'",
            DeprecationWarning,
            stacklevel=3,
        )
        if activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"gelu_approximate=True contradicts activation={activation!r}")
        activation = "gelu_tanh"
    check_choice("activation", activation, ops.ACTIVATIONS)
    return activation


def check_pool_has_token(pool: str, class_token: bool) -> None:
    """Raises ``ValueError`` for ``pool="tok"`` without a class token to pool."""
    if pool == "tok" and not class_token:
        raise ValueError("pool='tok' needs class_token=True; use pool='gap' or 'map' without it")


def check_distill_pool(pool: str) -> None:
    """Raises ``ValueError`` unless a model with a distillation token pools its tokens (``pool="tok"``)."""
    if pool != "tok":
        raise ValueError(
            f"distill_token=True reads the class and distillation tokens: needs pool='tok', got {pool!r}"
        )


def _sow(module: nn.Module, collection: str, name: str, value: Array) -> None:
    # init makes every collection mutable; sowing there would leave
    # intermediates inside the returned variables.
    if not module.is_initializing():
        module.sow(collection, name, value)


def to_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``16 -> (16, 16)``, ``(16, 8) -> (16, 8)``: a patch, image or grid size as ``(h, w)``."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


# ---------------------------------------------------------------------------
# 1. Patch embedding
# ---------------------------------------------------------------------------


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
    """

    width: int
    patch_size: PatchSize = 16
    use_bias: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, images: Array) -> Array:
        p, q = to_pair(self.patch_size)
        chex.assert_rank(images, 4)
        n, height, width, c = images.shape
        kernel = self.param("kernel", self.kernel_init, (p, q, c, self.width), self.param_dtype)
        patches = patchify(images, (p, q))
        patches, kernel = promote_dtype(patches, kernel, dtype=self.dtype)
        tokens = ops.dot_general(patches, kernel.reshape(p * q * c, self.width), (((2,), (0,)), ((), ())))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.width,), self.param_dtype)
            tokens = ops.add_bias(tokens, bias.astype(tokens.dtype))
        chex.assert_shape(tokens, (n, (height // p) * (width // q), self.width))
        return tokens


# ---------------------------------------------------------------------------
# 2. Class token and position embedding
# ---------------------------------------------------------------------------


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


def posemb_sincos_2d(
    grid: tuple[int, int],
    width: int,
    temperature: float = 10_000.0,
    dtype: DType = jnp.float32,
    num_prefix_tokens: int = 0,
) -> Array:
    """The fixed 2-D sin-cos embedding: ``(1, P + h*w, width)``, rows in ``(h w)`` order.

    A quarter of the channels each hold sin(x), cos(x), sin(y), cos(y) at
    geometric frequencies, as in "Better plain ViT baselines". The
    ``num_prefix_tokens`` rows in front (class token slots) are zeros.
    """
    h, w = grid
    check_sincos_width(width)
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / (width // 4 - 1 if width > 4 else 1)
    omega = 1.0 / (temperature**omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    pe = np.pad(pe, ((num_prefix_tokens, 0), (0, 0)))
    return jnp.asarray(pe[None], dtype)


def square_grid(num_tokens: int) -> tuple[int, int] | None:
    """``196 -> (14, 14)``: the square patch grid of ``num_tokens`` tokens, or None if there is none."""
    side = math.isqrt(num_tokens) if num_tokens > 0 else 0
    return (side, side) if side and side * side == num_tokens else None


def resample_posemb(
    posemb: Array,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    method: str = "bilinear",
    antialias: bool = False,
) -> Array:
    """``(1, P + h*w, D) -> (1, P + H*W, D)``: resize of the grid part.

    The first ``num_prefix_tokens`` rows (the class slot) are kept as they
    are. ``old_grid`` defaults to the square root of the grid length; pass it
    for a non-square checkpoint grid. ``method="bilinear"`` without antialias
    is ``jax.image.resize``; ``"bicubic"`` (and any antialiased resize) gives
    what ``torch.nn.functional.interpolate(mode=method,
    align_corners=False, antialias=antialias)`` gives, which is how
    transformers (bicubic) and timm (bicubic, antialias) resample theirs:
    ``jax.image.resize``'s cubic kernel differs from torch's.
    """
    check_choice("resample method", method, RESAMPLE_METHODS)
    posemb = jnp.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"posemb must have shape (1, tokens, width), got {posemb.shape}")
    prefix, grid_part = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    length = grid_part.shape[1]
    if old_grid is None:
        old_grid = square_grid(length)
        if old_grid is None:
            raise ValueError(
                f"cannot infer the grid of a position embedding with {length} grid tokens"
                f" (and {num_prefix_tokens} prefix tokens): pass old_grid"
            )
    if old_grid[0] * old_grid[1] != length:
        raise ValueError(f"old_grid {old_grid} does not match {length} grid tokens")
    h, w = new_grid
    if tuple(old_grid) == (h, w):
        return posemb
    d = posemb.shape[-1]
    image = grid_part.reshape(old_grid[0], old_grid[1], d).astype(jnp.float32)
    if method == "bilinear" and not antialias:
        resized = jax.image.resize(image, (h, w, d), method="bilinear", antialias=False)
    else:
        rows = ops.resize_matrix(old_grid[0], h, method, antialias)
        cols = ops.resize_matrix(old_grid[1], w, method, antialias)
        resized = np.einsum("Hh,hwd,Ww->HWd", rows, np.asarray(image, np.float64), cols)
    resized = jnp.asarray(resized).reshape(1, h * w, d).astype(posemb.dtype)
    return jnp.concatenate([prefix, resized], axis=1)


class PositionEmbedding(nn.Module):
    """``(N, P + h*w, D) -> (N, P + h*w, D)``: adds a position embedding.

    ``kind="learn"`` holds a parameter ``(1, P + h*w, D)`` drawn from
    normal(0.02), with a slot for each of the ``num_prefix_tokens`` in front;
    ``kind="sincos2d"`` adds a fixed embedding (zeros in the prefix slots);
    ``"rope"`` (rotary, applied in attention) and ``"none"`` add nothing here.
    """

    grid: tuple[int, int]
    kind: str = "learn"
    num_prefix_tokens: int = 1
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        n, t, d = tokens.shape
        h, w = self.grid
        chex.assert_shape(tokens, (n, self.num_prefix_tokens + h * w, d))
        if self.kind == "learn":
            shape = (1, t, d)
            if self.has_variable("params", "embedding"):
                stored = self.get_variable("params", "embedding").shape
                if tuple(stored) != shape:
                    raise ValueError(
                        f"the position embedding has shape {tuple(stored)} but these images give"
                        f" {h}x{w} patches, which need {shape}: resample it with"
                        " jaxvit.resample_posemb (load_pretrained does this for you)"
                    )
            posemb = self.param("embedding", nn.initializers.normal(stddev=0.02), shape, self.param_dtype)
        elif self.kind in ("rope", "none"):
            return tokens.astype(self.dtype)  # rope rotates queries and keys in attention instead
        elif self.kind == "sincos2d":
            posemb = posemb_sincos_2d(
                (h, w), d, dtype=self.param_dtype, num_prefix_tokens=self.num_prefix_tokens
            )
        else:
            check_choice("posemb", self.kind, POSEMBS)
        return tokens.astype(self.dtype) + posemb.astype(self.dtype)


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


# ---------------------------------------------------------------------------
# 3. Encoder
# ---------------------------------------------------------------------------


def drop_path(x: Array, rate: Array | float, rng: Array) -> Array:
    """Stochastic depth: zero whole examples with probability ``rate``, rescale the rest."""
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


def _per_projection_init(init: Any, parts: int) -> Any:
    """An initializer for a fused ``(D, parts*D)`` kernel that draws each ``(D, D)``
    projection on its own, so q, k and v start as separate xavier layers would
    (a fan-out of ``parts*D`` would shrink them)."""

    def fused(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
        d_in, d_out = shape
        keys = jax.random.split(key, parts)
        return jnp.concatenate([init(k, (d_in, d_out // parts), dtype) for k in keys], axis=1)

    return fused


def rope_2d_tables(
    grid: tuple[int, int], head_dim: int, theta: float = 100.0
) -> tuple[np.ndarray, np.ndarray]:
    """DINOv3's 2-D rotary embedding: ``(cos, sin)``, each ``(h*w, head_dim)`` float32, rows in ``(h w)`` order.

    Patch centres are placed on ``[-1, 1]`` along each axis (``(i + 0.5) / n *
    2 - 1``), whatever the grid, so any image size works. The angle of a
    coordinate ``c`` at frequency ``theta ** (-4k / head_dim)``, ``k < head_dim
    / 4``, is ``2 pi c`` times it; the ``y`` angles then the ``x`` angles fill
    half the channels, repeated for the other half (the pairing of
    ``rotate_half``). Computed in float32 in the order transformers' DINOv3
    does, so the tables agree to the last bit or so.
    """
    if head_dim % 4:
        raise ValueError(f"posemb='rope' needs a head dimension divisible by 4, got {head_dim}")
    h, w = grid
    inv_freq = (1.0 / theta ** np.arange(0, 1, 4 / head_dim, dtype=np.float32)).astype(np.float32)
    ys = (np.arange(0.5, h, dtype=np.float32) / np.float32(h)).astype(np.float32)
    xs = (np.arange(0.5, w, dtype=np.float32) / np.float32(w)).astype(np.float32)
    coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(h * w, 2)
    coords = (np.float32(2.0) * coords - np.float32(1.0)).astype(np.float32)
    angles = (np.float32(2 * math.pi) * coords[:, :, None] * inv_freq[None, None, :]).astype(np.float32)
    angles = np.tile(angles.reshape(h * w, -1), 2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: Array, cos: Array, sin: Array, num_prefix_tokens: int) -> Array:
    """Rotates the patch tokens of ``x`` ``(N, T, H, Dh)``; the ``num_prefix_tokens`` in front stay as they are.

    ``x * cos + rotate_half(x) * sin``, ``rotate_half(x) = [-x2, x1]`` of the
    two halves of ``Dh``; ``cos``, ``sin`` ``(T - P, Dh)`` from ``rope_2d_tables``.
    """
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    first, second = jnp.split(patches, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    cos, sin = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
    return jnp.concatenate([prefix, patches * cos + rotated * sin], axis=1)


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
                _sow(self, "attention", "weights", weights)
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
    ``"gelu_tanh"``, ``"quick_gelu"`` (CLIP's ``x * sigmoid(1.702 x)``).
    """

    mlp_dim: int
    dropout: float = 0.0
    activation: str = "gelu"
    gelu_approximate: bool = False  # deprecated: activation="gelu_tanh", until jaxvit 0.3
    deterministic: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = _mlp_dense(self.dtype, self.param_dtype)
        activation = resolve_activation(self.activation, self.gelu_approximate)
        y = Dense(self.mlp_dim, activation=activation, name="fc1", **dense)(x)
        y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
        # no dropout after fc2: the residual in EncoderBlock applies it, once, as the references do
        return Dense(x.shape[-1], name="fc2", **dense)(y)


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
    ``SwiGLUPacked`` (``gate_last=False``); ``fc2`` is ``(mlp_dim, D)``.
    """

    mlp_dim: int
    dropout: float = 0.0
    deterministic: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = _mlp_dense(self.dtype, self.param_dtype)
        gate, value = jnp.split(Dense(2 * self.mlp_dim, name="fc1", **dense)(x), 2, axis=-1)
        y = jax.nn.silu(gate) * value
        y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
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


class EncoderBlock(nn.Module):
    """``(N, T, D) -> (N, T, D)``: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``layer_scale_init`` scales each branch by a learned ``(D,)`` vector
    (``ls1``, ``ls2``) before the residual; ``mlp_type="swiglu"`` uses
    ``SwiGLUMlp`` (``mlp_dim`` is then the width of each half).

    Called as ``block(x, drop_path_rate) -> (x, None)``, the form ``nn.scan``
    wants; the rate is an array so scanned blocks can each have their own.
    """

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    use_drop_path: bool = False
    activation: str = "gelu"
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    layer_scale_init: float | None = None
    mlp_type: str = "mlp"
    rope_grid: tuple[int, int] | None = None
    rope_prefix_tokens: int = 0
    rope_theta: float = 100.0
    gelu_approximate: bool = False  # deprecated: activation="gelu_tanh", until jaxvit 0.3
    deterministic: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, drop_path_rate: Array) -> tuple[Array, None]:
        chex.assert_rank(x, 3)
        norm = dict(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype)

        def residual(x: Array, y: Array, scale_name: str) -> Array:
            if self.layer_scale_init is not None:
                y = LayerScale(
                    init_value=self.layer_scale_init,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=scale_name,
                )(y)
            y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
            if self.use_drop_path and not self.deterministic:
                y = drop_path(y, drop_path_rate, self.make_rng("dropout"))
            return x + y

        y = nn.LayerNorm(name="norm1", **norm)(x)
        y = SelfAttention(
            num_heads=self.num_heads,
            attention_dropout=self.attention_dropout,
            qkv_bias=self.qkv_bias,
            rope_grid=self.rope_grid,
            rope_prefix_tokens=self.rope_prefix_tokens,
            rope_theta=self.rope_theta,
            name="attn",
            **common,
        )(y)
        x = residual(x, y, "ls1")
        y = nn.LayerNorm(name="norm2", **norm)(x)
        check_choice("mlp_type", self.mlp_type, MLP_TYPES)
        if self.mlp_type == "swiglu":
            y = SwiGLUMlp(mlp_dim=self.mlp_dim, dropout=self.dropout, name="mlp", **common)(y)
        else:
            y = MlpBlock(
                mlp_dim=self.mlp_dim,
                dropout=self.dropout,
                activation=resolve_activation(self.activation, self.gelu_approximate),
                name="mlp",
                **common,
            )(y)
        x = residual(x, y, "ls2")
        _sow(self, "intermediates", "out", x)
        return x, None


class Encoder(nn.Module):
    """``(N, T, D) -> (N, T, D)``: ``depth`` blocks, then a final LayerNorm.

    ``pre_norm=True`` adds a LayerNorm before the blocks (``norm_pre``, CLIP's
    ``pre_layrnorm``). Works on any tokens, not only those of images. ``scan=True`` stacks the
    blocks' parameters along a leading ``depth`` axis under ``blocks`` and
    compiles one block; ``scan_to_unrolled`` / ``unrolled_to_scan`` convert
    between that layout and ``block_0 ... block_{depth-1}``.
    Drop-path rates grow linearly from 0 to ``drop_path_rate`` over the depth.
    ``rope_grid`` turns on DINOv3's rotary position embedding in every block.
    """

    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    activation: str = "gelu"
    qkv_bias: bool = True
    pre_norm: bool = False
    layer_norm_eps: float = 1e-6
    layer_scale_init: float | None = None
    mlp_type: str = "mlp"
    rope_grid: tuple[int, int] | None = None
    rope_prefix_tokens: int = 0
    rope_theta: float = 100.0
    scan: bool = False
    remat_policy: str = "auto"
    block_loop: str = "auto"
    gelu_approximate: bool = False  # deprecated: activation="gelu_tanh", until jaxvit 0.3
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        chex.assert_rank(x, 3)
        check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        check_choice("block_loop", self.block_loop, BLOCK_LOOPS)
        norm = dict(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.pre_norm:
            x = nn.LayerNorm(name="norm_pre", **norm)(x)
        kw = dict(
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            use_drop_path=self.drop_path_rate > 0.0,
            activation=resolve_activation(self.activation, self.gelu_approximate),
            qkv_bias=self.qkv_bias,
            layer_norm_eps=self.layer_norm_eps,
            layer_scale_init=self.layer_scale_init,
            mlp_type=self.mlp_type,
            rope_grid=self.rope_grid,
            rope_prefix_tokens=self.rope_prefix_tokens,
            rope_theta=self.rope_theta,
            deterministic=not train,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        rates = jnp.linspace(0.0, self.drop_path_rate, self.depth, dtype=jnp.float32)
        if self.scan:
            block_cls = self._remat(EncoderBlock, self._remat_policy(scanned=True), prevent_cse=False)
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0, "intermediates": 0, "attention": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=0,
                length=self.depth,
            )
            x, _ = stack(name="blocks", **kw)(x, rates)
        elif self._loop_over_stacked_blocks(train):
            x = self._scan_unrolled_blocks(x, rates, train, kw)
        else:
            block_cls = self._remat(EncoderBlock, self._remat_policy(scanned=False), prevent_cse=True)
            for i in range(self.depth):
                x, _ = block_cls(name=f"block_{i}", **kw)(x, rates[i])
        return nn.LayerNorm(name="norm", **norm)(x)

    def _remat_policy(self, scanned: bool) -> str:
        if self.remat_policy == "auto":
            return "dots_with_no_batch_dims_saveable" if scanned else "none"
        return self.remat_policy

    @staticmethod
    def _remat(block_cls: Any, policy: str, prevent_cse: bool) -> Any:
        if policy == "none":
            return block_cls
        return nn.remat(block_cls, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=prevent_cse)

    def _loop_over_stacked_blocks(self, train: bool) -> bool:
        # Sown collections and init need the blocks as submodules of their own.
        if self.block_loop == "unrolled" or self.is_initializing() or self.depth < 2:
            return False
        if self.is_mutable_collection("intermediates") or self.is_mutable_collection("attention"):
            return False
        return self.block_loop == "scan" or train

    def _scan_unrolled_blocks(self, x: Array, rates: Array, train: bool, kw: dict[str, Any]) -> Array:
        """The ``block_{i}`` parameters stacked and run as one ``lax.scan``: XLA compiles one block,
        and the backward pass keeps a third of the memory (benchmarks/README.md). Same parameters,
        same values as the unrolled loop."""
        params = self.variables["params"]
        missing = [f"block_{i}" for i in range(self.depth) if f"block_{i}" not in params]
        if missing:
            raise ValueError(
                f"the encoder's params lack {missing[:3]}: expected block_0..block_{self.depth - 1}"
            )
        stacked = jax.tree_util.tree_map(
            lambda *a: jnp.stack(a), *(params[f"block_{i}"] for i in range(self.depth))
        )
        block = EncoderBlock(**kw)
        needs_rng = train and (self.dropout > 0 or self.attention_dropout > 0 or self.drop_path_rate > 0)
        keys = (
            jax.random.split(self.make_rng("dropout"), self.depth) if needs_rng else jnp.zeros((self.depth,))
        )

        def one_block(x: Array, inputs: tuple[Any, Array, Array]) -> tuple[Array, None]:
            block_params, rate, key = inputs
            rngs = {"dropout": key} if needs_rng else {}
            return block.apply({"params": block_params}, x, rate, rngs=rngs)[0], None

        policy = self._remat_policy(scanned=True)
        if policy != "none":
            one_block = jax.checkpoint(one_block, policy=getattr(jax.checkpoint_policies, policy))
        x, _ = jax.lax.scan(one_block, x, (stacked, rates, keys))
        return x


# ---------------------------------------------------------------------------
# 4. Head
# ---------------------------------------------------------------------------


class MAPHead(nn.Module):
    """``(N, T, D) -> (N, D)``: multi-head attention pooling with a learned probe."""

    num_heads: int
    mlp_dim: int | None = None
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"
    gelu_approximate: bool = False  # deprecated: activation="gelu_tanh", until jaxvit 0.3
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
        probe = jnp.broadcast_to(probe.astype(self.dtype), (n, 1, d))
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            qkv_dot_general=ops.dot_general,
            out_dot_general=ops.dot_general,
            name="attn",
        )(probe, x)
        z = nn.LayerNorm(
            epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )(y)
        y = y + MlpBlock(
            mlp_dim=self.mlp_dim or 4 * d,
            activation=resolve_activation(self.activation, self.gelu_approximate),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(z)
        return y[:, 0]


class Head(nn.Module):
    """``(N, P + S, D) -> (N, num_classes)``, or ``(N, D')`` features when ``num_classes=0``.

    ``pool``: ``"tok"`` takes the class token, ``"gap"`` the mean of the
    ``S`` patch tokens (after all ``P`` prefix tokens: class, distillation,
    registers), ``"map"`` attention pooling. ``representation_size`` adds
    ``Dense + tanh`` (``pre_logits``) before the zero-init classifier;
    ``use_classifier_bias=False`` leaves out its bias (a projection such as
    CLIP's ``visual_projection``). ``distill_token`` (DeiT; ``pool="tok"``):
    token 1 is the distillation token, with its own ``dist_classifier``; the
    logits are the mean of both classifiers' and the features the mean of both
    tokens, as timm's distilled models and transformers'
    ``DeiTForImageClassificationWithTeacher`` give them at inference.
    """

    num_classes: int
    pool: str = "tok"
    num_prefix_tokens: int = 1
    distill_token: bool = False
    representation_size: int | None = None
    num_heads: int = 1
    mlp_dim: int | None = None
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"
    classifier_bias: float = 0.0
    use_classifier_bias: bool = True
    gelu_approximate: bool = False  # deprecated: activation="gelu_tanh", until jaxvit 0.3
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    bias_init: float | None = None  # deprecated name of classifier_bias, until jaxvit 0.3

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, _, d = x.shape
        classifier_bias = self.classifier_bias
        if self.bias_init is not None:
            warnings.warn(
                "Head.bias_init is deprecated: use classifier_bias", DeprecationWarning, stacklevel=2
            )
            classifier_bias = self.bias_init
        dist = None
        if self.distill_token:
            check_distill_pool(self.pool)
            dist = x[:, 1]
        if self.pool == "tok":
            check_pool_has_token(self.pool, self.num_prefix_tokens >= 1)
            x = x[:, 0]
        elif self.pool == "gap":
            x = jnp.mean(x[:, self.num_prefix_tokens :], axis=1)
        elif self.pool == "map":
            x = MAPHead(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                layer_norm_eps=self.layer_norm_eps,
                activation=resolve_activation(self.activation, self.gelu_approximate),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="map",
            )(x)
        else:
            check_choice("pool", self.pool, POOLINGS)
        chex.assert_shape(x, (n, d))
        if self.representation_size:
            x = Dense(
                self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype, name="pre_logits"
            )(x)
            x = jnp.tanh(x)
        classifier = dict(
            use_bias=self.use_classifier_bias,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.constant(classifier_bias),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        _sow(self, "intermediates", "features", x if dist is None else (x + dist) / 2)
        if not self.num_classes:
            return x if dist is None else (x + dist) / 2
        logits = Dense(self.num_classes, name="classifier", **classifier)(x)
        if dist is not None:
            logits = (logits + Dense(self.num_classes, name="dist_classifier", **classifier)(dist)) / 2
        return logits


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """``(N, H, W, C) -> (N, num_classes)`` logits (or pooled features when ``num_classes=0``).

    Intermediate outputs come through ``sow``: ``mutable=["intermediates"]``
    returns the patch tokens, each block's output, the encoder output
    ``encoded`` (all tokens after the final LayerNorm, in the order ``[cls,
    dist, registers..., patches]``) and the pooled ``features`` (what the
    classifier sees); ``mutable=["attention"]`` returns every block's
    attention weights ``(N, heads, T, T)`` (see ``attention_weights``).

    Options of today's backbones, all off by default: ``num_registers``
    (DINOv2 registers), ``layer_scale_init`` (LayerScale on both residual
    branches), ``mlp_type="swiglu"`` (DINOv2-g's MLP; ``mlp_dim`` is then the
    width of each half, see ``swiglu_hidden_size``), ``distill_token``
    (DeiT's distillation token and second classifier), ``posemb="rope"``
    (DINOv3's 2-D rotary embedding of the patch tokens' queries and keys,
    base ``rope_theta``) and ``posemb="none"``.
    """

    num_classes: int = 1000
    patch_size: PatchSize = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int | None = None
    num_heads: int = 12
    num_channels: int = 3
    posemb: str = "learn"
    class_token: bool = True
    pool: str = "tok"
    representation_size: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    activation: str = "gelu"
    pre_norm: bool = False
    patch_bias: bool = True
    qkv_bias: bool = True
    head_bias: bool = True
    layer_norm_eps: float = 1e-6
    head_bias_init: float = 0.0
    num_registers: int = 0
    layer_scale_init: float | None = None
    mlp_type: str = "mlp"
    distill_token: bool = False
    rope_theta: float = 100.0
    gelu_approximate: bool = False  # deprecated: activation="gelu_tanh", until jaxvit 0.3
    scan: bool = False
    remat_policy: str = "auto"
    block_loop: str = "auto"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    def check_config(self) -> None:
        """Raises ``ValueError`` for fields that cannot build a model."""
        check_choice("pool", self.pool, POOLINGS)
        check_choice("posemb", self.posemb, POSEMBS)
        check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        check_choice("block_loop", self.block_loop, BLOCK_LOOPS)
        resolve_activation(self.activation, self.gelu_approximate)
        check_pool_has_token(self.pool, self.class_token)
        check_choice("mlp_type", self.mlp_type, MLP_TYPES)
        if self.distill_token:
            check_distill_pool(self.pool)
            if not self.class_token or self.representation_size:
                raise ValueError(
                    "distill_token=True needs class_token=True and no representation_size, got"
                    f" class_token={self.class_token}, representation_size={self.representation_size}"
                )
        if self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {self.num_registers}")
        if self.width < 1 or self.depth < 0 or self.num_heads < 1:
            raise ValueError(
                f"width, depth, num_heads must be positive, got {self.width}, {self.depth}, {self.num_heads}"
            )
        check_heads(self.width, self.num_heads)
        if self.posemb == "sincos2d":
            check_sincos_width(self.width)
        if self.posemb == "rope" and (self.width // self.num_heads) % 4:
            raise ValueError(
                f"posemb='rope' needs a head dimension divisible by 4, got {self.width // self.num_heads}"
            )
        if min(to_pair(self.patch_size)) < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patches: class, distillation and register tokens."""
        return int(self.class_token) + int(self.distill_token) + self.num_registers

    @property
    def num_posemb_prefix_tokens(self) -> int:
        """Prefix slots of the position embedding: the class and distillation tokens (registers get none)."""
        return int(self.class_token) + int(self.distill_token)

    def patch_grid(self, images: Any) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of ``images`` ``(N, H, W, C)``; ``ValueError`` unless they fit the model.

        Takes arrays and ``jax.ShapeDtypeStruct``s alike, so it checks before anything is traced.
        """
        shape = tuple(np.shape(images))
        if len(shape) != 4:
            raise ValueError(f"images must be rank 4 (N, H, W, C), got shape {shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be floating point, got dtype {images.dtype}")
        _, height, width, channels = shape
        p, q = to_pair(self.patch_size)
        if height % p or width % q:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}x{q}")
        if height < p or width < q:
            raise ValueError(f"image size {height}x{width} is smaller than the patch size {p}x{q}")
        if channels != self.num_channels:
            raise ValueError(
                f"images have {channels} channels but the model expects num_channels={self.num_channels}"
                " (NHWC layout)"
            )
        return height // p, width // q

    def check_images(self, images: Any) -> tuple[int, int]:
        """Deprecated name of ``patch_grid`` (until jaxvit 0.3)."""
        warnings.warn("check_images is deprecated: use patch_grid", DeprecationWarning, stacklevel=2)
        return self.patch_grid(images)

    @nn.compact
    def __call__(self, images: Array, *, train: bool = False) -> Array:
        self.check_config()
        grid = self.patch_grid(images)
        n = images.shape[0]
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        activation = resolve_activation(self.activation, self.gelu_approximate)

        x = PatchEmbed(
            width=self.width,
            patch_size=self.patch_size,
            use_bias=self.patch_bias,
            name="patch_embed",
            **common,
        )(images)
        _sow(self, "intermediates", "patch_tokens", x)

        if self.distill_token:  # goes in first, so it ends up behind the class token
            x = ClassToken(name="dist_token", **common)(x)
        if self.class_token:
            x = ClassToken(name="cls_token", **common)(x)
        x = PositionEmbedding(
            grid=grid,
            kind=self.posemb,
            num_prefix_tokens=self.num_posemb_prefix_tokens,
            name="pos_embed",
            **common,
        )(x)
        if self.num_registers:
            x = RegisterTokens(
                num_tokens=self.num_registers,
                num_prefix_tokens=self.num_posemb_prefix_tokens,
                name="registers",
                **common,
            )(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        chex.assert_shape(x, (n, self.num_prefix_tokens + grid[0] * grid[1], self.width))

        mlp_dim = self.mlp_dim or 4 * self.width
        x = Encoder(
            depth=self.depth,
            mlp_dim=mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            drop_path_rate=self.drop_path_rate,
            activation=activation,
            qkv_bias=self.qkv_bias,
            pre_norm=self.pre_norm,
            layer_norm_eps=self.layer_norm_eps,
            layer_scale_init=self.layer_scale_init,
            mlp_type=self.mlp_type,
            rope_grid=grid if self.posemb == "rope" else None,
            rope_prefix_tokens=self.num_prefix_tokens,
            rope_theta=self.rope_theta,
            scan=self.scan,
            remat_policy=self.remat_policy,
            block_loop=self.block_loop,
            name="encoder",
            **common,
        )(x, train=train)
        _sow(self, "intermediates", "encoded", x)

        out = Head(
            num_classes=self.num_classes,
            pool=self.pool,
            num_prefix_tokens=self.num_prefix_tokens,
            distill_token=self.distill_token,
            representation_size=self.representation_size,
            num_heads=self.num_heads,
            mlp_dim=mlp_dim,
            layer_norm_eps=self.layer_norm_eps,
            activation=activation,
            classifier_bias=self.head_bias_init,
            use_classifier_bias=self.head_bias,
            name="head",
            **common,
        )(x)
        chex.assert_shape(out, (n, self.num_classes or self.representation_size or self.width))
        return out


MODEL_FIELDS = tuple(
    f.name for f in dataclasses.fields(VisionTransformer) if f.name not in ("parent", "name")
)


def create_model(variant: str | None = None, num_classes: int = 1000, **overrides: Any) -> VisionTransformer:
    """``create_model("B/16", num_classes=10, pool="gap")`` -> a ``VisionTransformer``.

    ``variant`` sets width, depth, mlp_dim, num_heads and (if given) the
    patch size; any field of ``VisionTransformer`` can be overridden.
    """
    unknown = sorted(set(overrides) - set(MODEL_FIELDS))
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}: valid fields are {sorted(MODEL_FIELDS)}")
    fields = decode_variant(variant) if variant else {}
    fields.update(overrides)
    model = VisionTransformer(num_classes=num_classes, **fields)
    model.check_config()
    return model


def param_shapes(model: nn.Module, image_size: int | tuple[int, int] = 224) -> dict[str, Any]:
    """The ``params`` tree of ``model`` at ``image_size`` with ``jax.ShapeDtypeStruct`` leaves.

    Nothing is allocated (``jax.eval_shape`` of ``init``).
    """
    height, width = to_pair(image_size)
    channels = getattr(model, "num_channels", 3)
    images = jax.ShapeDtypeStruct((1, height, width, channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return dict(variables.get("params", {}))


def count_params(model: nn.Module, image_size: int | tuple[int, int] = 224) -> int:
    """The number of parameters of ``model`` at ``image_size``, without allocating them."""
    leaves = jax.tree_util.tree_leaves(param_shapes(model, image_size))
    return sum(math.prod(a.shape) for a in leaves)


def attention_weights(
    model: VisionTransformer, variables: Mapping[str, Any], images: Array, block: int | None = None
) -> Array:
    """Attention weights ``(depth, N, heads, T, T)``, or ``(N, heads, T, T)`` for one ``block``.

    Works for scanned and unrolled models; runs the model once in eval mode.
    """
    _, state = model.apply(variables, images, train=False, mutable=["attention"])
    blocks = state["attention"]["encoder"]
    if model.scan:
        stacked = blocks["blocks"]["attn"]["weights"][0]
    else:
        stacked = jnp.stack([blocks[f"block_{i}"]["attn"]["weights"][0] for i in range(model.depth)])
    return stacked if block is None else stacked[block]


__all__: Sequence[str] = (
    "VARIANTS",
    "FAMILY_VARIANTS",
    "VisionTransformer",
    "PatchEmbed",
    "ClassToken",
    "PositionEmbedding",
    "RegisterTokens",
    "LayerScale",
    "SwiGLUMlp",
    "swiglu_hidden_size",
    "resize_matrix",
    "SelfAttention",
    "MlpBlock",
    "EncoderBlock",
    "Encoder",
    "MAPHead",
    "Head",
    "create_model",
    "decode_variant",
    "patchify",
    "unpatchify",
    "posemb_sincos_2d",
    "resample_posemb",
    "resize_matrix",
    "drop_path",
    "scan_to_unrolled",
    "unrolled_to_scan",
    "count_params",
    "param_shapes",
    "square_grid",
    "attention_weights",
    "to_pair",
)
