"""Step 4 of the ViT: pooling (class token, mean, attention) and the classifier."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax.numpy as jnp

from jaxvit import compat, ops, schema
from jaxvit.layers.common import (
    Array,
    DType,
    check_attn_pool_heads,
    check_choice,
    check_distill_pool,
    check_pool_has_token,
    sow,
)
from jaxvit.layers.mlp import MlpBlock
from jaxvit.layers.patch import Dense

POOLINGS = schema.POOLINGS


class MAPHead(nn.Module):
    """``(N, T, D) -> (N, D)``: multi-head attention pooling with a learned probe (of the tokens
    ``mask`` ``(N, T)`` keeps, when given)."""

    num_heads: int
    mlp_dim: int | None = None
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
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
        )(probe, x, mask=None if mask is None else mask[:, None, None, :])
        z = nn.LayerNorm(
            epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )(y)
        y = y + MlpBlock(
            mlp_dim=self.mlp_dim or 4 * d,
            activation=self.activation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(z)
        return y[:, 0]


class AttentionalPooler(nn.Module):
    """``(N, T, D) -> (N, Q, E)``: CoCa's attentional pooler (open_clip's ``AttentionalPooler``
    followed by its ``ln_post``).

    ``num_queries`` learned queries ``(Q, E)``, LayerNormed (``norm_q``), attend with
    ``num_heads`` heads to the LayerNormed tokens (``norm_kv``, of width ``D``); the attention's
    outputs are LayerNormed (``norm_out``). Unlike ``MAPHead`` there is no residual and no MLP,
    and the width ``E`` is the pooler's own.
    """

    num_queries: int
    num_heads: int
    width: int
    layer_norm_eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        chex.assert_rank(x, 3)
        check_attn_pool_heads(self.width, self.num_heads)
        n = x.shape[0]
        norm = dict(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        # open_clip draws its queries from N(0, 1); they are LayerNormed before use anyway
        query = self.param(
            "query", nn.initializers.normal(1.0), (self.num_queries, self.width), self.param_dtype
        )
        query = nn.LayerNorm(name="norm_q", **norm)(query.astype(self.dtype))
        query = jnp.broadcast_to(query, (n, self.num_queries, self.width))
        context = nn.LayerNorm(name="norm_kv", **norm)(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            qkv_features=self.width,
            out_features=self.width,
            kernel_init=nn.initializers.xavier_uniform(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            qkv_dot_general=ops.dot_general,
            out_dot_general=ops.dot_general,
            name="attn",
        )(query, context, mask=None if mask is None else mask[:, None, None, :])
        y = nn.LayerNorm(name="norm_out", **norm)(y)
        chex.assert_shape(y, (n, self.num_queries, self.width))
        return y


class Head(nn.Module):
    """``(N, P + S, D) -> (N, num_classes)``, or ``(N, D')`` features when ``num_classes=0``.

    ``pool``: ``"tok"`` takes the class token, ``"gap"`` the mean of the
    ``S`` patch tokens (after all ``P`` prefix tokens: class, distillation,
    registers), ``"map"`` attention pooling (``pool_heads`` heads, an MLP of ``mlp_dim``),
    ``"attn_pool"`` the first of ``pool_queries`` outputs
    of CoCa's ``AttentionalPooler`` (``pool_heads`` heads, width ``pool_width``: the features are
    then ``(N, pool_width)``). ``fc_norm`` LayerNorms the pooled features (``fc_norm``: MAE's,
    BEiT's and EVA02's final LayerNorm, after the pooling). ``representation_size`` adds
    ``Dense + tanh`` (``pre_logits``) before the zero-init classifier;
    ``use_classifier_bias=False`` leaves out its bias (a projection such as
    CLIP's ``visual_projection``). ``distill_token`` (DeiT; ``pool="tok"``):
    token 1 is the distillation token, with its own ``dist_classifier``; the
    logits are the mean of both classifiers' and the features the mean of both
    tokens, as timm's distilled models and transformers'
    ``DeiTForImageClassificationWithTeacher`` give them at inference. ``mask`` ``(N, P + S)``
    bool: the tokens that count (a padded sequence's valid ones) for ``"gap"``, ``"map"`` and
    ``"attn_pool"``; the class token is valid by construction.
    """

    num_classes: int
    pool: str = "tok"
    num_prefix_tokens: int = 1
    distill_token: bool = False
    representation_size: int | None = None
    fc_norm: bool = False
    num_heads: int = 1
    mlp_dim: int | None = None
    pool_queries: int = 1
    pool_heads: int | None = None  # None: num_heads
    pool_width: int | None = None  # None: the tokens' width
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"
    classifier_bias: float = 0.0
    use_classifier_bias: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    bias_init: float | None = None  # deprecated name of classifier_bias, until jaxvit 0.3

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        n, t, d = x.shape
        if mask is not None:
            chex.assert_shape(mask, (n, t))
        classifier_bias = self.classifier_bias
        if self.bias_init is not None:
            compat.renamed("Head.bias_init", "classifier_bias")
            classifier_bias = self.bias_init
        dist = None
        if self.distill_token:
            check_distill_pool(self.pool)
            dist = x[:, 1]
        if self.pool == "tok":
            check_pool_has_token(self.pool, self.num_prefix_tokens >= 1)
            x = x[:, 0]
        elif self.pool == "gap":
            if mask is None:
                x = jnp.mean(x[:, self.num_prefix_tokens :], axis=1)
            else:
                keep = mask[:, self.num_prefix_tokens :, None].astype(x.dtype)
                x = jnp.sum(x[:, self.num_prefix_tokens :] * keep, axis=1) / jnp.sum(keep, axis=1)
        elif self.pool == "map":
            x = MAPHead(
                num_heads=self.pool_heads or self.num_heads,
                mlp_dim=self.mlp_dim,
                layer_norm_eps=self.layer_norm_eps,
                activation=self.activation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="map",
            )(x, mask)
        elif self.pool == "attn_pool":
            d = self.pool_width or d
            x = AttentionalPooler(
                num_queries=self.pool_queries,
                num_heads=self.pool_heads or self.num_heads,
                width=d,
                layer_norm_eps=self.layer_norm_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="attn_pool",
            )(x, mask)[:, 0]
        else:
            check_choice("pool", self.pool, POOLINGS)
        chex.assert_shape(x, (n, d))
        if self.fc_norm:
            x = nn.LayerNorm(
                epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="fc_norm"
            )(x)
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
        sow(self, "intermediates", "features", x if dist is None else (x + dist) / 2)
        if not self.num_classes:
            return x if dist is None else (x + dist) / 2
        logits = Dense(self.num_classes, name="classifier", **classifier)(x)
        if dist is not None:
            logits = (logits + Dense(self.num_classes, name="dist_classifier", **classifier)(dist)) / 2
        return logits
