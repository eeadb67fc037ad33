"""Pictures of a ViT: attention rollout maps and training curves.

Pure functions first (``attention_rollout``, ``rollout_map``, ``overlay``,
``attention_figure``, ``read_metrics``, ``curves_figure``), then the I/O
(``plot_curves``, ``save_attention``) and the command line::

    python -m jaxvit.visualize attention --checkpoint PATH IMAGE --out attention.png [--head-maps]
    python -m jaxvit.visualize curves WORKDIR --out curves.png

Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in
Transformers"): fuse the heads of each layer (mean), add the identity for the
residual connection, renormalise the rows, and multiply the layers' matrices
so that row ``i`` says how much of output token ``i`` flows from each input
token. The map of a ``tok`` model is the class token's row; a model without a
class token (``gap``, ``map``) has no single query, so its map is the mean of
the patch tokens' rows, the tokens its head averages.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxvit.sizes import to_pair
from jaxvit.training.curves import (  # noqa: F401 (part of this command's API)
    CURVES_DPI,
    CURVES_FIGSIZE,
    curves_figure,
    metric_series,
    plot_curves,
    read_metrics,
)

Array = Any  # jax.Array or np.ndarray

HEAD_FUSIONS = ("mean", "max", "min")
POOLS = ("tok", "gap", "map", "attn_pool")

# ---------------------------------------------------------------------------
# Attention rollout (pure)
# ---------------------------------------------------------------------------


def attention_rollout(
    weights: Array,
    num_prefix_tokens: int = 1,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    add_residual: bool = True,
) -> Array:
    """``(depth, N, heads, T, T) -> (N, T, T)``: attention rollout over all layers.

    Each layer's heads are fused (``head_fusion``: mean as in the paper, or
    max/min), the identity is added for the residual path (``add_residual``),
    rows are renormalised to sum to 1, and the layers are multiplied, the
    last layer leftmost: ``R = A_L @ ... @ A_1``. Every row of ``R`` sums to 1.

    ``discard_ratio`` drops that fraction of the weakest attention weights
    to the patch tokens in each row before renormalising, which sharpens the
    maps of trained models; the ``num_prefix_tokens`` columns (class token)
    are never dropped.
    """
    weights = jnp.asarray(weights, jnp.float32)
    if weights.ndim != 5 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"attention weights must have shape (depth, N, heads, T, T), got {weights.shape}")
    depth, _, _, tokens, _ = weights.shape
    if depth < 1:
        raise ValueError("attention weights have depth 0: a model without blocks has no rollout")
    if not 0 <= num_prefix_tokens < tokens:
        raise ValueError(
            f"num_prefix_tokens must be in [0, {tokens}) for {tokens} tokens, got {num_prefix_tokens}"
        )
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if head_fusion == "mean":
        fused = weights.mean(axis=2)
    elif head_fusion == "max":
        fused = weights.max(axis=2)
    elif head_fusion == "min":
        fused = weights.min(axis=2)
    else:
        raise ValueError(f"unknown head_fusion {head_fusion!r}: expected one of {HEAD_FUSIONS}")

    num_discard = int(discard_ratio * (tokens - num_prefix_tokens))
    if num_discard:
        patches = fused[..., num_prefix_tokens:]
        threshold = jnp.sort(patches, axis=-1)[..., num_discard - 1 : num_discard]
        patches = jnp.where(patches <= threshold, 0.0, patches)
        fused = jnp.concatenate([fused[..., :num_prefix_tokens], patches], axis=-1)
    if add_residual:
        fused = fused + jnp.eye(tokens, dtype=fused.dtype)
    # A row can only be all zero without the residual after discarding; keep it zero, not NaN.
    fused = fused / jnp.maximum(fused.sum(axis=-1, keepdims=True), 1e-12)

    rollout = fused[0]
    for layer in fused[1:]:
        rollout = jnp.einsum("nij,njk->nik", layer, rollout)
    return rollout


def rollout_map(
    rollout: Array, grid: int | tuple[int, int], num_prefix_tokens: int = 1, pool: str = "tok"
) -> Array:
    """``(..., T, T) -> (..., h, w)``: the attention of the pooled output on each patch.

    ``pool="tok"`` reads the class token's row (row 0); ``"gap"``, ``"map"``
    and ``"attn_pool"`` average the rows of the ``h*w`` patch tokens (for the
    attention pools this leaves out the pooler's own attention, which is not in
    the encoder's weights). Only the patch columns are kept, in the ``(h w)`` order of
    ``patchify``. Works on a rollout ``(N, T, T)`` or on raw weights
    ``(N, heads, T, T)`` for per-head maps.
    """
    rollout = jnp.asarray(rollout)
    h, w = to_pair(grid)
    if rollout.ndim < 2 or rollout.shape[-1] != rollout.shape[-2]:
        raise ValueError(f"rollout must have shape (..., T, T), got {rollout.shape}")
    tokens = rollout.shape[-1]
    if tokens != num_prefix_tokens + h * w:
        raise ValueError(
            f"{tokens} tokens do not match grid {(h, w)} with {num_prefix_tokens} prefix token(s):"
            f" expected {num_prefix_tokens + h * w}"
        )
    if pool == "tok":
        if num_prefix_tokens < 1:
            raise ValueError("pool='tok' needs a class token (num_prefix_tokens >= 1); use pool='gap'")
        rows = rollout[..., 0, num_prefix_tokens:]
    elif pool in ("gap", "map", "attn_pool"):
        rows = rollout[..., num_prefix_tokens:, num_prefix_tokens:].mean(axis=-2)
    else:
        raise ValueError(f"unknown pool {pool!r}: expected one of {POOLS}")
    return rows.reshape(*rows.shape[:-1], h, w)


# ---------------------------------------------------------------------------
# Pictures (pure: arrays in, arrays or PIL images out)
# ---------------------------------------------------------------------------

_CAPTION = 16  # pixels of the caption strip above each panel
_PAD = 4


def _normalise(heat: np.ndarray) -> np.ndarray:
    low, high = float(heat.min()), float(heat.max())
    if high - low < 1e-12:
        # A flat map (e.g. uniform attention) has nothing to highlight.
        return np.full_like(heat, 0.5, dtype=np.float32)
    return ((heat - low) / (high - low)).astype(np.float32)


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image must have shape (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def overlay(image: Array, heat: Array, *, alpha: float = 0.6, cmap: str = "inferno") -> np.ndarray:
    """``(H, W[, C]) in [0, 1]`` and ``(h, w)`` -> ``(H, W, 3) uint8``: the heat map over the image.

    The image is shown in grey. The map is min-max normalised, coloured with ``cmap`` and blown up to the
    image with nearest-neighbour resampling, so each patch stays one block
    (``H`` and ``W`` must be multiples of ``h`` and ``w``).
    """
    import matplotlib

    # A grey base keeps the image's own colours from reading as heat.
    base = _to_rgb_uint8(np.asarray(image)).astype(np.float32).mean(axis=-1, keepdims=True)
    heat = np.asarray(heat, np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heat map must have shape (h, w), got {heat.shape}")
    big_h, big_w = base.shape[:2]
    h, w = heat.shape
    if big_h % h or big_w % w:
        raise ValueError(f"image size {big_h}x{big_w} is not a multiple of the map's grid {h}x{w}")
    up = np.repeat(np.repeat(_normalise(heat), big_h // h, axis=0), big_w // w, axis=1)
    colour = matplotlib.colormaps[cmap](up)[..., :3] * 255.0
    mixed = (1.0 - alpha) * base + alpha * colour
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def _panel_shape(image_hw: tuple[int, int], grid: tuple[int, int], panel_size: int) -> tuple[int, int]:
    """The panel's pixel size: about ``panel_size`` on the long side, a multiple of the grid."""
    height, width = image_hw
    scale = max(1, round(panel_size / max(height, width)))
    # Image sides divide by the grid (the patch size), so these do too.
    return height * scale, width * scale


def attention_figure_size(
    image_hw: tuple[int, int], grid: tuple[int, int], num_panels: int, *, panel_size: int = 192, cols: int = 4
) -> tuple[int, int]:
    """The ``(width, height)`` in pixels of ``attention_figure`` with ``num_panels`` panels."""
    ph, pw = _panel_shape(image_hw, grid, panel_size)
    cols = min(cols, num_panels)
    rows = math.ceil(num_panels / cols)
    return cols * pw + (cols + 1) * _PAD, rows * (ph + _CAPTION) + (rows + 1) * _PAD


def attention_figure(
    image: Array,
    heat: Array,
    head_maps: Array | None = None,
    *,
    title: str = "attention rollout",
    panel_size: int = 192,
    cols: int = 4,
    alpha: float = 0.6,
) -> Any:
    """A ``PIL.Image``: the image, the rollout ``heat (h, w)`` over it, and optional ``head_maps (heads, h, w)``.

    ``image`` is ``(H, W[, C])`` in ``[0, 1]`` at the model's input size.
    Panels are laid out ``cols`` to a row; the pixel size is
    ``attention_figure_size(...)``.
    """
    from PIL import Image, ImageDraw

    image = np.asarray(image, np.float32)
    heat = np.asarray(heat, np.float32)
    grid = heat.shape
    ph, pw = _panel_shape(image.shape[:2], grid, panel_size)
    scale = ph // image.shape[0]
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    panels = [("image", _to_rgb_uint8(big)), (title, overlay(big, heat, alpha=alpha))]
    if head_maps is not None:
        head_maps = np.asarray(head_maps, np.float32)
        if head_maps.ndim != 3 or head_maps.shape[1:] != grid:
            raise ValueError(
                f"head_maps must have shape (heads, {grid[0]}, {grid[1]}), got {head_maps.shape}"
            )
        panels += [(f"last layer, head {i}", overlay(big, m, alpha=alpha)) for i, m in enumerate(head_maps)]

    width, height = attention_figure_size(
        image.shape[:2], grid, len(panels), panel_size=panel_size, cols=cols
    )
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    cols = min(cols, len(panels))
    for index, (caption, pixels) in enumerate(panels):
        row, col = divmod(index, cols)
        x = _PAD + col * (pw + _PAD)
        y = _PAD + row * (ph + _CAPTION + _PAD)
        draw.text((x + 2, y + 2), caption, fill="black")
        canvas.paste(Image.fromarray(pixels), (x, y + _CAPTION))
    return canvas


# ---------------------------------------------------------------------------
# Attention from a checkpoint (I/O)
# ---------------------------------------------------------------------------


def load_image(
    path: str | Path,
    size: tuple[int, int],
    channels: int = 3,
    *,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    center_crop: bool = False,
) -> np.ndarray:
    """An image file -> ``(H, W, channels)`` float32 in ``[0, 1]`` at ``size = (H, W)``.

    ``crop_pct = 1`` resizes the whole image to ``size``; below 1 it resizes
    so that ``size / crop_pct`` fits the image, then takes the central
    ``size`` (the timm evaluation transform); ``center_crop`` crops at
    ``crop_pct = 1`` too (CLIP).
    """
    from jaxvit.data import preprocess

    if channels not in (1, 3):
        raise ValueError(f"can only read images for models with 1 or 3 channels, got {channels}")
    img = preprocess.load_image(path)  # RGB, 16-bit scaled to 8 bits, errors name the file
    if channels == 1:
        img = img.convert("L")
    height, width = size
    pixels = (
        np.asarray(preprocess.resize_and_crop(img, size, crop_pct, interpolation, center_crop), np.float32)
        / 255.0
    )
    return pixels.reshape(height, width, channels)


def _channel_vector(value: Any, channels: int, name: str) -> np.ndarray:
    vector = np.asarray(value, np.float32).reshape(-1)
    if vector.size != channels and np.all(vector == vector[0]):
        # The same value for every channel (e.g. (0.5, 0.5, 0.5) for a grey model) fits any count.
        vector = np.full(channels, vector[0], np.float32)
    if vector.size != channels:
        raise ValueError(
            f"{name} has {vector.size} values {tuple(vector)} but the model has {channels} channels"
        )
    return vector


def attention_maps_for_image(
    model: Any,
    params: Any,
    image: np.ndarray,
    mean: Any = None,
    std: Any = None,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> dict[str, np.ndarray]:
    """Runs ``model`` on one ``(H, W, C)`` image in ``[0, 1]``.

    Returns ``rollout (h, w)``, ``head_maps (heads, h, w)`` of the last layer
    and ``probs (num_classes,)`` (empty for a model without classifier).
    """
    import jax

    from jaxvit.model import attention_weights

    channels = image.shape[-1]
    mean = _channel_vector(0.0 if mean is None else mean, channels, "mean")
    std = _channel_vector(1.0 if std is None else std, channels, "std")
    batch = jnp.asarray(((image - mean) / std)[None], jnp.float32)
    grid = model.patch_grid(batch)
    if model.depth < 1:
        raise ValueError("the model has no encoder blocks, so no attention to show")
    variables = {"params": params}
    weights = attention_weights(model, variables, batch)
    prefix = model.num_prefix_tokens  # class, distillation and register tokens: not on the grid
    rollout = attention_rollout(weights, prefix, head_fusion=head_fusion, discard_ratio=discard_ratio)
    logits = model.apply(variables, batch, train=False)
    probs = jax.nn.softmax(logits[0]) if model.num_classes else jnp.zeros((0,))
    return dict(
        rollout=np.asarray(rollout_map(rollout, grid, prefix, model.pool)[0]),
        head_maps=np.asarray(rollout_map(weights[-1], grid, prefix, model.pool)[0]),
        probs=np.asarray(probs),
    )


def save_attention(
    checkpoint: str | Path,
    image_path: str | Path,
    out_path: str | Path,
    *,
    head_maps: bool = False,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    panel_size: int = 192,
) -> Path:
    """Loads ``checkpoint`` with ``jaxvit.load_for_inference``, draws the attention on one image, writes a PNG."""
    # Imported here: the converters are only needed for this command.
    from jaxvit.checkpoints import inference

    bundle = inference.load_for_inference(checkpoint)
    size = to_pair(bundle.image_size)
    image = load_image(
        image_path,
        size,
        bundle.model.num_channels,
        crop_pct=getattr(bundle, "crop_pct", 1.0),
        interpolation=getattr(bundle, "interpolation", "bilinear"),
        center_crop=getattr(bundle, "center_crop", False),
    )
    maps = attention_maps_for_image(
        bundle.model,
        bundle.params,
        image,
        bundle.mean,
        bundle.std,
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
    )
    title = "attention rollout"
    if maps["probs"].size:
        top = int(maps["probs"].argmax())
        labels = list(bundle.labels or [])
        name = labels[top] if top < len(labels) else str(top)
        title = f"rollout; pred {name} ({maps['probs'][top]:.0%})"
    figure = attention_figure(
        image, maps["rollout"], maps["head_maps"] if head_maps else None, title=title, panel_size=panel_size
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out_path, format="PNG", optimize=True)
    return out_path


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxvit.visualize", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    attn = commands.add_parser("attention", help="attention rollout of a checkpoint on one image")
    attn.add_argument("image", help="an image file (PNG, JPEG, ...)")
    attn.add_argument(
        "--checkpoint", required=True, help="a .npz export, timm/HF checkpoint or training workdir"
    )
    attn.add_argument("--out", required=True, help="the PNG to write")
    attn.add_argument("--head-maps", action="store_true", help="add the last layer's per-head maps")
    attn.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean")
    attn.add_argument("--discard-ratio", type=float, default=0.0)
    attn.add_argument("--panel-size", type=int, default=192, help="pixels on the long side of each panel")

    curves = commands.add_parser("curves", help="loss, accuracy and learning rate of a training run")
    curves.add_argument("workdir", help="a training workdir (or its metrics.jsonl)")
    curves.add_argument("--out", required=True, help="the PNG to write")
    curves.add_argument("--title", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "attention":
            out = save_attention(
                args.checkpoint,
                args.image,
                args.out,
                head_maps=args.head_maps,
                head_fusion=args.head_fusion,
                discard_ratio=args.discard_ratio,
                panel_size=args.panel_size,
            )
        else:
            out = plot_curves(args.workdir, args.out, title=args.title)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
