"""Step 2 of the ViT, positions: learned and fixed 2-D sin-cos embeddings, their resampling to
another grid (with PyTorch's resize weights), and the 2-D rotary tables of DINOv3 and timm's
``Eva`` (axial and mixed)."""

from __future__ import annotations

import math
from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvit import schema
from jaxvit.layers.common import Array, DType, check_choice, check_sincos_width
from jaxvit.sizes import square_grid

# "bicubic_offset" is DINO's and DINOv2's own resize: torch's bicubic at a scale factor of
# (new + 0.1) / old, not new / old (see resize_matrix).
RESAMPLE_METHODS = ("bilinear", "bicubic", "bicubic_offset")
# DINO's workaround for a float rounding of the output size, kept by DINOv2's models without
# registers: the scale factor is (new + INTERPOLATE_OFFSET) / old.
INTERPOLATE_OFFSET = 0.1


def posemb_sincos_2d(
    grid: tuple[int, int],
    width: int,
    temperature: float = 10_000.0,
    dtype: DType = jnp.float32,
    num_prefix_tokens: int = 0,
    kind: str = "sincos2d",
) -> Array:
    """The fixed 2-D sin-cos embedding: ``(1, P + h*w, width)``, rows in ``(h w)`` order.

    A quarter of the channels each hold sin(x), cos(x), sin(y), cos(y) at
    geometric frequencies ``temperature ** -(k / K)``, ``k < width / 4``. ``kind="sincos2d"``
    is big_vision's ("Better plain ViT baselines"), ``K = width / 4 - 1``; ``"sincos2d_mae"``
    MAE's (its ``get_2d_sincos_pos_embed``, transformers' ``ViTMAEModel``), ``K = width / 4``.
    The ``num_prefix_tokens`` rows in front (class token slots) are zeros.
    """
    check_choice("sin-cos kind", kind, schema.SINCOS_POSEMBS)
    h, w = grid
    check_sincos_width(width, kind)
    y, x = np.mgrid[:h, :w]
    steps = width // 4 if kind == "sincos2d_mae" else max(width // 4 - 1, 1)
    omega = np.arange(width // 4) / steps
    omega = 1.0 / (temperature**omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    pe = np.pad(pe, ((num_prefix_tokens, 0), (0, 0)))
    return jnp.asarray(pe[None], dtype)


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
    ``"bicubic_offset"`` is the same bicubic given
    ``scale_factor=((H + 0.1) / h, (W + 0.1) / w)`` instead of the size, as
    DINOv2's own ``interpolate_pos_encoding`` does (its models without
    registers): the output size is the same, the sampling positions are not.
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
        rows = resize_matrix(old_grid[0], h, method, antialias)
        cols = resize_matrix(old_grid[1], w, method, antialias)
        resized = np.einsum("Hh,hwd,Ww->HWd", rows, np.asarray(image, np.float64), cols)
    resized = jnp.asarray(resized).reshape(1, h * w, d).astype(posemb.dtype)
    return jnp.concatenate([prefix, resized], axis=1)


def sequence_positions(grids: Array, length: int) -> Array:
    """``(N, 2)`` patch grids ``(h, w)`` -> ``(N, length, 2)`` int32 ``(row, column)`` of each token of
    a patch sequence in its image's grid (tokens in ``(h w)`` order), ``(0, 0)`` for the padding
    behind the ``h * w`` patches. Works on traced grids."""
    index = jnp.arange(length, dtype=jnp.int32)[None]
    h, w = (grids[:, i : i + 1].astype(jnp.int32) for i in (0, 1))
    positions = jnp.stack([index // w, index % w], axis=-1)
    return positions * (index < h * w)[..., None]


def _bilinear_antialias_weights(in_size: int, out_sizes: Array, index: Array) -> Array:
    """``(N, L, in_size)`` float32 weights of ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False, antialias=True)`` (and ``jax.image.resize``'s antialiased bilinear) along
    one axis: output position ``index`` ``(N, L)`` of an output of ``out_sizes`` ``(N, 1)``, traced."""
    scale = jnp.float32(in_size) / out_sizes.astype(jnp.float32)
    support = jnp.maximum(scale, 1.0)[..., None]
    center = (index.astype(jnp.float32) + 0.5) * scale - 0.5
    source = jnp.arange(in_size, dtype=jnp.float32)
    weights = jnp.maximum(1.0 - jnp.abs(source - center[..., None]) / support, 0.0)
    return weights / weights.sum(-1, keepdims=True)


def resize_posemb_to_grids(table: Array, table_grid: tuple[int, int], grids: Array, length: int) -> Array:
    """``(G, D)`` rows of a learned table of ``table_grid`` -> ``(N, length, D)``: each example's own
    resize of the table to its grid ``grids[n]`` (antialiased bilinear, NaFlex's: big_vision's
    ``jax.image.scale_and_translate``, transformers' ``Siglip2VisionEmbeddings``), row by row of
    its patch sequence; the padding gets the first row. Static shapes: under ``jit`` the grids
    may be traced. Computed in float32."""
    chex.assert_shape(table, (table_grid[0] * table_grid[1], None))
    positions = sequence_positions(grids, length)
    rows, cols = (
        _bilinear_antialias_weights(table_grid[i], grids[:, i : i + 1], positions[..., i]) for i in (0, 1)
    )
    weights = (rows[..., :, None] * cols[..., None, :]).reshape(*positions.shape[:2], -1)
    resized = jnp.einsum("nlg,gd->nld", weights, table.astype(jnp.float32), precision="highest")
    return resized.astype(table.dtype)


def posemb_sincos_2d_at(
    positions: Array, width: int, temperature: float = 10_000.0, kind: str = "sincos2d"
) -> Array:
    """``posemb_sincos_2d`` at given ``(row, column)`` ``positions`` ``(N, L, 2)`` -> ``(N, L, width)``
    float32, for patch sequences (traced positions)."""
    check_sincos_width(width, kind)
    steps = width // 4 if kind == "sincos2d_mae" else max(width // 4 - 1, 1)
    omega = jnp.asarray(1.0 / temperature ** (np.arange(width // 4) / steps), jnp.float32)
    y, x = (positions[..., i : i + 1].astype(jnp.float32) * omega for i in (0, 1))
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=-1)


class PositionEmbedding(nn.Module):
    """``(N, P + h*w, D) -> (N, P + h*w, D)``: adds a position embedding.

    ``kind="learn"`` holds a parameter ``(1, P + h*w, D)`` drawn from
    normal(0.02), with a slot for each of the ``num_prefix_tokens`` in front (with ``table_grid``,
    FlexiViT's and NaFlex's: the table is kept at that grid and resized, antialiased bilinear, to
    ``grid``);
    ``kind="sincos2d"`` (or MAE's ``"sincos2d_mae"``) adds a fixed embedding (zeros in the prefix
    slots);
    ``"rope"`` (rotary, applied in attention) and ``"none"`` add nothing here.
    Called with ``grids`` ``(N, 2)``, the tokens are ``(N, P + L, D)``: patch sequences, each
    example's ``h * w`` patches then padding, and each example gets the embedding of its own grid
    (a learned table needs ``table_grid``; see ``resize_posemb_to_grids``).
    """

    grid: tuple[int, int]
    kind: str = "learn"
    num_prefix_tokens: int = 1
    table_grid: tuple[int, int] | None = None  # the learned table's grid; None: ``grid``
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, grids: Array | None = None) -> Array:
        n, t, d = tokens.shape
        h, w = self.grid
        prefix = self.num_prefix_tokens
        if grids is None:
            chex.assert_shape(tokens, (n, prefix + h * w, d))
        if self.kind in ("rope", "none"):
            return tokens.astype(self.dtype)  # rope rotates queries and keys in attention instead
        if self.kind in schema.SINCOS_POSEMBS:
            if grids is not None:
                rows = posemb_sincos_2d_at(sequence_positions(grids, t - prefix), d, kind=self.kind)
                posemb = jnp.pad(rows.astype(self.param_dtype), ((0, 0), (prefix, 0), (0, 0)))
            else:
                posemb = posemb_sincos_2d(
                    (h, w), d, dtype=self.param_dtype, num_prefix_tokens=prefix, kind=self.kind
                )
            return tokens.astype(self.dtype) + posemb.astype(self.dtype)
        check_choice("posemb", self.kind, schema.POSEMBS)
        if grids is not None and self.table_grid is None:
            raise ValueError(
                "patch sequences need the learned position table's own grid: set the model's"
                " posemb_grid (NaFlex's), which every sequence's grid is resized from"
            )
        table = tuple(self.table_grid or self.grid)
        shape = (1, prefix + table[0] * table[1], d)
        if self.has_variable("params", "embedding"):
            stored = self.get_variable("params", "embedding").shape
            if tuple(stored) != shape:
                raise ValueError(
                    f"the position embedding has shape {tuple(stored)} but these images give"
                    f" {h}x{w} patches, which need {shape}: resample it with"
                    " jaxvit.resample_posemb (load_pretrained does this for you)"
                )
        posemb = self.param("embedding", nn.initializers.normal(stddev=0.02), shape, self.param_dtype)
        if grids is not None:
            rows = resize_posemb_to_grids(posemb[0, prefix:], table, grids, t - prefix)
            posemb = jnp.concatenate([jnp.broadcast_to(posemb[:, :prefix], (n, prefix, d)), rows], axis=1)
        elif table != (h, w):  # FlexiViT, NaFlex: the table follows the grid of the images
            head, rows = posemb[:, :prefix], posemb[0, prefix:]
            rows = jax.image.resize(rows.reshape(*table, d), (h, w, d), "bilinear", antialias=True)
            posemb = jnp.concatenate([head, rows.reshape(1, h * w, d)], axis=1)
        return tokens.astype(self.dtype) + posemb.astype(self.dtype)


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


def apply_rope(x: Array, cos: Array, sin: Array, num_prefix_tokens: int, interleaved: bool = False) -> Array:
    """Rotates the patch tokens of ``x`` ``(N, T, H, Dh)``; the ``num_prefix_tokens`` in front stay as they are.

    ``x * cos + rotate(x) * sin``. ``cos``, ``sin``: ``(T - P, Dh)``, the same for every head
    (``rope_2d_tables``, ``rope_axial_tables``), or ``(T - P, H, Dh)``, a table per head
    (``rope_mixed_tables``). ``rotate(x)`` pairs the two halves of ``Dh``, ``[-x2, x1]`` (DINOv3),
    or with ``interleaved=True`` neighbouring channels, ``[-x1, x0, -x3, x2, ...]`` (timm's ``Eva``).
    """
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    if interleaved:
        rotated = jnp.stack([-patches[..., 1::2], patches[..., 0::2]], axis=-1).reshape(patches.shape)
    else:
        first, second = jnp.split(patches, 2, axis=-1)
        rotated = jnp.concatenate([-second, first], axis=-1)
    per_head = cos.ndim == 3
    cos, sin = (t[None] if per_head else t[None, :, None, :] for t in (cos, sin))
    return jnp.concatenate([prefix, patches * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)], axis=1)


def rope_axial_coords(
    grid: tuple[int, int],
    ref_grid: tuple[int, int] | None = None,
    offset: float = 0.0,
    xy: bool = False,
) -> np.ndarray:
    """``(h*w, 2)`` float32 patch coordinates of timm's ``Eva`` rotary embeddings, rows in ``(h w)`` order.

    The patch indices plus ``offset`` (Perception Encoder's 1), stretched to ``ref_grid`` when one
    is given (EVA02 fine-tuned at another size: ``index / size * ref``). The columns are ``(y, x)``,
    or ``(x, y)`` with ``xy=True`` (timm's ``grid_indexing='xy'``).
    """
    sizes, ref = list(grid), None if ref_grid is None else list(ref_grid)
    if xy:
        sizes, ref = sizes[::-1], None if ref is None else ref[::-1]
    axes = [np.arange(s).astype(np.float32) + np.float32(offset) for s in sizes]
    if ref is not None:
        axes = [
            (a / np.float32(s) * np.float32(r)).astype(np.float32)
            for a, s, r in zip(axes, sizes, ref, strict=True)
        ]
    coords = np.stack(np.meshgrid(*axes, indexing="xy" if xy else "ij"), axis=-1)
    return coords.reshape(grid[0] * grid[1], 2)


def rope_axial_tables(
    grid: tuple[int, int],
    head_dim: int,
    theta: float = 10_000.0,
    ref_grid: tuple[int, int] | None = None,
    offset: float = 0.0,
    xy: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """timm's ``RotaryEmbeddingCat`` (EVA02, Perception Encoder, the axial RoPE ViTs): ``(cos, sin)``,
    each ``(h*w, head_dim)`` float32, in the interleaved layout of ``apply_rope(interleaved=True)``.

    Each coordinate of ``rope_axial_coords`` times the ``head_dim / 4`` frequencies ``theta **
    (-k / (head_dim / 4))`` gives the angles, first coordinate's then second's, each repeated for
    a pair of channels.
    """
    if head_dim % 4:
        raise ValueError(f"rope='axial' needs a head dimension divisible by 4, got {head_dim}")
    bands = head_dim // 4
    freqs = np.float32(1.0) / np.float32(theta) ** (np.arange(bands).astype(np.float32) / np.float32(bands))
    coords = rope_axial_coords(grid, ref_grid, offset, xy)
    angles = (coords[:, :, None] * freqs.astype(np.float32)[None, None, :]).reshape(len(coords), 2 * bands)
    angles = np.repeat(angles.astype(np.float32), 2, axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_mixed_tables(freqs: Array, grid: tuple[int, int], xy: bool = False) -> tuple[Array, Array]:
    """timm's ``RotaryEmbeddingMixed`` (RoPE-Mixed, learned frequencies): ``(cos, sin)``, each
    ``(h*w, H, Dh)`` float32 from one block's ``freqs`` ``(2, H, Dh / 2)``.

    The angle of channel pair ``j`` of head ``h`` at coordinates ``(c0, c1)`` (``rope_axial_coords``,
    no offset) is ``c0 * freqs[0, h, j] + c1 * freqs[1, h, j]``: a direction per head, learned.
    """
    coords = jnp.asarray(rope_axial_coords(grid, xy=xy))
    freqs = freqs.astype(jnp.float32)
    angles = coords[:, 0, None, None] * freqs[0][None] + coords[:, 1, None, None] * freqs[1][None]
    angles = jnp.repeat(angles, 2, axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def init_rope_mixed_freqs(theta: float) -> Callable[..., Array]:
    """The initializer of a block's mixed-RoPE frequencies ``(2, H, Dh / 2)``, as RoPE-Mixed starts:
    the axial magnitudes ``theta ** (-4k / Dh)`` along a random direction per head, and again a
    quarter turn further."""

    def init(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
        _, heads, half = shape
        magnitude = 1.0 / theta ** (jnp.arange(0, 2 * half, 4, dtype=jnp.float32) / (2 * half))
        angle = jax.random.uniform(key, (heads, 1), jnp.float32, 0.0, 2 * math.pi)
        fx = jnp.concatenate([magnitude * jnp.cos(angle), magnitude * jnp.cos(angle + math.pi / 2)], -1)
        fy = jnp.concatenate([magnitude * jnp.sin(angle), magnitude * jnp.sin(angle + math.pi / 2)], -1)
        return jnp.stack([fx, fy]).astype(dtype)

    return init


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

    ``align_corners=False``. ``scale`` is ``in_size / out_size``, or for
    ``"bicubic_offset"`` ``in_size / (out_size + INTERPOLATE_OFFSET)``: torch
    samples at the reciprocal of a ``scale_factor`` it is given, not at the
    ratio of the sizes. Without antialias (bicubic only): four taps around
    ``scale * (i + 0.5) - 0.5`` with ``a = -0.75``, indices clamped at the
    border. With antialias: the kernel (``a = -0.5`` cubic, or triangle) is
    widened by the scale when shrinking, cut at the border and renormalised;
    an axis whose length stays is left as it is.
    """
    check_choice("resample method", method, RESAMPLE_METHODS)
    offset = INTERPOLATE_OFFSET if method == "bicubic_offset" else 0.0
    scale = in_size / (out_size + offset)
    cubic = method != "bilinear"
    weights = np.zeros((out_size, in_size))
    if not antialias:
        if not cubic:
            raise ValueError("resize_matrix without antialias is for a bicubic method")
        source = scale * (np.arange(out_size) + 0.5) - 0.5
        base = np.floor(source)
        t = source - base
        for tap in range(-1, 3):
            index = np.clip(base + tap, 0, in_size - 1).astype(int)
            np.add.at(weights, (np.arange(out_size), index), _cubic(t - tap, -0.75))
        return weights
    if in_size == out_size:
        # torch's antialiased resize skips an axis whose length stays, whatever the scale factor
        return np.eye(in_size)
    support = (2.0 if cubic else 1.0) * max(scale, 1.0)
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        offsets = (np.arange(lo, hi) - center + 0.5) * inv_scale
        row = _cubic(offsets, -0.5) if cubic else _triangle(offsets)
        total = row.sum()
        weights[i, lo:hi] = row / total if total != 0 else row
    return weights
