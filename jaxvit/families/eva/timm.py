"""timm's ``Eva`` state dicts and hub folders other than DINOv3's, read and written: EVA-01, EVA02
(classification and CLIP towers, EVA02-E's post-norm blocks), Perception Encoder (PE-Core with its
attention pooling, PE-Spatial and PE-Lang with no final norm) and the RoPE ViTs (``vit_*_rope_*``,
``vit_*_rope_reg*_gap_256``).

The keys: LayerScale ``gamma_1`` / ``gamma_2``; one ``qkv`` with ``q_bias`` and ``v_bias`` (no key
bias), a full ``qkv.bias`` (``AttentionRope``), or separate ``q_proj``, ``k_proj``, ``v_proj``
(EVA02-B and -L), all fused into jaxvit's ``qkv``; ``attn.norm`` (EVA-CLIP, ``attn_out_norm``);
the MLP plain, packed SwiGLU (``fc1``) or SwiGLU with a sub-LN (``fc1_g``, ``fc1_x``, ``norm``:
``mlp_norm``); the mixed RoPE's learned ``rope.freqs`` ``(2, depth, heads, head_dim / 2)``, one
slice per block. What the weights cannot tell (the rotary embedding's kind, base, axis order and
reference grid; the pooling) a hub folder's ``config.json`` states through its registered
architecture (``TIMM_MODELS``) and ``model_args``; a bare state dict that is not jaxvit's export
is asked for them. The position table is resized as timm's ``checkpoint_filter_fn`` resizes it
(bicubic, antialiased). EVA's MIM checkpoints and the Eva models outside ``TIMM_MODELS`` are
refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts, timm_hub
from jaxvit.checkpoints.checkpoint import Checkpoint, Flat, Preprocessing, grid_from_config, strip_prefix
from jaxvit.families.dinov3 import timm as dinov3_timm
from jaxvit.families.eva import TIMM_MODELS
from jaxvit.families.vit.timm import saved_config
from jaxvit.safety import validate
from jaxvit.sizes import square_grid, to_pair

NAME = "timm_eva"
# a timm hub folder's weights are read here when they are Eva's (timm_hub), or when its
# config.json names one of these architectures
READS_TIMM_FOLDERS = True
TIMM_MODELS_READ = frozenset(TIMM_MODELS)
HAS_SINCOS = False
EXPORT_FORMAT = "timm"
TARGET = "timm Eva"
# a registered Eva with no rotary embedding, no LayerScale and no reference grid, so that the
# arguments timm drops when they are None (init_values, ref_feat_shape) stay None
TIMM_MODEL = "eva_giant_patch14_224"
# LayerNorm's epsilon is no argument timm's JSON can state: a model of PE's 1e-5 is written as PE
TIMM_MODEL_BY_EPS = {1e-6: TIMM_MODEL, 1e-5: "vit_pe_spatial_tiny_patch16_512"}
CARRIES = (
    "posemb",
    "pool",
    "pool_heads",
    "pool_mlp_dim",
    "class_token",
    "fc_norm",
    "final_norm",
    "post_norm",
    "layer_norm_eps",
    "pre_norm",
    "patch_bias",
    "qkv_bias",
    "num_registers",
    "layer_scale_init",
    "mlp_type",
    "mlp_norm",
    "attn_out_norm",
    "rope",
    "rope_theta",
    "rope_ref_grid",
    "rope_grid_offset",
    "rope_xy",
)
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=5, rope="axial", rope_theta=10_000.0, pool="gap", fc_norm=True)
# timm's EVA02 configs: shorter side to size / 0.9, center crop, bicubic, OpenAI CLIP statistics.
PREPROCESSING = Preprocessing(
    (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), 0.9, "bicubic"
)
IMPLIED_FIELDS = dict(layer_norm_eps=1e-6)
RULES = tuple(
    layouts.torch_rules("patch_embed.proj", "patch_embed", "conv")
    + [
        layouts.Rule("cls_token", "cls_token/token"),
        layouts.Rule("reg_token", "registers/tokens"),
        layouts.Rule("pos_embed", "pos_embed/embedding"),
        layouts.Rule("blocks.{i}.gamma_1", "encoder/block_{i}/ls1/scale"),
        layouts.Rule("blocks.{i}.gamma_2", "encoder/block_{i}/ls2/scale"),
        layouts.Rule("blocks.{i}.attn.rope_freqs", "encoder/block_{i}/attn/rope_freqs"),
    ]
    + layouts.torch_rules("norm_pre", "encoder/norm_pre", "ln")
    + layouts.torch_rules("blocks.{i}.attn.norm", "encoder/block_{i}/attn/norm", "ln")
    + layouts.torch_rules("blocks.{i}.mlp.norm", "encoder/block_{i}/mlp/norm", "ln")
    + layouts.TIMM_ENCODER_RULES
    + layouts.torch_rules("fc_norm", "head/fc_norm", "ln")
    + layouts.torch_rules("head", "head/classifier", "linear")
    + layouts.TIMM_ATTN_POOL_RULES
)
# the create_model arguments a timm Eva folder may state: those jaxvit's export writes
MODEL_ARGS = frozenset(
    "img_size patch_size in_chans num_classes embed_dim depth num_heads mlp_ratio qkv_bias qkv_fused"
    " attn_type swiglu_mlp scale_mlp scale_attn_inner init_values class_token num_reg_tokens"
    " no_embed_class use_abs_pos_emb use_rot_pos_emb rope_type rope_temperature rope_grid_offset"
    " rope_grid_indexing ref_feat_shape use_pre_transformer_norm use_post_transformer_norm use_fc_norm"
    " global_pool dynamic_img_size use_post_norm attn_pool_num_heads attn_pool_mlp_ratio".split()
)
_EVA_KEY = re.compile(r"blocks\.\d+\.(gamma_1|attn\.q_bias|attn\.q_proj\.weight|mlp\.fc1_g\.weight)")
_POOLS = {"avg": "gap", "token": "tok", "map": "map"}


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A state dict with keys only timm's ``Eva`` has, which is not DINOv3's (``families/dinov3``)
    nor BEiT's (``families/beit``)."""
    if kind != "state_dict":
        return False
    keys = [k.removeprefix("module.") for k in arrays]
    return (
        any(_EVA_KEY.fullmatch(k) or k == "rope.freqs" for k in keys)
        and not any(k.endswith("relative_position_bias_table") for k in keys)
        and not dinov3_timm.claims(kind, arrays)
    )


def _split_mixed_freqs(arrays: Flat) -> Flat:
    """``rope.freqs`` ``(2, depth, heads, head_dim / 2)`` -> each block's ``(2, heads, head_dim / 2)``."""
    out = dict(arrays)
    freqs = out.pop("rope.freqs", None)
    if freqs is not None:
        if freqs.ndim != 4:
            raise ValueError(f"rope.freqs has shape {freqs.shape}, expected (2, depth, heads, head_dim / 2)")
        for i in range(freqs.shape[1]):
            out[f"blocks.{i}.attn.rope_freqs"] = np.ascontiguousarray(freqs[:, i])
    return out


def _join_mixed_freqs(arrays: Flat) -> Flat:
    out = dict(arrays)
    blocks = sorted(
        (int(k.split(".")[1]), k) for k in arrays if re.fullmatch(r"blocks\.\d+\.attn\.rope_freqs", k)
    )
    if blocks:
        out["rope.freqs"] = np.stack([out.pop(k) for _, k in blocks], axis=1)
    return out


def _fields_from_args(args: Mapping[str, Any], fields: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The registered architecture's fields with what ``model_args`` changes of them."""
    out = dict(fields)
    if "use_rot_pos_emb" in args and not validate.bool_field(args, "use_rot_pos_emb", where):
        out["rope"] = "none"
    elif "rope_type" in args:
        kind = validate.str_field(args, "rope_type", where)
        if kind not in ("cat", "mixed"):
            raise ValueError(
                f"{where}: timm Eva with rope_type={kind!r}: not supported (jaxvit has cat, mixed)"
            )
        out["rope"] = "axial" if kind == "cat" else "mixed"
    elif args.get("use_rot_pos_emb"):
        out["rope"] = "axial"
    if "rope_temperature" in args:
        out["rope_theta"] = validate.float_field(args, "rope_temperature", where, lo=0.0, lo_open=True)
    if "rope_grid_offset" in args:
        out["rope_grid_offset"] = validate.float_field(args, "rope_grid_offset", where, lo=0.0)
    if "rope_grid_indexing" in args:
        indexing = validate.str_field(args, "rope_grid_indexing", where)
        if indexing not in ("ij", "xy"):
            raise ValueError(f"{where}: rope_grid_indexing must be 'ij' or 'xy', got {indexing!r}")
        out["rope_xy"] = indexing == "xy"
    if "ref_feat_shape" in args:
        ref = args["ref_feat_shape"]
        out["rope_ref_grid"] = (
            None if ref is None else to_pair(validate.size_field(args, "ref_feat_shape", where))
        )
    if "use_post_norm" in args:
        out["post_norm"] = validate.bool_field(args, "use_post_norm", where)
    if args.get("attn_pool_num_heads") is not None:
        out["pool_heads"] = validate.int_field(args, "attn_pool_num_heads", where, lo=1, hi=4096)
    return out


def _check_pool_mlp(params: Flat, args: Mapping[str, Any], where: str) -> None:
    """The attention pooling's MLP width that ``attn_pool_mlp_ratio`` (else ``mlp_ratio``) states
    must be the weights'."""
    fc1 = params.get("head/map/mlp/fc1/kernel")
    kernel = params.get("patch_embed/kernel")
    ratio = args.get("attn_pool_mlp_ratio", args.get("mlp_ratio"))
    if fc1 is None or kernel is None or ratio is None:
        return
    key = "attn_pool_mlp_ratio" if "attn_pool_mlp_ratio" in args else "mlp_ratio"
    stated = int(kernel.shape[-1] * validate.float_field(args, key, where, lo=0.0, lo_open=True))
    if stated != fc1.shape[-1]:
        raise ValueError(
            f"{where}: {key}={ratio} gives an attention-pooling MLP of {stated}, the weights' has {fc1.shape[-1]}"
        )


def _check_norms(
    params: Flat, args: Mapping[str, Any], registered: Mapping[str, Any], pool_name: str, where: str
) -> dict[str, bool]:
    """The folder's ``fc_norm`` and ``final_norm`` (from ``model_args``, else the registered
    architecture's, else timm's defaults), checked against the weights: jaxvit has at most one of the
    final LayerNorm and ``fc_norm`` (neither: PE-Spatial)."""
    fc_norm = registered.get("fc_norm", pool_name == "avg")
    if args.get("use_fc_norm") is not None:
        fc_norm = bool(args["use_fc_norm"])
    post = registered.get("final_norm", True) and not fc_norm
    if args.get("use_post_transformer_norm") is not None:
        post = bool(args["use_post_transformer_norm"])
    if fc_norm and post:
        raise ValueError(f"{where}: timm Eva with both a final norm and fc_norm: not supported")
    if fc_norm != ("head/fc_norm/scale" in params) or post != ("encoder/norm/scale" in params):
        raise ValueError(
            f"{where}: global_pool={pool_name!r} and the norms it implies disagree with the weights"
        )
    return dict(fc_norm=fc_norm, final_norm=fc_norm or post)


def _stated_by_timm_config(path: Path, params: Flat, config: Mapping[str, Any]) -> dict[str, Any]:
    """What a timm hub folder's ``config.json`` states: heads, rotary embedding, pool, input size."""
    where = f"{path.parent / 'config.json'}"
    name, args = timm_hub.known_model_args(config, where, TIMM_MODELS, MODEL_ARGS, "Eva")
    heads, registered = TIMM_MODELS[name]
    if args.get("attn_type", "eva") not in ("eva", "rope"):
        raise ValueError(f"{where}: timm Eva with attn_type={args['attn_type']!r}: not supported")
    registered_pool = {v: k for k, v in _POOLS.items()}[registered["pool"]]
    pool_name = args.get("global_pool", config.get("global_pool", registered_pool))
    if pool_name not in _POOLS:
        raise ValueError(
            f"{where}: timm Eva with global_pool={pool_name!r}: not supported (jaxvit reads avg, token, map)"
        )
    norms = _check_norms(params, args, registered, pool_name, where)
    if pool_name == "map":
        _check_pool_mlp(params, args, where)
    timm_hub.check_num_classes(config, params, where)
    fields = _fields_from_args(args, registered, where)
    return dict(
        num_heads=validate.int_field(args, "num_heads", where, default=heads, lo=1, hi=4096),
        size=timm_hub.input_size(config, where),
        no_embed_class=bool(args.get("no_embed_class", "_ape" in name)),
        config=timm_hub.checkpoint_config(config),
        fields={**IMPLIED_FIELDS, **fields, "pool": _POOLS[pool_name], **norms},
    )


def _refuse_other_evas(path: Path, arrays: Flat, metadata: Mapping[str, Any]) -> None:
    named = str(metadata.get("timm_model", "")).split(".", 1)[0]
    if named and named not in TIMM_MODELS and "jaxvit_model" not in metadata:
        raise ValueError(
            f"{path}: timm Eva model {named!r} is not supported (jaxvit reads {len(TIMM_MODELS)} of timm's"
            " Eva models: eva02_*, eva_giant_*, vit_pe_*, vit_*_rope_*; DINOv3 in families/dinov3)"
        )
    if any(k in arrays for k in ("mask_token", "lm_head.weight")):
        raise ValueError(
            f"{path}: an EVA masked-image-modelling checkpoint (mask_token, lm_head): not supported"
        )


def _table_prefix(
    params: Flat, grid: tuple[int, int] | None, prefix: int, no_embed_class: bool | None
) -> int:
    """Slots in front of the grid in the position table: the prefix tokens', none with ``no_embed_class``."""
    table = params.get("pos_embed/embedding")
    if table is None or no_embed_class is not None:
        return 0 if no_embed_class else prefix
    rows = table.shape[1]
    if grid is not None:
        return 0 if rows == grid[0] * grid[1] else prefix
    return prefix if square_grid(rows - prefix) is not None else 0


def _bare_file_fields(params: Flat, fields: dict[str, Any]) -> dict[str, str]:
    """What a bare state dict shows (its final norms, in ``fields``) and what it leaves to the caller
    (returned: field -> why): the rotary embedding, the pooling and its heads, and, without
    LayerScale (which timm's post-norm block never has), whether the blocks are post-norm."""
    fields["final_norm"] = "encoder/norm/scale" in params or "head/fc_norm/scale" in params
    asked = ["rope", "rope_theta", "rope_xy", "pool"]
    if "rope" in fields:
        asked.remove("rope")
    if "head/map/probe" in params:
        asked.append("pool_heads")
    if "encoder/block_0/ls1/scale" not in params:
        asked.append("post_norm")
    why = "a bare timm Eva state dict does not say its rotary embedding, pooling or block form"
    return {n: f"{why} (see jaxvit.families.eva.TIMM_MODELS)" for n in asked}


def read(path: Path, arrays: Flat, metadata: Mapping[str, Any]) -> Checkpoint:
    """A timm Eva state dict (and its metadata, or its hub folder's config) -> a ``Checkpoint``."""
    _, arrays = strip_prefix(arrays, ("module.",))
    _refuse_other_evas(path, arrays, metadata)
    arrays = layouts.fuse_q_v_biases(layouts.fuse_qkv_projections(arrays))
    arrays = _split_mixed_freqs(layouts.pack_swiglu(arrays))
    params, unmatched = layouts.rename(arrays, RULES)
    config = saved_config(path, metadata)
    saved = config.get("model", {})
    bias = params.get("patch_embed/bias")
    if saved.get("patch_bias") is False and bias is not None and not np.any(bias):
        del params["patch_embed/bias"]  # the zeros jaxvit's export wrote for timm
    stated = (
        _stated_by_timm_config(path, params, metadata["timm_config"]) if "timm_config" in metadata else {}
    )
    grid = grid_from_config({**saved, **config})
    kernel = params.get("patch_embed/kernel")
    if stated.get("size") is not None and kernel is not None:
        grid = (stated["size"][0] // kernel.shape[0], stated["size"][1] // kernel.shape[1])
    prefix = int("cls_token/token" in params) + (
        params["registers/tokens"].shape[1] if "registers/tokens" in params else 0
    )
    no_embed_class = stated.get("no_embed_class", False if saved else None)
    fields = {**stated.get("fields", IMPLIED_FIELDS)}
    fields["posemb"] = "learn" if "pos_embed/embedding" in params else "none"
    if "encoder/block_0/attn/rope_freqs" in params:
        fields["rope"] = "mixed"
    unstated = {} if saved or stated else _bare_file_fields(params, fields)
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=_table_prefix(params, grid, prefix, no_embed_class),
        num_heads=stated.get("num_heads", saved.get("num_heads")),
        grid=grid,
        config={**config, **stated.get("config", {})},
        posemb_resample="bicubic",
        posemb_antialias=True,
        implied_fields=fields,
        unstated=unstated,
    )


def preprocessing(ckpt: Checkpoint) -> Preprocessing:
    """A timm folder's ``pretrained_cfg``, else EVA02's (``PREPROCESSING``)."""
    return timm_hub.folder_preprocessing(ckpt, PREPROCESSING)


def exports(model: Any) -> bool:
    """Whether ``format="timm"`` writes ``model`` as timm's ``Eva`` (it has Eva's rotary embedding,
    sub-LN, attention-output norm, post-norm blocks, no final norm or PE's attention pooling)."""
    pe_pool = model.pool == "map" and (model.pool_heads or model.pool_mlp_dim)
    no_norm = not model.final_norm and model.pool != "attn_pool"
    eva_only = (
        model.rope != "none" or model.mlp_norm or model.attn_out_norm or model.post_norm or no_norm or pe_pool
    )
    # a relative position bias is timm_beit's to refuse, DINOv3's rotary embedding timm_dinov3's
    return eva_only and model.rel_pos_bias == "none" and model.posemb != "rope"


def timm_kwargs(model: Any, size: tuple[int, int]) -> dict[str, Any]:
    """``timm.create_model(TIMM_MODEL, **kwargs)`` arguments of the same architecture."""
    ref = model.rope_ref_grid
    pool_mlp = model.pool_mlp_dim
    return dict(
        **timm_hub.size_kwargs(model, size),
        qkv_bias=model.qkv_bias,
        # AttentionRope's separate projections: a key bias, as jaxvit's qkv has, and keys
        # (attn.q_proj) that only an Eva has, so that the file reads back here
        qkv_fused=False,
        attn_type="rope",
        swiglu_mlp=model.mlp_type == "swiglu",
        scale_mlp=model.mlp_norm,
        scale_attn_inner=model.attn_out_norm,
        init_values=model.layer_scale_init,
        class_token=model.class_token,
        num_reg_tokens=model.num_registers,
        no_embed_class=False,
        use_abs_pos_emb=model.posemb == "learn",
        use_rot_pos_emb=model.rope != "none",
        rope_type="mixed" if model.rope == "mixed" else "cat",
        rope_temperature=model.rope_theta,
        rope_grid_offset=model.rope_grid_offset,
        rope_grid_indexing="xy" if model.rope_xy else "ij",
        ref_feat_shape=None if ref is None else list(to_pair(ref)),
        use_pre_transformer_norm=model.pre_norm,
        use_post_transformer_norm=model.final_norm and not model.fc_norm,
        use_fc_norm=model.fc_norm,
        use_post_norm=model.post_norm,
        global_pool={"gap": "avg", "tok": "token", "map": "map"}[model.pool],
        attn_pool_num_heads=model.pool_heads,
        attn_pool_mlp_ratio=None if pool_mlp is None else (pool_mlp + 0.5) / model.width,
    )


def _check_exportable(model: Any) -> None:
    config = model.config
    problems = []
    if config.pool not in ("gap", "tok", "map") or config.distill_token:
        problems.append(f"pool={config.pool!r} (jaxvit writes timm Eva's avg, token and map pooling)")
    if config.posemb not in ("learn", "none"):
        problems.append(f"posemb={config.posemb!r} (timm's Eva has a learned table or none)")
    if config.layer_norm_eps not in TIMM_MODEL_BY_EPS:
        problems.append(
            f"layer_norm_eps={config.layer_norm_eps} (timm's Eva is built with 1e-6, PE with 1e-5)"
        )
    elif config.layer_norm_eps == 1e-5 and config.rope == "axial" and config.rope_ref_grid is None:
        problems.append(
            f"layer_norm_eps={config.layer_norm_eps!r} with rope_ref_grid=None (written as PE, whose"
            " reference grid of 32x32 would stay)"
        )
    if config.post_norm and config.layer_scale_init is not None:
        problems.append("post_norm with LayerScale (timm's post-norm block has none)")
    if config.activation != "gelu":
        problems.append(f"activation={config.activation!r} (timm Eva's MLP is exact GELU)")
    if config.pre_norm and config.patch_bias:
        problems.append("pre_norm with a patch bias (timm's Eva has a patch bias exactly without norm_pre)")
    if config.rel_pos_bias != "none" or config.representation_size:
        problems.append("a relative position bias or a representation layer")
    if problems:
        raise ValueError(f"format='timm' cannot write this model as {TARGET}: " + "; ".join(problems))


def write(flat: Flat, model: Any, size: tuple[int, int], path: Path, labels: Sequence[str] | None) -> Path:
    """jaxvit params (flat, unrolled) -> a timm ``Eva`` state dict as safetensors at ``path``."""
    _check_exportable(model)
    flat = dict(flat)
    if not model.pre_norm and not model.patch_bias:  # timm's Eva without norm_pre has one: zeros
        flat["patch_embed/bias"] = np.zeros((model.width,), np.float32)
    table = flat.get("pos_embed/embedding")
    if table is not None and model.num_registers:  # Eva's table has slots for every prefix token
        at = model.num_posemb_prefix_tokens
        zeros = np.zeros((1, model.num_registers, table.shape[-1]), table.dtype)
        flat["pos_embed/embedding"] = np.concatenate([table[:, :at], zeros, table[:, at:]], axis=1)
    out = layouts.rename_back(
        layouts.split_attention(flat, model.num_heads, "fused", "flat_kv"), RULES, "timm"
    )
    if model.mlp_type == "swiglu" and model.mlp_norm:  # timm's SwiGLU with a norm keeps them apart
        out = layouts.unpack_swiglu(out)
    out = _join_mixed_freqs(layouts.split_qkv_projections(out))
    return timm_hub.write_state_dict(
        out,
        path,
        model,
        size,
        labels,
        timm_model=TIMM_MODEL_BY_EPS[model.layer_norm_eps],
        timm_class="Eva",
        timm_kwargs=timm_kwargs(model, size),
    )
