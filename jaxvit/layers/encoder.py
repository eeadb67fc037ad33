"""Step 3 of the ViT: pre-LayerNorm blocks, run unrolled, as one scan, or with remat."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvit import schema
from jaxvit.layers.attention import RelativePositionBias, SelfAttention
from jaxvit.layers.common import Array, check_choice, sow
from jaxvit.layers.mlp import LayerScale, MlpBlock, SwiGLUMlp


def drop_path(x: Array, rate: Array | float, rng: Array) -> Array:
    """Stochastic depth: zero whole examples with probability ``rate``, rescale the rest."""
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))


class EncoderBlock(schema.fields_for(schema.BLOCK), nn.Module):
    """``(N, T, D) -> (N, T, D)``: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (with
    ``post_norm``: ``x + norm1(attn(x))``, then ``x + norm2(mlp(x))``).

    Its options are the schema's block fields (``schema.names(module="block")``:
    heads, MLP width and type, activation, epsilon, LayerScale, rope base,
    dropout, dtypes) with the schema's defaults. ``layer_scale_init`` scales
    each branch by a learned ``(D,)`` vector (``ls1``, ``ls2``) before the
    residual; ``mlp_type="swiglu"`` uses ``SwiGLUMlp`` (``mlp_dim`` is then the
    width of each half). ``mlp_dim=None`` is ``4 * D``. ``mlp_norm`` and ``attn_out_norm`` add
    EVA02's sub-LN in the MLP and EVA-CLIP's LayerNorm on the attention output; ``rope`` chooses
    timm Eva's rotary embedding where ``rope_grid`` is set (DINOv3's when it is ``"none"``).

    Called as ``block(x, drop_path_rate) -> (x, None)``, the form ``nn.scan``
    wants; the rate is an array so scanned blocks can each have their own. ``mask`` ``(N, T)``:
    the tokens attention may attend to (a padded sequence's valid ones).
    """

    use_drop_path: bool = False
    rope_grid: tuple[int, int] | None = None
    rope_prefix_tokens: int = 0
    rel_pos_grid: tuple[int, int] | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x: Array, drop_path_rate: Array, attn_bias: Array | None = None, mask: Array | None = None
    ) -> tuple[Array, None]:
        chex.assert_rank(x, 3)
        norm = dict(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype)

        def residual(x: Array, y: Array, scale_name: str, norm_name: str) -> Array:
            if self.post_norm:
                y = nn.LayerNorm(name=norm_name, **norm)(y)
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

        # post_norm (EVA02-E): the same norm1 and norm2, on each branch's output instead of its input
        y = x if self.post_norm else nn.LayerNorm(name="norm1", **norm)(x)
        y = SelfAttention(
            num_heads=self.num_heads,
            attention_dropout=self.attention_dropout,
            qkv_bias=self.qkv_bias,
            rope_grid=self.rope_grid,
            rope_prefix_tokens=self.rope_prefix_tokens,
            rope_theta=self.rope_theta,
            rope_kind="dinov3" if self.rope == "none" else self.rope,
            rope_ref_grid=self.rope_ref_grid,
            rope_grid_offset=self.rope_grid_offset,
            rope_xy=self.rope_xy,
            rel_pos_grid=self.rel_pos_grid,
            out_norm=self.attn_out_norm,
            layer_norm_eps=self.layer_norm_eps,
            name="attn",
            **common,
        )(y, bias=attn_bias, mask=mask)
        x = residual(x, y, "ls1", "norm1")
        y = x if self.post_norm else nn.LayerNorm(name="norm2", **norm)(x)
        check_choice("mlp_type", self.mlp_type, schema.MLP_TYPES)
        mlp_dim = self.mlp_dim or 4 * x.shape[-1]
        sub_ln = dict(norm=self.mlp_norm, layer_norm_eps=self.layer_norm_eps)
        if self.mlp_type == "swiglu":
            y = SwiGLUMlp(mlp_dim=mlp_dim, dropout=self.dropout, name="mlp", **sub_ln, **common)(y)
        else:
            mlp = MlpBlock(
                mlp_dim=mlp_dim,
                dropout=self.dropout,
                activation=self.activation,
                name="mlp",
                **sub_ln,
                **common,
            )
            y = mlp(y)
        x = residual(x, y, "ls2", "norm2")
        sow(self, "intermediates", "out", x)
        return x, None


class Encoder(schema.fields_for(schema.ENCODER), nn.Module):
    """``(N, T, D) -> (N, T, D)``: ``depth`` blocks, then a final LayerNorm.

    ``pre_norm=True`` adds a LayerNorm before the blocks (``norm_pre``, CLIP's
    ``pre_layrnorm``). Works on any tokens, not only those of images. ``scan=True`` stacks the
    blocks' parameters along a leading ``depth`` axis under ``blocks`` and
    compiles one block; ``scan_to_unrolled`` / ``unrolled_to_scan`` convert
    between that layout and ``block_0 ... block_{depth-1}``.
    Drop-path rates grow linearly from 0 to ``drop_path_rate`` over the depth.
    ``rope_grid`` turns on the rotary position embedding in every block (``rope``: timm Eva's
    kind; DINOv3's when ``"none"``), ``rel_pos_grid``
    BEiT's relative position bias (a table per block, for one class token in front; with
    ``rel_pos_shared``, one table under ``rel_pos_bias`` that every block adds).
    ``final_norm=False`` leaves out the final LayerNorm (CoCa's attentional pooler normalises
    the tokens itself). ``mask`` ``(N, T)`` bool: the tokens attention may attend to, in every
    block (a padded sequence's valid tokens). Its options are the schema's encoder fields
    (``schema.names(module="encoder")``), with the schema's defaults:
    ``Encoder(depth=2, num_heads=4)`` composes on its own.
    """

    rope_grid: tuple[int, int] | None = None
    rope_prefix_tokens: int = 0
    rel_pos_grid: tuple[int, int] | None = None
    rel_pos_shared: bool = False
    final_norm: bool = True

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False, mask: Array | None = None) -> Array:
        chex.assert_rank(x, 3)
        if mask is not None:
            chex.assert_shape(mask, x.shape[:2])
        check_choice("remat_policy", self.remat_policy, schema.REMAT_POLICIES)
        check_choice("block_loop", self.block_loop, schema.BLOCK_LOOPS)
        norm = dict(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.pre_norm:
            x = nn.LayerNorm(name="norm_pre", **norm)(x)
        kw = schema.pick(
            self,
            EncoderBlock,
            use_drop_path=self.drop_path_rate > 0.0,
            rope_grid=self.rope_grid,
            rope_prefix_tokens=self.rope_prefix_tokens,
            rel_pos_grid=None if self.rel_pos_shared else self.rel_pos_grid,
            deterministic=not train,
        )
        shared = None  # BEiT's pre-training: one relative position table that every block adds
        if self.rel_pos_shared and self.rel_pos_grid is not None:
            shared = RelativePositionBias(
                self.rel_pos_grid, self.num_heads, self.param_dtype, name="rel_pos_bias"
            )()
        rates = jnp.linspace(0.0, self.drop_path_rate, self.depth, dtype=jnp.float32)
        if self.scan:
            block_cls = self._remat(EncoderBlock, self._remat_policy(scanned=True), prevent_cse=False)
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0, "intermediates": 0, "attention": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=self.depth,
            )
            x, _ = stack(name="blocks", **kw)(x, rates, shared, mask)
        elif self._loop_over_stacked_blocks(train):
            x = self._scan_unrolled_blocks(x, rates, train, kw, shared, mask)
        else:
            block_cls = self._remat(EncoderBlock, self._remat_policy(scanned=False), prevent_cse=True)
            for i in range(self.depth):
                x, _ = block_cls(name=f"block_{i}", **kw)(x, rates[i], shared, mask)
        return nn.LayerNorm(name="norm", **norm)(x) if self.final_norm else x

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

    def _scan_unrolled_blocks(
        self,
        x: Array,
        rates: Array,
        train: bool,
        kw: dict[str, Any],
        shared: Array | None,
        mask: Array | None,
    ) -> Array:
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
            return block.apply({"params": block_params}, x, rate, shared, mask, rngs=rngs)[0], None

        policy = self._remat_policy(scanned=True)
        if policy != "none":
            one_block = jax.checkpoint(one_block, policy=getattr(jax.checkpoint_policies, policy))
        x, _ = jax.lax.scan(one_block, x, (stacked, rates, keys))
        return x
