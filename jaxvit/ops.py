"""Kernels the model's layers are computed with, chosen for speed and memory.

``activation`` (GELU exact or tanh, QuickGELU) and ``softmax`` have the
values of the reference formulas but derivatives that keep one array each for the backward pass (benchmarks/README.md has the
memory figures). ``explicit_attention`` is the heads-major attention the CPU
runs; ``set_attention_impl`` chooses between it and
``jax.nn.dot_product_attention``, as timm's ``set_fused_attn`` does for its
models. ``dot_general`` (every product of the model) takes XLA:CPU's fast
bfloat16 kernels; ``set_product_impl`` turns that off. The CPU paths are chosen by
the platform a function is compiled for (``on_cpu``), so a step compiled for a
TPU or GPU from a CPU-only machine gets the accelerator paths.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# activation and softmax have custom JVPs (not VJPs), so forward-mode and higher derivatives
# work; the bfloat16 products further down have custom VJPs (see set_product_impl).


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
    q: Array,
    k: Array,
    v: Array,
    weights_fn: Callable[[Array], Array] | None = None,
    bias: Array | None = None,
) -> Array:
    """``(N, H, T, Dh)`` x3 -> ``(N, H, T, Dh)``: ``softmax(q k^T / sqrt(Dh) + bias) v``, heads-major.

    Heads-major operands make both products plain batched matmuls, forward and
    backward, which XLA:CPU runs much faster than the ``(N, T, H, Dh)`` layout
    of ``jax.nn.dot_product_attention`` (see benchmarks/README.md). The softmax
    runs in float32. ``weights_fn`` sees (and may replace, e.g. with dropout)
    the weights ``(N, H, T, T)``; without it the forward pass normalizes the
    rows after the product with ``v`` (same values, less work). ``bias`` ``(H, T, T)`` (or
    broadcastable to ``(N, H, T, T)``: BEiT's relative position bias) is added to the logits in float32.
    """
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    if bias is not None:
        return _attend_with(q, k, v, weights_fn or (lambda w: w), bias)
    if weights_fn is None:
        return on_cpu(_attend_bf16, _attend, q, k, v) if _takes_fast_product(q, k) else _attend(q, k, v)
    return _attend_with(q, k, v, weights_fn)


def _attend_with(
    q: Array, k: Array, v: Array, weights_fn: Callable[[Array], Array], bias: Array | None = None
) -> Array:
    logits = einsum("nhqd,nhkd->nhqk", q, k, jnp.float32)
    weights = weights_fn(softmax(logits if bias is None else logits + bias.astype(jnp.float32)))
    return einsum("nhqk,nhkd->nhqd", weights.astype(v.dtype), v)


def _attend_normalizing_after(q: Array, k: Array, v: Array) -> Array:
    # Without derivatives (inference) the rows are normalized after the product
    # with v: a multiply of (T, Dh) values per head instead of (T, T), about 8%
    # of a 2-core CPU's inference step. Derivatives take the softmax-first form,
    # whose backward pass is more accurate in bfloat16.
    unnormalized = _shifted_exp(einsum("nhqd,nhkd->nhqk", q, k, jnp.float32))
    out = einsum("nhqk,nhkd->nhqd", unnormalized.astype(v.dtype), v)
    return (out * (1.0 / unnormalized.sum(axis=-1, keepdims=True))).astype(v.dtype)


_attend = jax.custom_jvp(_attend_normalizing_after)


@_attend.defjvp
def _attend_jvp(primals: tuple[Array, ...], tangents: tuple[Array, ...]) -> tuple[Array, Array]:
    return jax.jvp(lambda q, k, v: _attend_with(q, k, v, lambda w: w), primals, tangents)


def _with_vjp_of(reference: Callable[..., Array], inference: Callable[..., Array]) -> Callable[..., Array]:
    """``inference``'s values without derivatives; ``reference``'s values and VJP with them.

    For bfloat16 products, whose rules are custom VJPs (a custom JVP cannot differentiate them).
    """
    f = jax.custom_vjp(inference)
    f.defvjp(lambda *args: jax.vjp(reference, *args), lambda vjp, ct: vjp(ct))
    return f


_attend_bf16 = _with_vjp_of(lambda q, k, v: _attend_with(q, k, v, lambda w: w), _attend_normalizing_after)


# ---------------------------------------------------------------------------
# Products of bfloat16 operands
# ---------------------------------------------------------------------------

# XLA:CPU runs a bfloat16 x bfloat16 product on its fast kernels (AMX or
# AVX512_BF16, ~6x its float32 matmul) only when asked for a float32 result;
# for a bfloat16 result it converts both operands and multiplies in float32.
_FAST_PRODUCT_DTYPES = (jnp.dtype(jnp.bfloat16),)
PRODUCT_IMPLS = ("auto", "plain")
_product_impl = "auto"


def set_product_impl(impl: str) -> None:
    """Chooses how ``dot_general`` (every product of the model) multiplies, for models traced after the call.

    ``"auto"`` (the default): where the function is compiled for the CPU
    (``on_cpu``), two bfloat16 operands are multiplied into a float32
    accumulator that is then rounded, forward and backward, which takes
    XLA:CPU's bfloat16 kernels; for GPU/TPU, ``lax.dot_general`` as it is. Its
    derivatives are custom VJPs: reverse mode of any order, under ``vmap`` too.
    Both paths are traced whatever the platform, so forward mode (``jax.jvp``,
    ``jax.jacfwd``, a Hessian) of a bfloat16 model needs ``"plain"``:
    ``lax.dot_general`` as it is, on every backend and dtype.
    """
    global _product_impl
    if impl not in PRODUCT_IMPLS:
        raise ValueError(f"unknown product impl {impl!r}: expected one of {PRODUCT_IMPLS}")
    _product_impl = impl


def get_product_impl() -> str:
    """The current choice of ``set_product_impl``."""
    return _product_impl


def product_impl(impl: str) -> contextlib.AbstractContextManager[None]:
    """``with product_impl("plain"): ...`` sets the product path inside the block only."""
    return _temporarily(set_product_impl, get_product_impl, impl)


def _takes_fast_product(lhs: Array, rhs: Array) -> bool:
    """Whether the operands may take the CPU's bfloat16 path (``on_cpu`` then picks it by platform)."""
    return _product_impl == "auto" and lhs.dtype == rhs.dtype and lhs.dtype in _FAST_PRODUCT_DTYPES


def on_cpu(cpu: Callable[..., Array], other: Callable[..., Array], *args: Array) -> Array:
    """``cpu(*args)`` where the function is compiled for the CPU, ``other(*args)`` elsewhere.

    The choice follows the platform the caller is lowered for (``jax.lax.platform_dependent``),
    not the process's default backend: a step compiled for a TPU topology from a CPU-only
    machine gets the accelerator paths. Both are traced; only the chosen one is compiled.
    """
    return jax.lax.platform_dependent(*args, cpu=cpu, default=other)


def _einsum_spec(dimension_numbers: jax.lax.DotDimensionNumbers, lhs_ndim: int, rhs_ndim: int) -> str:
    """The ``einsum`` spec of a ``lax.dot_general``, whose output is batch, lhs free, rhs free dims."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    letters = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    lhs, rhs = [""] * lhs_ndim, [""] * rhs_ndim
    for i, j in (*zip(lhs_batch, rhs_batch, strict=True), *zip(lhs_contract, rhs_contract, strict=True)):
        lhs[i] = rhs[j] = next(letters)
    free_lhs = [i for i in range(lhs_ndim) if not lhs[i]]
    free_rhs = [j for j in range(rhs_ndim) if not rhs[j]]
    for names, free in ((lhs, free_lhs), (rhs, free_rhs)):
        for i in free:
            names[i] = next(letters)
    out = [lhs[i] for i in lhs_batch] + [lhs[i] for i in free_lhs] + [rhs[j] for j in free_rhs]
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def _accumulated(spec: str, a: Array, b: Array, dtype: jnp.dtype) -> Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bf16_product(spec: str, dtype: jnp.dtype, a: Array, b: Array) -> Array:
    return _accumulated(spec, a, b, dtype)


def _bf16_product_fwd(spec: str, dtype: jnp.dtype, a: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    return _accumulated(spec, a, b, dtype), (a, b)


def _bf16_product_bwd(spec: str, dtype: jnp.dtype, ab: tuple[Array, Array], ct: Array) -> tuple[Array, Array]:
    # The cotangent is rounded to bfloat16 before each product, so the backward
    # products take the fast kernels too (autodiff of the forward would multiply
    # a float32 cotangent by a bfloat16 operand: the slow path).
    a, b = ab
    operands, out = spec.split("->")
    sa, sb = operands.split(",")
    ct = ct.astype(a.dtype)
    return _accumulated(f"{out},{sb}->{sa}", ct, b, a.dtype), _accumulated(
        f"{sa},{out}->{sb}", a, ct, b.dtype
    )


_bf16_product.defvjp(_bf16_product_fwd, _bf16_product_bwd)


def dot_general(
    lhs: Array,
    rhs: Array,
    dimension_numbers: jax.lax.DotDimensionNumbers,
    precision: jax.lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    **kwargs: object,
) -> Array:
    """``lax.dot_general`` on XLA:CPU's fast bfloat16 kernels (see ``set_product_impl``).

    Two bfloat16 operands on the CPU backend: the product accumulates in
    float32 and is rounded to ``preferred_element_type`` (default bfloat16),
    as GPUs and TPUs do; in the backward pass the cotangent is rounded to
    bfloat16 before each product, as PyTorch's autocast does. Anything else
    is ``lax.dot_general`` unchanged. Fits ``nn.Dense(dot_general=...)``.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if precision is not None or kwargs or not _takes_fast_product(lhs, rhs):
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type, **kwargs
        )
    spec = _einsum_spec(dimension_numbers, lhs.ndim, rhs.ndim)
    dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    return on_cpu(
        functools.partial(_bf16_product, spec, dtype),
        lambda a, b: jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=dtype),
        lhs,
        rhs,
    )


def einsum(spec: str, a: Array, b: Array, preferred_element_type: jnp.dtype | None = None) -> Array:
    """Two-operand ``jnp.einsum`` (no reduction over a dim of one operand alone), with ``dot_general``'s path."""
    if not _takes_fast_product(a, b):
        return _plain_einsum(spec, preferred_element_type, a, b)
    dtype = jnp.dtype(preferred_element_type or a.dtype)
    return on_cpu(
        functools.partial(_bf16_product, spec, dtype),
        functools.partial(_plain_einsum, spec, preferred_element_type),
        a,
        b,
    )


def _plain_einsum(spec: str, preferred_element_type: jnp.dtype | None, a: Array, b: Array) -> Array:
    out = jnp.einsum(spec, a, b)
    return out if preferred_element_type is None else out.astype(preferred_element_type)


def _bias_gradient(ct: Array, dtype: jnp.dtype) -> Array:
    # Over the flattened rows, in float32: autodiff's bfloat16 sum over (N, T)
    # becomes a tree of reduce-windows on XLA:CPU, tens of times slower.
    return ct.reshape(-1, ct.shape[-1]).astype(jnp.float32).sum(axis=0).astype(dtype)


@jax.custom_vjp
def _add_bf16_bias(y: Array, bias: Array) -> Array:
    return y + bias


def _add_bf16_bias_fwd(y: Array, bias: Array) -> tuple[Array, Array]:
    return y + bias, bias  # the (small) bias is kept for its dtype


def _add_bf16_bias_bwd(bias: Array, ct: Array) -> tuple[Array, Array]:
    return ct, _bias_gradient(ct, bias.dtype)


_add_bf16_bias.defvjp(_add_bf16_bias_fwd, _add_bf16_bias_bwd)


def add_bias(y: Array, bias: Array) -> Array:
    """``(..., M) + (M,)``; for bfloat16 on the CPU (``set_product_impl``) the bias gradient sums in float32."""
    if _takes_fast_product(y, bias):
        return on_cpu(_add_bf16_bias, jnp.add, y, bias)
    return y + bias


def _dense_dims(x: Array) -> jax.lax.DotDimensionNumbers:
    return (((x.ndim - 1,), (0,)), ((), ()))


def _dense_activation_plain(x: Array, kernel: Array, bias: Array | None, name: str | None) -> Array:
    y = dot_general(x, kernel, _dense_dims(x))
    y = y if bias is None else add_bias(y, bias)
    return y if name is None else activation(y, name)


def _dense_activation_inference(x: Array, kernel: Array, bias: Array, name: str) -> Array:
    # Without derivatives (inference) the activation reads the float32
    # accumulator and the result is rounded once: XLA:CPU then fuses the
    # epilogue instead of writing and reading the rounded product (about 10%
    # of a bfloat16 inference step). Derivatives take the plain form.
    spec = _einsum_spec(_dense_dims(x), x.ndim, kernel.ndim)
    y = _accumulated(spec, x, kernel, jnp.float32) + bias.astype(jnp.float32)
    return activation(y, name).astype(x.dtype)


@functools.cache
def _bf16_dense_activation(name: str) -> Callable[[Array, Array, Array], Array]:
    return _with_vjp_of(
        lambda x, k, b: _dense_activation_plain(x, k, b, name),
        lambda x, k, b: _dense_activation_inference(x, k, b, name),
    )


def dense_activation(x: Array, kernel: Array, bias: Array | None, name: str | None) -> Array:
    """``activation(x @ kernel + bias)``: ``(..., K) x (K, M) -> (..., M)``, ``name`` one of
    ``ACTIVATIONS`` or ``None`` (no activation).

    ``dot_general``, ``add_bias`` and ``activation`` in turn, except that in
    bfloat16 on the CPU, without derivatives, the activation reads the float32
    accumulator and the result is rounded once instead of twice. Derivatives,
    and the values computed with them, are the composition's.
    """
    if name is None or bias is None or not _takes_fast_product(x, kernel) or bias.dtype != x.dtype:
        return _dense_activation_plain(x, kernel, bias, name)
    return on_cpu(
        _bf16_dense_activation(name),
        functools.partial(_dense_activation_default, name=name),
        x,
        kernel,
        bias,
    )


def _dense_activation_default(x: Array, kernel: Array, bias: Array, name: str) -> Array:
    y = jax.lax.dot_general(x, kernel, _dense_dims(x)) + bias
    return activation(y, name)


# ---------------------------------------------------------------------------
# The attention switch
# ---------------------------------------------------------------------------

ATTENTION_IMPLS = ("auto", "explicit", "fused", "cudnn", "splash")
_attention_impl = "auto"
_splash_interpret = False


def set_attention_impl(impl: str, interpret: bool = False) -> None:
    """Chooses how ``SelfAttention`` computes attention, for every model traced after the call.

    ``"auto"`` (the default), by the platform the function is compiled for (``on_cpu``,
    not the process's default backend): ``explicit_attention`` for the CPU, where it is
    faster; cuDNN's fused attention for a GPU where ``cudnn_refusal`` allows it; XLA's
    ``jax.nn.dot_product_attention`` otherwise, TPUs included. ``"explicit"`` and
    ``"fused"`` (XLA's) force one path everywhere; ``"cudnn"`` (GPU) and ``"splash"`` (Pallas
    Splash attention, TPU) take their kernel on their platform and XLA's elsewhere or where
    the model needs what the kernel lacks, logging why (``cudnn_refusal``, ``splash_refusal``).
    ``interpret=True`` with ``"splash"`` runs the Pallas kernel in interpret mode on every
    platform (slow: for tests and debugging). The setting is read at trace time: functions
    that ``jax.jit`` already compiled keep the path they were traced with.
    """
    global _attention_impl, _splash_interpret
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}: expected one of {ATTENTION_IMPLS}")
    if interpret and impl != "splash":
        raise ValueError(f"interpret=True is for the Pallas kernel, impl='splash'; got impl={impl!r}")
    _attention_impl, _splash_interpret = impl, interpret


def splash_interpreted() -> bool:
    """Whether ``set_attention_impl("splash", interpret=True)`` is in force."""
    return _splash_interpret


def get_attention_impl() -> str:
    """The current choice of ``set_attention_impl``."""
    return _attention_impl


@contextlib.contextmanager
def attention_impl(impl: str, interpret: bool = False) -> Iterator[None]:
    """``with attention_impl("fused"): ...`` sets the attention path inside the block only."""
    previous = (_attention_impl, _splash_interpret)
    set_attention_impl(impl, interpret)
    try:
        yield
    finally:
        set_attention_impl(*previous)


@contextlib.contextmanager
def _temporarily(set_impl: Callable[[str], None], get_impl: Callable[[], str], impl: str) -> Iterator[None]:
    previous = get_impl()
    set_impl(impl)
    try:
        yield
    finally:
        set_impl(previous)


def use_explicit_attention(platform: str | None = None) -> bool:
    """Whether ``SelfAttention`` takes ``explicit_attention`` in a function compiled for ``platform``
    (``"cpu"``, ``"tpu"``, ``"cuda"``...; default: the default backend's), see ``set_attention_impl``."""
    if _attention_impl == "auto":
        return (platform or jax.default_backend()) == "cpu"
    return _attention_impl == "explicit"


# ---------------------------------------------------------------------------
# Fused attention kernels of the accelerators
# ---------------------------------------------------------------------------

_log = logging.getLogger("jaxvit")
_SPLASH_BLOCK = 128  # Splash's default tiles: the sequence is padded to a multiple


def log_fallback_once(kernel: str, reason: str, level: int = logging.INFO) -> None:
    """Logs (once per kernel and reason) why attention takes XLA's path instead of ``kernel``."""
    if (kernel, reason) not in _fallbacks_logged:
        _fallbacks_logged.add((kernel, reason))
        _log.log(level, "%s attention not used, XLA's instead: %s", kernel, reason)


_fallbacks_logged: set[tuple[str, str]] = set()


def splash_refusal(q: Array, bias: Array | None) -> str | None:
    """Why Splash attention cannot compute ``q`` ``(N, H, T, Dh)`` with ``bias``; None when it can."""
    if bias is not None:
        return "an additive bias on the logits (BEiT's relative positions): Splash takes masks only"
    return None


def cudnn_refusal(q: Array, bias: Array | None, mask: Array | None = None) -> str | None:
    """Why cuDNN's fused attention cannot compute ``q`` ``(N, H, T, Dh)``; None when it can."""
    if q.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN attention computes in bfloat16 or float16, the model in {q.dtype}"
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        return f"head size {q.shape[-1]}: cuDNN attention takes multiples of 8 up to 128"
    if mask is not None:
        # jax's cuDNN path takes padding as sequence lengths, which a mask of any form is not
        return "a mask of the keys (a padded sequence): jax's cuDNN attention takes sequence lengths only"
    return None


def key_mask_bias(mask: Array) -> Array:
    """``(N, T)`` bool, True for the keys a query may attend -> ``(N, 1, 1, T)`` float32 added to the
    logits: 0, or a value whose exponential is 0 next to any real logit (finite, so that a sum
    with another bias stays finite)."""
    return jnp.where(mask, 0.0, -1e30).astype(jnp.float32)[:, None, None, :]


def splash_attention(
    q: Array, k: Array, v: Array, interpret: bool = False, mask: Array | None = None
) -> Array:
    """``(N, H, T, Dh)`` x3 -> ``(N, H, T, Dh)``: ``softmax(q k^T / sqrt(Dh)) v`` by Pallas's Splash kernel.

    The sequence is padded to a multiple of 128 (the kernel's tiles) and the padded keys are
    masked out, so any length works (197, 257, registers). ``mask`` ``(N, T)`` (a NaFlex
    sequence's valid tokens) becomes the kernel's segment ids: a valid token attends to the valid
    ones, a padding token to the padding (never to nothing, which the kernel cannot take). A TPU
    kernel; ``interpret=True`` runs it on any platform, for tests. Under a mesh (``jax.set_mesh``,
    as jaxvit's train and eval steps trace) it runs per device on the batch split over every
    mesh axis.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    n, h, t, d = q.shape
    padded = -(-t // _SPLASH_BLOCK) * _SPLASH_BLOCK
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, padded - t), (0, 0)))  # noqa: E731
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    kernel = _splash_kernel(h, t, padded, interpret, segmented=mask is not None)
    args: tuple[Array, ...] = (pad(q), pad(k), pad(v))
    if mask is None:
        run = jax.vmap(kernel)
    else:
        args = (*args, jnp.pad(mask.astype(jnp.int32), ((0, 0), (0, padded - t))))
        run = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids)))
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        # XLA cannot partition a Pallas kernel: each device runs it on its share of the batch,
        # split over every axis of the mesh the step is traced under (jaxvit's batch sharding).
        batch = jax.sharding.PartitionSpec(mesh.axis_names)
        run = jax.shard_map(run, mesh=mesh, in_specs=(batch,) * len(args), out_specs=batch, check_vma=False)
    return run(*args)[:, :, :t]


@functools.cache
def _splash_kernel(
    heads: int, length: int, padded: int, interpret: bool, segmented: bool
) -> Callable[..., Array]:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    # With segment ids the padding to the tiles is one more segment (0, as the mask's padding);
    # without, the padded keys are masked here.
    valid_keys = np.ones((padded, padded), bool)
    if not segmented:
        valid_keys[:, length:] = False
    # The kernel holds its mask tables as arrays: made concrete, so that the cache outlives the trace.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(
            masks.MultiHeadMask([masks.NumpyMask(valid_keys)] * heads),
            block_sizes=splash.BlockSizes.get_default(),
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def cudnn_attention(q: Array, k: Array, v: Array, bias: Array | None = None) -> Array:
    """``(N, T, H, Dh)`` x3 -> ``(N, T, H, Dh)``: ``jax.nn.dot_product_attention`` on cuDNN's kernel.

    Raises ``RuntimeError`` where this process has no cuDNN (a CPU or TPU jaxlib)."""
    return jax.nn.dot_product_attention(
        q, k, v, bias=None if bias is None else bias[None], implementation="cudnn"
    )
