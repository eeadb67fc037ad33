"""The model's options, declared once: ``ViTConfig``.

Each field of ``ViTConfig`` carries its default, its kind, its allowed values
or range, and its role:

- ``"architecture"``: what the weights compute (a checkpoint states it, an
  export must carry it);
- ``"regularization"``: dropout rates, only active when training;
- ``"init"``: initial values, which a loaded checkpoint replaces;
- ``"compute"``: how the same function runs (dtypes, scan, remat).

From this one declaration come the model's fields (``VisionTransformer``),
the fields of the composite modules (``Encoder``, ``EncoderBlock``: see
``fields_for``), the checks of single values (``check_values``), the typed
reading of untrusted configs (``read_fields``), the config files' ``model``
section and the fields an export writes. Cross-field rules (a width that
splits into heads, ``pool="tok"`` needs a class token) are in
``jaxvit.model.check_config``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from jaxvit import compat, ops
from jaxvit.safety import validate
from jaxvit.safety.validate import MAX_CHANNELS, MAX_CLASSES, MAX_DEPTH, MAX_MLP_DIM, MAX_PATCH, MAX_WIDTH

ROLES = ("architecture", "regularization", "init", "compute")
# "attn_pool": CoCa's attentional pooler (open_clip), with its own queries, heads and width.
POOLINGS = ("tok", "gap", "map", "attn_pool")
# How an encoder with unrolled parameters (scan=False) runs its blocks: "auto" runs them as
# one lax.scan over the stacked parameters when training and unrolled otherwise.
BLOCK_LOOPS = ("auto", "scan", "unrolled")
# "sincos2d_mae": MAE's fixed sin-cos (frequencies k / (D/4), not big_vision's k / (D/4 - 1)).
POSEMBS = ("learn", "sincos2d", "sincos2d_mae", "rope", "none")
SINCOS_POSEMBS = ("sincos2d", "sincos2d_mae")
MLP_TYPES = ("mlp", "swiglu")
# BEiT's learned relative position bias on the attention logits: "block", a table per block (BEiT
# fine-tuned); "shared", one table for every block (BEiT's pre-training).
REL_POS_BIASES = ("none", "block", "shared")
# timm Eva's rotary embeddings ("axial": RotaryEmbeddingCat, "mixed": RotaryEmbeddingMixed), which
# may sit beside an additive table; DINOv3's, which replaces it, is posemb="rope".
ROPES = ("none", "axial", "mixed")
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
# The composite modules that take their options from the schema (``fields_for``).
BLOCK, ENCODER = "block", "encoder"

_SPEC = "jaxvit"


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a field may hold: ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``size``
    (an int or an ``(h, w)`` pair) or ``dtype``; ``lo``/``hi`` bound numbers (``lo_open``:
    ``lo`` itself is excluded); ``optional``: None is allowed; ``modules``: the composite
    modules that take the field; ``from_variant``: a variant name sets it; ``top_level``:
    a training config keeps it beside the data settings, not under ``model``; ``applies``:
    whether the field counts at all for a given config (a rotary base without rope does not)."""

    kind: str
    role: str
    choices: tuple[str, ...] = ()
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    optional: bool = False
    modules: tuple[str, ...] = ()
    from_variant: bool = False
    top_level: bool = False
    doc: str = ""
    # whether the field changes what a model computes, given its config (None: always)
    applies: Callable[[Any], bool] | None = None


def option(default: Any, kind: str, role: str, doc: str = "", **spec: Any) -> Any:
    """A ``ViTConfig`` field: ``default`` plus its ``Spec``."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: expected one of {ROLES}")
    return dataclasses.field(default=default, metadata={_SPEC: Spec(kind, role, doc=doc, **spec)})


def _attn_pool(config: Any) -> bool:
    return config.pool == "attn_pool"


def _pooled_by_attention(config: Any) -> bool:
    return config.pool in ("map", "attn_pool")


def _rotary(config: Any) -> bool:
    return config.posemb == "rope" or config.rope != "none"


def _axial(config: Any) -> bool:
    return config.rope == "axial"


_B = (BLOCK, ENCODER)  # options every block takes, and so the encoder that builds them
_E = (ENCODER,)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Every option of ``VisionTransformer``, with its default. Hashable, so modules can hold it."""

    num_classes: int = option(1000, "int", "architecture", "classes; 0: the pooled features", lo=0, hi=MAX_CLASSES, top_level=True)  # fmt: skip
    patch_size: int | tuple[int, int] = option(16, "size", "architecture", "patch side, or (h, w)", lo=1, hi=MAX_PATCH, from_variant=True)  # fmt: skip
    width: int = option(768, "int", "architecture", "token width D", lo=1, hi=MAX_WIDTH, from_variant=True)
    depth: int = option(12, "int", "architecture", "encoder blocks", lo=0, hi=MAX_DEPTH, modules=_E, from_variant=True)  # fmt: skip
    mlp_dim: int | None = option(None, "int", "architecture", "MLP width; None: 4 * width", lo=1, hi=MAX_MLP_DIM, optional=True, modules=_B, from_variant=True)  # fmt: skip
    num_heads: int = option(12, "int", "architecture", "attention heads", lo=1, hi=MAX_WIDTH, modules=_B, from_variant=True)  # fmt: skip
    num_channels: int = option(3, "int", "architecture", "image channels", lo=1, hi=MAX_CHANNELS, top_level=True)  # fmt: skip
    posemb: str = option("learn", "str", "architecture", "position embedding", choices=POSEMBS)
    class_token: bool = option(True, "bool", "architecture", "a class token in front")
    pool: str = option("tok", "str", "architecture", "pooling of the head", choices=POOLINGS)
    representation_size: int | None = option(None, "int", "architecture", "Dense + tanh before the classifier", lo=1, hi=MAX_WIDTH, optional=True)  # fmt: skip
    pool_queries: int = option(1, "int", "architecture", "learned queries of pool='attn_pool' (the first is pooled)", lo=1, hi=MAX_WIDTH, applies=_attn_pool)  # fmt: skip
    pool_heads: int | None = option(None, "int", "architecture", "heads of pool='map' or 'attn_pool'; None: num_heads", lo=1, hi=MAX_WIDTH, optional=True, applies=_pooled_by_attention)  # fmt: skip
    pool_width: int | None = option(None, "int", "architecture", "width of pool='attn_pool' (its queries and output); None: width", lo=1, hi=MAX_WIDTH, optional=True, applies=_attn_pool)  # fmt: skip
    fc_norm: bool = option(False, "bool", "architecture", "the final LayerNorm after pooling, not before (MAE, BEiT, EVA02)")  # fmt: skip
    pool_mlp_dim: int | None = option(None, "int", "architecture", "MLP width of pool='map'; None: mlp_dim (PE's is 4 * width)", lo=1, hi=MAX_MLP_DIM, optional=True, applies=lambda c: c.pool == "map")  # fmt: skip
    final_norm: bool = option(True, "bool", "architecture", "False: no final LayerNorm at all, of the tokens or the pooled features (PE-Spatial, PE-Lang)", applies=lambda c: c.pool != "attn_pool")  # fmt: skip
    dropout: float = option(0.0, "float", "regularization", "dropout rate", lo=0.0, hi=1.0, modules=_B)
    attention_dropout: float = option(0.0, "float", "regularization", "dropout of the attention weights", lo=0.0, hi=1.0, modules=_B)  # fmt: skip
    drop_path_rate: float = option(0.0, "float", "regularization", "stochastic depth of the last block", lo=0.0, hi=1.0, modules=_E)  # fmt: skip
    activation: str = option("gelu", "str", "architecture", "MLP activation", choices=ops.ACTIVATIONS, modules=_B)  # fmt: skip
    pre_norm: bool = option(False, "bool", "architecture", "a LayerNorm before the blocks", modules=_E)
    patch_bias: bool = option(True, "bool", "architecture", "a bias in the patch embedding")
    qkv_bias: bool = option(True, "bool", "architecture", "biases in the qkv projection", modules=_B)
    head_bias: bool = option(True, "bool", "architecture", "a bias in the classifier", applies=lambda c: c.num_classes > 0)  # fmt: skip
    layer_norm_eps: float = option(1e-6, "float", "architecture", "LayerNorm epsilon", lo=0.0, hi=1.0, lo_open=True, modules=_B)  # fmt: skip
    head_bias_init: float = option(0.0, "float", "init", "initial classifier bias")
    num_registers: int = option(0, "int", "architecture", "register tokens (DINOv2)", lo=0, hi=MAX_DEPTH)
    layer_scale_init: float | None = option(None, "float", "architecture", "LayerScale on both branches, from this value", optional=True, modules=_B)  # fmt: skip
    mlp_type: str = option("mlp", "str", "architecture", "'swiglu': DINOv2-g's packed SwiGLU", choices=MLP_TYPES, modules=_B)  # fmt: skip
    distill_token: bool = option(False, "bool", "architecture", "DeiT's distillation token")
    rope_theta: float = option(100.0, "float", "architecture", "rotary base (posemb='rope', rope='axial' or 'mixed')", lo=0.0, lo_open=True, modules=_B, applies=_rotary)  # fmt: skip
    rope: str = option("none", "str", "architecture", "timm Eva's rotary embedding, beside any posemb: 'axial' (EVA02, PE, RoPE-ViT), 'mixed' (learned per head)", choices=ROPES, modules=_B)  # fmt: skip
    rope_ref_grid: int | tuple[int, int] | None = option(None, "size", "architecture", "rope='axial': coordinates stretched to this grid (EVA02's ref_feat_shape)", hi=MAX_PATCH, optional=True, modules=_B, applies=_axial)  # fmt: skip
    rope_grid_offset: float = option(0.0, "float", "architecture", "rope='axial': added to the patch indices (PE's 1)", lo=0.0, hi=MAX_PATCH, modules=_B, applies=_axial)  # fmt: skip
    rope_xy: bool = option(False, "bool", "architecture", "rope='axial' or 'mixed': (x, y) coordinates, not (y, x)", modules=_B, applies=lambda c: c.rope != "none")  # fmt: skip
    mlp_norm: bool = option(False, "bool", "architecture", "a LayerNorm inside the MLP, before fc2 (EVA02's sub-LN)", modules=_B)  # fmt: skip
    post_norm: bool = option(False, "bool", "architecture", "each branch's output LayerNormed before its residual, not its input (EVA02-E)", modules=_B)  # fmt: skip
    attn_out_norm: bool = option(False, "bool", "architecture", "a LayerNorm on the attention output, before its projection (EVA-CLIP)", modules=_B)  # fmt: skip
    posemb_grid: int | tuple[int, int] | None = option(None, "size", "architecture", "posemb='learn': the table's own grid, resized (antialiased bilinear) to each image's grid (NaFlex); None: the images' grid", lo=1, hi=MAX_PATCH, optional=True, applies=lambda c: c.posemb == "learn")  # fmt: skip
    rel_pos_bias: str = option("none", "str", "architecture", "BEiT's relative position bias: 'block', a table per block; 'shared', one for all", choices=REL_POS_BIASES)  # fmt: skip
    gelu_approximate: bool = option(False, "bool", "architecture", "deprecated: activation='gelu_tanh'")
    scan: bool = option(False, "bool", "compute", "blocks stored stacked under encoder/blocks", modules=_E)  # fmt: skip
    remat_policy: str = option("auto", "str", "compute", "jax.checkpoint_policies name", choices=REMAT_POLICIES, modules=_E)  # fmt: skip
    block_loop: str = option("auto", "str", "compute", "how unrolled blocks run", choices=BLOCK_LOOPS, modules=_E)  # fmt: skip
    dtype: Any = option(jnp.float32, "dtype", "compute", "compute dtype", modules=_B)
    param_dtype: Any = option(jnp.float32, "dtype", "compute", "parameter dtype", modules=_B)


FIELDS: tuple[dataclasses.Field, ...] = dataclasses.fields(ViTConfig)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)
SPECS: dict[str, Spec] = {f.name: f.metadata[_SPEC] for f in FIELDS}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in FIELDS}


def names(role: str | None = None, module: str | None = None) -> tuple[str, ...]:
    """The field names of a ``role`` and/or taken by a composite ``module``, in declaration order."""
    return tuple(
        n
        for n, s in SPECS.items()
        if (role is None or s.role == role) and (module is None or module in s.modules)
    )


def fields_for(module: str | None) -> type:
    """A dataclass mixin with the schema fields that ``module`` (``BLOCK``, ``ENCODER``; None: the
    whole model) takes.

    ``class Encoder(fields_for(ENCODER), nn.Module)`` gives the module those keyword fields,
    with the schema's defaults, without restating them.
    """
    chosen = [
        (f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
        for f in FIELDS
        if module is None or module in SPECS[f.name].modules
    ]
    return dataclasses.make_dataclass(f"{(module or 'model').title()}Options", chosen, kw_only=True)


def fields_for_model() -> type:
    """A dataclass mixin with every schema field: ``VisionTransformer``'s fields."""
    return fields_for(None)


def pick(source: Any, target: type, **extra: Any) -> dict[str, Any]:
    """The keyword arguments of ``target`` that are schema fields, read from ``source``, plus ``extra``."""
    wanted = {f.name for f in dataclasses.fields(target)} & set(FIELD_NAMES)
    return {**{n: getattr(source, n) for n in FIELD_NAMES if n in wanted}, **extra}


def config_of(model: Any) -> ViTConfig:
    """The ``ViTConfig`` of anything with the schema's fields (a ``VisionTransformer``), in
    today's spelling: a deprecated ``gelu_approximate=True`` is read as ``activation="gelu_tanh"``."""
    return ViTConfig(**compat.current_spelling({n: getattr(model, n) for n in FIELD_NAMES}, warn=True))


def check_values(fields: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` for an unknown choice or a number out of range, naming the field."""
    for name, value in fields.items():
        spec = SPECS.get(name)
        if spec is None or (value is None and spec.optional):
            continue
        if spec.choices and value not in spec.choices:
            raise ValueError(f"unknown {name} {value!r}: expected one of {spec.choices}")
        if spec.kind in ("int", "float") and not isinstance(value, bool) and isinstance(value, (int, float)):
            _check_range(name, value, spec)


def _check_range(name: str, value: float, spec: Spec) -> None:
    low_bad = spec.lo is not None and (value <= spec.lo if spec.lo_open else value < spec.lo)
    if low_bad or (spec.hi is not None and value > spec.hi):
        low = "" if spec.lo is None else f"{'>' if spec.lo_open else '>='} {spec.lo}"
        high = "" if spec.hi is None else f"<= {spec.hi}"
        raise ValueError(f"{name} must be {' and '.join(b for b in (low, high) if b)}, got {value}")


def read_fields(fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Model fields read from an untrusted file, each checked for its type and range.

    Keys the schema does not know pass through unchanged (``variant``, and
    whatever ``create_model`` then refuses by name); old spellings stored by
    earlier versions are read through ``jaxvit.compat``. JSON lists become tuples.
    """
    if not isinstance(fields, Mapping):
        raise ValueError(f"{where}: the model fields must be a JSON object, got {type(fields).__name__}")
    out = dict(fields)
    for name, spec in SPECS.items():
        if name not in fields or (fields[name] is None and spec.optional):
            continue
        out[name] = _read_one(fields, name, spec, where)
    try:
        out = compat.current_spelling(out)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if out.get("variant") is not None and not isinstance(out["variant"], str):
        raise ValueError(f"{where}: variant must be a string, got {out['variant']!r}")
    return out


def check_size(model: Any, where: str) -> None:
    """Raises if a model built from a file's config is larger than any ViT (before it is traced)."""
    read_fields({n: getattr(model, n) for n, s in SPECS.items() if s.kind in ("int", "size")}, where)


def _read_one(fields: Mapping[str, Any], name: str, spec: Spec, where: str) -> Any:
    if spec.kind == "int":
        value: Any = validate.int_field(fields, name, where, lo=int(spec.lo), hi=int(spec.hi))
    elif spec.kind == "float":
        value = validate.float_field(fields, name, where, lo=spec.lo, hi=spec.hi, lo_open=spec.lo_open)
    elif spec.kind == "bool":
        value = validate.bool_field(fields, name, where)
    elif spec.kind == "str":
        value = validate.str_field(fields, name, where)
    elif spec.kind == "size":
        value = validate.size_field(fields, name, where, hi=int(spec.hi))
    else:
        value = _read_dtype(fields[name], name, where)
    return value


def _read_dtype(value: Any, name: str, where: str) -> Any:
    if not isinstance(value, str):
        return value  # a dtype object from Python code
    try:
        return jnp.dtype(compat.DTYPE_ALIASES.get(value, value))
    except TypeError:
        raise ValueError(
            f"{where}: {name}={value!r} is not a dtype: expected one of"
            f" {sorted({'float32', 'bfloat16', 'float16', *compat.DTYPE_ALIASES})}"
        ) from None


def json_fields(model: Any) -> dict[str, Any]:
    """Every field of ``model`` as JSON values (dtypes by name), for export metadata and workdirs."""
    config = config_of(model)
    out = {}
    for name in FIELD_NAMES:
        value = getattr(config, name)
        out[name] = jnp.dtype(value).name if SPECS[name].kind == "dtype" else value
    return out


def differs_from_default(model: Any, role: str = "architecture") -> dict[str, Any]:
    """The fields of ``role`` that count for ``model`` (``Spec.applies``) and are not at their
    defaults: what a writer must carry."""
    config = config_of(model)
    return {
        n: getattr(config, n)
        for n in names(role)
        if getattr(config, n) != DEFAULTS[n] and (SPECS[n].applies is None or SPECS[n].applies(config))
    }
