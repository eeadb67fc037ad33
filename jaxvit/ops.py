"""Kernels the model's layers are computed with, chosen for speed and memory.

``activation`` (GELU exact or tanh, QuickGELU) and ``softmax`` have the
values of the reference formulas but derivatives that keep one array each for the backward pass (benchmarks/README.md has the
memory figures). ``explicit_attention`` is the heads-major attention the CPU
runs; ``set_attention_impl`` chooses between it and
``jax.nn.dot_product_attention``, as timm's ``set_fused_attn`` does for its
models.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# They are custom JVPs (not VJPs), so forward-mode and higher derivatives work.


def _shifted_exp(x: Array) -> Array:
    """``exp(x - max)`` over the last axis: the softmax's numerator, without overflow."""
    return jnp.exp(x - jax.lax.stop_gradient(x.max(axis=-1, keepdims=True)))


@jax.custom_jvp
def softmax(x: Array) -> Array:
    """Softmax over the last axis; its derivative keeps only the output."""
    unnormalized = _shifted_exp(x)
    # One reciprocal per row and a multiply: XLA:CPU divides elementwise otherwise (about 1.5x slower).
    return unnormalized * (1.0 / unnormalized.sum(axis=-1, keepdims=True))


@softmax.defjvp
def _softmax_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (dx,) = primals, tangents
    y = softmax(x)
    return y, y * (dx - (y * dx).sum(axis=-1, keepdims=True))


_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# QuickGELU's slope constant: x * sigmoid(1.702 x) is CLIP's cheap stand-in for GELU.
_QUICK_GELU_SLOPE = 1.702

# The activations of the encoder MLP, by the names VisionTransformer.activation takes.
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def _activation_and_slope(x: Array, name: str) -> tuple[Array, Array]:
    """``(f(x), f'(x))`` of the activation ``name``, from one shared computation."""
    if name == "gelu_tanh":  # the same expression as jax.nn.gelu(approximate=True), and its derivative
        t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * (x**3)))
        cdf = 0.5 * (1.0 + t)
        slope = cdf + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
        return x * cdf, slope
    if name == "gelu":
        # PyTorch's erf form: XLA:CPU expands erfc into two branches with a division, about
        # three times the cost of erf, and splits them over several loop fusions.
        cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
        slope = cdf + x * jnp.exp(-0.5 * x * x) * (_SQRT_HALF / math.sqrt(math.pi))
        return x * cdf, slope
    if name == "quick_gelu":
        s = jax.nn.sigmoid(_QUICK_GELU_SLOPE * x)
        return x * s, s + _QUICK_GELU_SLOPE * x * s * (1.0 - s)
    raise ValueError(f"unknown activation {name!r}: expected one of {ACTIVATIONS}")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def activation(x: Array, name: str = "gelu") -> Array:
    """The MLP activation ``name`` (one of ``ACTIVATIONS``), elementwise; its derivative keeps one array.

    ``"gelu"``: exact erf form; ``"gelu_tanh"``: the tanh approximation;
    ``"quick_gelu"``: ``x * sigmoid(1.702 x)`` (CLIP).
    """
    return _activation_and_slope(x, name)[0]


@activation.defjvp
def _activation_jvp(name: str, primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (dx,) = primals, tangents
    y, slope = _activation_and_slope(x, name)
    return y, slope * dx


def gelu(x: Array, approximate: bool = False) -> Array:
    """``jax.nn.gelu`` (exact erf form, or the tanh approximation) whose derivative keeps one array."""
    return activation(x, "gelu_tanh" if approximate else "gelu")


def explicit_attention(
    q: Array, k: Array, v: Array, weights_fn: Callable[[Array], Array] | None = None
) -> Array:
    """``(N, H, T, Dh)`` x3 -> ``(N, H, T, Dh)``: ``softmax(q k^T / sqrt(Dh)) v``, heads-major.

    Heads-major operands make both products plain batched matmuls, forward and
    backward, which XLA:CPU runs much faster than the ``(N, T, H, Dh)`` layout
    of ``jax.nn.dot_product_attention`` (see benchmarks/README.md). The softmax
    runs in float32. ``weights_fn`` sees (and may replace, e.g. with dropout)
    the weights ``(N, H, T, T)``; without it the forward pass normalizes the
    rows after the product with ``v`` (same values, less work).
    """
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    if weights_fn is None:
        return _attend(q, k, v)
    return _attend_with(q, k, v, weights_fn)


def _attend_with(q: Array, k: Array, v: Array, weights_fn: Callable[[Array], Array]) -> Array:
    weights = weights_fn(softmax(jnp.einsum("nhqd,nhkd->nhqk", q, k).astype(jnp.float32)))
    return jnp.einsum("nhqk,nhkd->nhqd", weights.astype(v.dtype), v)


@jax.custom_jvp
def _attend(q: Array, k: Array, v: Array) -> Array:
    # Without derivatives (inference) the rows are normalized after the product
    # with v: a multiply of (T, Dh) values per head instead of (T, T), about 8%
    # of a 2-core CPU's inference step. Derivatives take the softmax-first form,
    # whose backward pass is more accurate in bfloat16.
    unnormalized = _shifted_exp(jnp.einsum("nhqd,nhkd->nhqk", q, k).astype(jnp.float32))
    out = jnp.einsum("nhqk,nhkd->nhqd", unnormalized.astype(v.dtype), v)
    return (out * (1.0 / unnormalized.sum(axis=-1, keepdims=True))).astype(v.dtype)


@_attend.defjvp
def _attend_jvp(primals: tuple[Array, ...], tangents: tuple[Array, ...]) -> tuple[Array, Array]:
    return jax.jvp(lambda q, k, v: _attend_with(q, k, v, lambda w: w), primals, tangents)


# ---------------------------------------------------------------------------
# The attention switch
# ---------------------------------------------------------------------------

ATTENTION_IMPLS = ("auto", "explicit", "fused")
_attention_impl = "auto"


def set_attention_impl(impl: str) -> None:
    """Chooses how ``SelfAttention`` computes attention, for every model traced after the call.

    ``"auto"`` (the default): ``explicit_attention`` on the CPU backend,
    where it is faster, and ``jax.nn.dot_product_attention`` (fused kernels
    where the backend has them) on GPU/TPU. ``"explicit"`` and ``"fused"``
    force one path. The choice is read at trace time: functions that
    ``jax.jit`` already compiled keep the path they were traced with.
    """
    global _attention_impl
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}: expected one of {ATTENTION_IMPLS}")
    _attention_impl = impl


def get_attention_impl() -> str:
    """The current choice of ``set_attention_impl``."""
    return _attention_impl


@contextlib.contextmanager
def attention_impl(impl: str) -> Iterator[None]:
    """``with attention_impl("fused"): ...`` sets the attention path inside the block only."""
    previous = get_attention_impl()
    set_attention_impl(impl)
    try:
        yield
    finally:
        set_attention_impl(previous)


def use_explicit_attention() -> bool:
    """Whether ``SelfAttention`` takes ``explicit_attention`` now (see ``set_attention_impl``)."""
    if _attention_impl == "auto":
        return jax.default_backend() == "cpu"
    return _attention_impl == "explicit"


# ---------------------------------------------------------------------------
# PyTorch's resize weights (position embeddings at another resolution)
# ---------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """The cubic convolution kernel with parameter ``a`` (-0.75 in torch's plain bicubic, -0.5 with antialias)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def resize_matrix(in_size: int, out_size: int, method: str, antialias: bool) -> np.ndarray:
    """``(out_size, in_size)`` float64 weights of ``torch.nn.functional.interpolate`` along one axis.

    ``align_corners=False``. Without antialias (``"bicubic"`` only): four taps
    around ``scale * (i + 0.5) - 0.5`` with ``a = -0.75``, indices clamped at
    the border. With antialias: the kernel (``a = -0.5`` cubic, or triangle) is
    widened by the scale when shrinking, cut at the border and renormalised.
    """
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size))
    if not antialias:
        if method != "bicubic":
            raise ValueError("resize_matrix without antialias is for method='bicubic'")
        source = scale * (np.arange(out_size) + 0.5) - 0.5
        base = np.floor(source)
        t = source - base
        for tap in range(-1, 3):
            index = np.clip(base + tap, 0, in_size - 1).astype(int)
            np.add.at(weights, (np.arange(out_size), index), _cubic(t - tap, -0.75))
        return weights
    support = (2.0 if method == "bicubic" else 1.0) * max(scale, 1.0)
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        offsets = (np.arange(lo, hi) - center + 0.5) * inv_scale
        row = _cubic(offsets, -0.5) if method == "bicubic" else _triangle(offsets)
        total = row.sum()
        weights[i, lo:hi] = row / total if total != 0 else row
    return weights
