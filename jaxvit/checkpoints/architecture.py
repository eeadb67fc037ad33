"""The model a checkpoint was made for, told from its config or, failing that, its shapes."""

from __future__ import annotations

from typing import Any

from jaxvit import schema
from jaxvit.checkpoints import registry
from jaxvit.checkpoints.checkpoint import Checkpoint, depth_of
from jaxvit.checkpoints.fitting import check_blocks, check_declared
from jaxvit.model import MODEL_FIELDS, VisionTransformer, create_model
from jaxvit.sizes import square_grid, to_pair
from jaxvit.variants import VARIANTS


def unknown_num_heads(width: int, path: str) -> ValueError:
    """The refusal of a file that does not say its head count: one width has several (ViT-B's 768
    has 12 heads, timm's ``vit_base_patch16_gap_224`` 16), so none is guessed."""
    usual = [
        f"ViT-{name} has {sizes['num_heads']}" for name, sizes in VARIANTS.items() if sizes["width"] == width
    ]
    hint = f" ({', '.join(usual)})" if usual else ""
    return ValueError(
        f"{path} does not say its number of attention heads (width {width}{hint}): pass num_heads=..."
        " (predict --num-heads), or read the folder it came in, whose config says it"
    )


def model_from_checkpoint(ckpt: Checkpoint, **overrides: Any) -> tuple[VisionTransformer, tuple[int, int]]:
    """``(model, image_size)`` that a read checkpoint was made for, from its shapes and config.

    Fields the weights cannot tell take the origin's defaults (its
    ``guess_fields``, else exact GELU and LayerNorm epsilon 1e-6);
    ``overrides`` set any model field.
    """
    if ckpt.grid_ambiguity:
        raise ValueError(ckpt.grid_ambiguity)
    try:
        model, size = _build(ckpt, overrides)
    except ValueError as e:  # the model's own checks do not know the file
        if ckpt.path in str(e):
            raise
        raise ValueError(f"{ckpt.path}: {e}") from None
    # What the file declares must agree with its weights before anything is traced.
    check_declared(ckpt, model, size, given=set(overrides))
    return model, size


def _shape(params: Any, key: str, ndim: int, path: str) -> tuple[int, ...]:
    shape = tuple(params[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"{path}: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def _refuse_unstated(ckpt: Checkpoint, overrides: dict[str, Any], fields: dict[str, Any]) -> None:
    """Raises for the first field the file cannot tell (``Checkpoint.unstated``) that the caller left
    open and that counts for the model ``fields`` and ``overrides`` make (no rotary base without a
    rotary embedding)."""
    config = schema.ViTConfig(**{k: v for k, v in {**fields, **overrides}.items() if k in MODEL_FIELDS})

    def counts(name: str) -> bool:
        applies = schema.SPECS[name].applies
        return applies is None or applies(config)

    unstated = {k: why for k, why in ckpt.unstated.items() if k not in overrides and counts(k)}
    if unstated:
        field, why = next(iter(unstated.items()))
        raise ValueError(f"{ckpt.path}: {why}: pass {field}=...")


def _block_options(params: Any) -> dict[str, Any]:
    """What the first block's parameters show: qkv biases, the norms inside attention and MLP, a
    relative position table, learned rotary frequencies (timm's RotaryEmbeddingMixed)."""
    attn = "encoder/block_0/attn/"
    options: dict[str, Any] = dict(
        qkv_bias=not any(k.startswith(attn) for k in params)
        or any(k in params for k in (attn + "qkv/bias", attn + "query/bias")),
        attn_out_norm=attn + "norm/scale" in params,
        mlp_norm="encoder/block_0/mlp/norm/scale" in params,
        rel_pos_bias="block"
        if attn + "rel_pos_bias/table" in params
        else ("shared" if "encoder/rel_pos_bias/table" in params else "none"),
    )
    if attn + "rope_freqs" in params:
        options["rope"] = "mixed"
    return options


def _build(ckpt: Checkpoint, overrides: dict[str, Any]) -> tuple[VisionTransformer, tuple[int, int]]:
    fmt = registry.by_origin(ckpt.origin)
    build = registry.hook(fmt, "build_model")
    built = build(ckpt, **overrides) if build else None
    if built is not None:
        return built
    params = ckpt.params
    if "patch_embed/kernel" not in params:
        raise ValueError(f"{ckpt.path} has no patch embedding: cannot tell the model")
    check_blocks(ckpt)
    saved = ckpt.config.get("model", {})
    if saved:
        fields = {k: v for k, v in saved.items() if k in MODEL_FIELDS}
        fields.update(overrides)
        model = create_model(None, **fields)
        return model, to_pair(ckpt.config.get("image_size", 224))
    kp, kq, channels, width = _shape(params, "patch_embed/kernel", 4, ckpt.path)
    class_token = "cls_token/token" in params
    fc1, fc2 = params.get("encoder/block_0/mlp/fc1/kernel"), params.get("encoder/block_0/mlp/fc2/kernel")
    for key, kernel in (("fc1", fc1), ("fc2", fc2)):
        if kernel is not None:
            _shape(params, f"encoder/block_0/mlp/{key}/kernel", 2, ckpt.path)
    # A packed SwiGLU's fc1 is twice as wide as fc2's input: gate and value side by side.
    swiglu = fc1 is not None and fc2 is not None and fc1.shape[-1] == 2 * fc2.shape[0]
    pool = "map" if any(k.startswith("head/map/") for k in params) else ("tok" if class_token else "gap")
    fields: dict[str, Any] = dict(
        num_classes=_shape(params, "head/classifier/kernel", 2, ckpt.path)[-1]
        if "head/classifier/kernel" in params
        else 0,
        patch_size=kp if kp == kq else (kp, kq),
        width=width,
        depth=depth_of(params),
        mlp_dim=(fc2.shape[0] if swiglu else fc1.shape[-1]) if fc1 is not None else None,
        mlp_type="swiglu" if swiglu else "mlp",
        num_registers=params["registers/tokens"].shape[1] if "registers/tokens" in params else 0,
        distill_token="dist_token/token" in params,
        # The weights hold the learned scales; the initial value only matters for training anew.
        layer_scale_init=1e-5 if "encoder/block_0/ls1/scale" in params else None,
        num_channels=channels,
        class_token=class_token,
        pool=pool,
        posemb="learn" if "pos_embed/embedding" in params else "sincos2d",
        representation_size=(
            _shape(params, "head/pre_logits/kernel", 2, ckpt.path)[-1]
            if "head/pre_logits/kernel" in params
            else None
        ),
        pre_norm="encoder/norm_pre/scale" in params,
        fc_norm="head/fc_norm/scale" in params,
        patch_bias="patch_embed/bias" in params,
        **_block_options(params),
    )
    map_fc1 = params.get("head/map/mlp/fc1/kernel")
    if map_fc1 is not None and map_fc1.shape[-1] != (fields["mlp_dim"] or 4 * width):
        fields["pool_mlp_dim"] = _shape(params, "head/map/mlp/fc1/kernel", 2, ckpt.path)[-1]
    guess_fields = registry.hook(fmt, "guess_fields")
    if guess_fields is not None:
        fields.update(guess_fields(ckpt))
    if "head/classifier/kernel" in params:
        fields["head_bias"] = "head/classifier/bias" in params
    fields.update(ckpt.implied_fields)
    _refuse_unstated(ckpt, overrides, fields)
    fields.update(overrides)
    if "num_heads" not in fields:
        if ckpt.num_heads is None:
            raise unknown_num_heads(width, ckpt.path)
        fields["num_heads"] = ckpt.num_heads
    model = create_model(None, **fields)
    size = (224, 224) if ckpt.grid is None else (ckpt.grid[0] * kp, ckpt.grid[1] * kq)
    if "pos_embed/embedding" in params:
        grid_len = _shape(params, "pos_embed/embedding", 3, ckpt.path)[1] - ckpt.num_prefix_tokens
        grid = ckpt.grid or square_grid(grid_len)
        if grid is None:
            raise ValueError(
                f"{ckpt.path}: {grid_len} position-embedding grid tokens is not a square: pass"
                f" checkpoint_grid=(h, w)"
            )
        size = (grid[0] * kp, grid[1] * kq)
    return model, size
