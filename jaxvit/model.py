"""The Vision Transformer, top to bottom.

``VisionTransformer.__call__`` reads as the four steps of the model; each
step's layers live in ``jaxvit/layers/``:

1. ``PatchEmbed`` (``layers/patch.py``): a strided conv, computed as
   ``patchify`` + one matmul.
2. ``ClassToken`` and ``PositionEmbedding`` (``layers/tokens.py``,
   ``layers/posemb.py``): the learnable class token (and DeiT's distillation
   token) in front, a learned or fixed 2-D sin-cos position embedding, then
   ``RegisterTokens`` (DINOv2's registers, which get no position embedding).
3. ``Encoder`` (``layers/encoder.py``): pre-LayerNorm blocks of
   ``SelfAttention`` and ``MlpBlock`` or ``SwiGLUMlp``, optionally scanned and
   rematerialised.
4. ``Head`` (``layers/head.py``): pooling (class token, mean, attention
   pooling, or CoCa's attentional pooler), an optional representation layer,
   and the classifier.

The model's options are declared once, in ``jaxvit/schema.py`` (``ViTConfig``):
the model takes them all as fields, and the encoder and its blocks take their
share through ``schema.pick``. ``create_model("B/16")`` builds one by name (the
sizes are in ``jaxvit/variants.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvit import compat, schema
from jaxvit.layers.common import (
    Array,
    check_attn_pool_heads,
    check_distill_pool,
    check_heads,
    check_pool_has_token,
    check_sincos_width,
    sow,
)
from jaxvit.layers.encoder import Encoder
from jaxvit.layers.head import Head
from jaxvit.layers.patch import PatchEmbed
from jaxvit.layers.posemb import PositionEmbedding
from jaxvit.layers.tokens import ClassToken, RegisterTokens
from jaxvit.sizes import to_pair
from jaxvit.variants import decode_variant

MODEL_FIELDS = schema.FIELD_NAMES


def check_config(config: schema.ViTConfig) -> None:
    """Raises ``ValueError`` for options that cannot build a model: each value against the schema,
    then the rules that tie fields together."""
    schema.check_values({n: getattr(config, n) for n in schema.FIELD_NAMES})
    check_pool_has_token(config.pool, config.class_token)
    if config.distill_token:
        check_distill_pool(config.pool)
        if not config.class_token or config.representation_size:
            raise ValueError(
                "distill_token=True needs class_token=True and no representation_size, got"
                f" class_token={config.class_token}, representation_size={config.representation_size}"
            )
    if config.rel_pos_bias != "none" and (
        not config.class_token or config.distill_token or config.num_registers
    ):
        raise ValueError(
            f"rel_pos_bias={config.rel_pos_bias!r} (BEiT's) needs one class token in front and nothing"
            f" else: got class_token={config.class_token}, distill_token={config.distill_token},"
            f" num_registers={config.num_registers}"
        )
    if config.fc_norm and (config.pool == "attn_pool" or config.distill_token):
        raise ValueError(
            "fc_norm=True (a LayerNorm after pooling) needs a pool other than 'attn_pool', which"
            f" normalises its own output, and no distillation token; got pool={config.pool!r},"
            f" distill_token={config.distill_token}"
        )
    if config.fc_norm and not config.final_norm:
        raise ValueError(
            "fc_norm=True is the final LayerNorm after pooling, and final_norm=False leaves out the final"
            " LayerNorm: choose one"
        )
    check_heads(config.width, config.num_heads)
    if config.pool == "map" and config.pool_heads:
        check_attn_pool_heads(config.width, config.pool_heads, "map")
    if config.pool == "attn_pool":
        check_attn_pool_heads(config.pool_width or config.width, config.pool_heads or config.num_heads)
    if config.posemb in schema.SINCOS_POSEMBS:
        check_sincos_width(config.width, config.posemb)
    if config.posemb == "rope" and config.rope != "none":
        raise ValueError(
            f"posemb='rope' (DINOv3's rotary embedding) and rope={config.rope!r} (timm Eva's) are two"
            " rotary embeddings: choose one"
        )
    rotary = "posemb='rope'" if config.posemb == "rope" else f"rope={config.rope!r}"
    if (config.posemb == "rope" or config.rope != "none") and (config.width // config.num_heads) % 4:
        raise ValueError(
            f"{rotary} needs a head dimension divisible by 4, got {config.width // config.num_heads}"
        )
    if min(to_pair(config.patch_size)) < 1:
        raise ValueError(f"patch_size must be positive, got {config.patch_size}")


class VisionTransformer(schema.fields_for_model(), nn.Module):
    """``(N, H, W, C) -> (N, num_classes)`` logits (or pooled features when ``num_classes=0``).

    Its fields are ``schema.ViTConfig``'s, with the same defaults (``self.config``
    gives them as one hashable object). Intermediate outputs come through
    ``sow``: ``mutable=["intermediates"]`` returns the patch tokens, each
    block's output, the encoder output ``encoded`` (all tokens after the final
    LayerNorm, in the order ``[cls, dist, registers..., patches]``; with
    ``pool="attn_pool"``, ``fc_norm=True`` or ``final_norm=False``, which have no final LayerNorm of
    the tokens, the last block's output) and the
    pooled ``features`` (what the classifier sees); ``mutable=["attention"]``
    returns every block's attention weights ``(N, heads, T, T)`` (see
    ``attention_weights``).
    """

    @property
    def config(self) -> schema.ViTConfig:
        """The options in today's spelling (``gelu_approximate`` folded into ``activation``)."""
        return schema.config_of(self)

    def check_config(self) -> None:
        """Raises ``ValueError`` for fields that cannot build a model."""
        check_config(self.config)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patches: class, distillation and register tokens."""
        return int(self.class_token) + int(self.distill_token) + self.num_registers

    @property
    def num_posemb_prefix_tokens(self) -> int:
        """Prefix slots of the position embedding: the class and distillation tokens (registers get none)."""
        return int(self.class_token) + int(self.distill_token)

    def patch_grid(self, images: Any, patch_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of ``images`` ``(N, H, W, C)`` at ``patch_size`` (None: the
        model's); ``ValueError`` unless they fit the model.

        Takes arrays and ``jax.ShapeDtypeStruct``s alike, so it checks before anything is traced.
        """
        shape = tuple(np.shape(images))
        if len(shape) != 4:
            raise ValueError(f"images must be rank 4 (N, H, W, C), got shape {shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images must be floating point, got dtype {images.dtype}")
        _, height, width, channels = shape
        p, q = to_pair(self.patch_size if patch_size is None else patch_size)
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
        compat.renamed("check_images", "patch_grid")
        return self.patch_grid(images)

    def check_sequence(self, patches: Any, grids: Any, mask: Any) -> int:
        """The length ``L`` of a patch sequence input: ``patches`` ``(N, L, p*q*C)`` at the model's
        patch size, ``grids`` ``(N, 2)`` integer ``(h, w)`` and ``mask`` ``(N, L)`` (or None);
        ``ValueError`` unless they fit the model. Shapes only: that each ``h * w`` fits in ``L``,
        and that the mask keeps the first ``h * w`` tokens, is the caller's (``jaxvit.naflex``
        builds such inputs)."""
        p, q = to_pair(self.patch_size)
        shape = tuple(np.shape(patches))
        if len(shape) != 3 or shape[2] != p * q * self.num_channels:
            raise ValueError(
                f"patches must have shape (N, L, {p * q * self.num_channels}): {p}x{q} patches of"
                f" {self.num_channels} channels, got {shape}"
            )
        if not jnp.issubdtype(patches.dtype, jnp.floating):
            raise ValueError(f"patches must be floating point, got dtype {patches.dtype}")
        if tuple(np.shape(grids)) != (shape[0], 2) or not jnp.issubdtype(grids.dtype, jnp.integer):
            raise ValueError(
                f"grids must be integer (h, w) pairs of shape ({shape[0]}, 2), got"
                f" {tuple(np.shape(grids))} {getattr(grids, 'dtype', type(grids).__name__)}"
            )
        if mask is not None and tuple(np.shape(mask)) != shape[:2]:
            raise ValueError(f"mask must have shape {shape[:2]}, got {tuple(np.shape(mask))}")
        unsupported = {
            k: v
            for k, v in dict(posemb=self.posemb, rel_pos_bias=self.rel_pos_bias, rope=self.rope).items()
            if v in ("rope", "block", "shared", "axial", "mixed")
        }
        if unsupported:
            raise ValueError(
                f"patch sequences take a learned or sin-cos position embedding; the model has {unsupported},"
                " whose tables are of one grid"
            )
        return shape[1]

    def _input_grids(
        self, images: Array, patch_size: Any, grids: Array | None, mask: Array | None
    ) -> tuple[tuple[int, int], tuple[int, int] | None, int, Array | None]:
        """``(grid, the learned table's grid, patch tokens, mask)`` of the input: images (at a
        FlexiViT ``patch_size`` when one is given) or patch sequences (with ``grids``)."""
        if patch_size and self.rel_pos_bias != "none":
            raise ValueError(
                f"patch_size={patch_size}: a model with rel_pos_bias={self.rel_pos_bias!r} has tables of"
                " its own grid and is not called at another patch size"
            )
        if grids is not None:
            length = self.check_sequence(images, grids, mask)
            if mask is None:
                mask = jnp.arange(length)[None] < jnp.prod(grids, axis=1, keepdims=True)
            grid, table_grid = (1, length), None  # not one grid: each example's is in grids
        else:
            grid = self.patch_grid(images, patch_size or None)
            table_grid = self.patch_grid(images) if patch_size else grid
        if self.posemb_grid:
            table_grid = to_pair(self.posemb_grid)
        return grid, table_grid, length if grids is not None else grid[0] * grid[1], mask

    def _head(self, config: schema.ViTConfig, common: dict[str, Any]) -> Head:
        return Head(
            num_classes=config.num_classes,
            pool=config.pool,
            num_prefix_tokens=self.num_prefix_tokens,
            distill_token=config.distill_token,
            representation_size=config.representation_size,
            fc_norm=config.fc_norm,
            num_heads=config.num_heads,
            mlp_dim=config.pool_mlp_dim or config.mlp_dim or 4 * config.width,
            pool_queries=config.pool_queries,
            pool_heads=config.pool_heads,
            pool_width=config.pool_width,
            layer_norm_eps=config.layer_norm_eps,
            activation=config.activation,
            classifier_bias=config.head_bias_init,
            use_classifier_bias=config.head_bias,
            name="head",
            **common,
        )

    @nn.compact
    def __call__(
        self,
        images: Array,
        *,
        train: bool = False,
        patch_size: int | tuple[int, int] | None = None,
        grids: Array | None = None,
        mask: Array | None = None,
    ) -> Array:
        """``patch_size`` (FlexiViT): cut the images into patches of this size instead of the
        model's. The parameters stay those of the model's patch size and grid: the patch kernel is
        resampled (``resample_patch_embed``, bilinear as big_vision's FlexiViT) and a learned
        position table, kept at the grid of the model's patch size, resized bilinearly to the new
        grid, inside the computation.

        ``grids`` (NaFlex): ``images`` are then patch sequences ``(N, L, p*q*C)``, each example's
        ``h * w`` patches (``grids[n]``, in ``(h w)`` order) followed by padding, with ``mask``
        ``(N, L)`` True for the patches (None: the first ``h * w``). Each example gets the position
        embedding of its own grid (``posemb_grid``: the learned table's), attention and pooling see
        its patches only, and the padding changes no patch's output. ``(N, L, p*q*C) -> (N, num_classes)``.
        """
        config = self.config
        check_config(config)
        flexi = patch_size is not None and to_pair(patch_size) != to_pair(config.patch_size)
        grid, table_grid, length, mask = self._input_grids(images, flexi and patch_size, grids, mask)
        n = images.shape[0]
        common = dict(dtype=config.dtype, param_dtype=config.param_dtype)

        # 1. Patch embedding: (N, H, W, C) -> (N, h*w, D), or (N, L, p*q*C) -> (N, L, D)
        x = PatchEmbed(config.width, config.patch_size, config.patch_bias, name="patch_embed", **common)(
            images, patch_size=patch_size if flexi else None
        )
        sow(self, "intermediates", "patch_tokens", x)

        # 2. Tokens in front, position embedding, registers: -> (N, P + h*w, D)
        if config.distill_token:  # goes in first, so it ends up behind the class token
            x = ClassToken(name="dist_token", **common)(x)
        if config.class_token:
            x = ClassToken(name="cls_token", **common)(x)
        prefix = self.num_posemb_prefix_tokens
        x = PositionEmbedding(grid, config.posemb, prefix, table_grid, name="pos_embed", **common)(
            x, grids=grids
        )
        if config.num_registers:
            x = RegisterTokens(config.num_registers, prefix, name="registers", **common)(x)
        x = nn.Dropout(config.dropout)(x, deterministic=not train)
        chex.assert_shape(x, (n, self.num_prefix_tokens + length, config.width))
        # the tokens attention and pooling see: every token in front, and each sequence's patches
        tokens = (
            None
            if mask is None
            else jnp.pad(mask.astype(bool), ((0, 0), (self.num_prefix_tokens, 0)), constant_values=True)
        )

        # 3. Encoder: (N, T, D) -> (N, T, D)
        rope = dict(
            rope_grid=grid if config.posemb == "rope" or config.rope != "none" else None,
            rope_prefix_tokens=self.num_prefix_tokens,
            rel_pos_grid=grid if config.rel_pos_bias != "none" else None,
            rel_pos_shared=config.rel_pos_bias == "shared",
        )
        # CoCa's pooler normalises the tokens itself (its ln_post comes after the pooling),
        # fc_norm moves the final LayerNorm behind the pooling (MAE, BEiT, EVA02), and PE-Spatial
        # has none (final_norm=False)
        final_norm = config.pool != "attn_pool" and not config.fc_norm and config.final_norm
        x = Encoder(**schema.pick(config, Encoder, final_norm=final_norm, **rope), name="encoder")(
            x, train=train, mask=tokens
        )
        sow(self, "intermediates", "encoded", x)

        # 4. Head: pooled features -> (N, num_classes)
        out = self._head(config, common)(x, tokens)
        pooled = config.pool_width if config.pool == "attn_pool" else None
        chex.assert_shape(
            out, (n, config.num_classes or config.representation_size or pooled or config.width)
        )
        return out


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


def __getattr__(name: str) -> Any:
    # Names this module held before the layers moved to jaxvit/layers/ (see jaxvit.compat).
    return compat.moved_name(__name__, name)
