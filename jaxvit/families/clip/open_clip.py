"""open_clip image towers: the ``visual.`` half of an open_clip checkpoint (OpenAI, LAION, DataComp,
DFN, MetaCLIP, SigLIP through timm).

open_clip publishes a folder: ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) beside
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``. ``model_cfg.vision_cfg`` builds one
of two image towers, and both map onto jaxvit as follows (the model's output is ``encode_image``'s,
before it is normalised):

- open_clip's own ``VisionTransformer`` (OpenAI's layout: ``visual.conv1``, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.{i}``, ``ln_post``, ``proj``). The
  conv has no bias; ``ln_pre`` is ``pre_norm`` (absent with ``no_ln_pre``); ``in_proj`` is the fused
  qkv; ``ls_1``/``ls_2`` (``ls_init_value``) are LayerScale; ``ln_post`` is the final norm; ``proj``
  ``(width, embed_dim)`` is a classifier without bias (``num_classes=embed_dim``, ``head_bias=False``).
  ``quick_gelu`` is the activation, ``act_kwargs={"approximate": "tanh"}`` GELU's tanh form,
  ``norm_kwargs={"eps": e}`` the LayerNorm epsilon (else 1e-5), ``width // head_width`` the heads and
  ``int(width * mlp_ratio)`` the MLP. ``pool_type="tok"`` is ``pool="tok"`` (with or without
  ``final_ln_after_pool``: a LayerNorm of the class token alone is that token of the normed
  sequence), ``"avg"`` is ``pool="gap"``. A ``sin_cos_2d`` table is stored like a learned one.
  CoCa's ``attentional_pool=true`` is ``pool="attn_pool"``: ``attn_pool`` (``attn_pooler_queries``,
  ``attn_pooler_heads``, width ``embed_dim``) pools the tokens without a final norm, ``ln_post``
  norms its queries, and the first (``pool_type="tok"``) goes through ``proj`` (``embed_dim`` square).
- a timm trunk (``visual.trunk.``, and ``visual.head.proj`` for ``timm_proj="linear"``): the timm
  ``VisionTransformer`` that ``timm_model_name`` registers, read with the timm layout. Its head
  count, activation, LayerNorm epsilon and ``no_embed_class`` are the registered architecture's
  (``jaxvit.families.vit.TIMM_ARCHITECTURES``, which holds the plain ViTs of open_clip's SigLIP,
  SigLIP 2 and MobileCLIP 2 configs). ``timm_pool`` ``token``,
  ``avg`` and ``map`` are jaxvit's pools; ``timm_proj`` ``"none"`` leaves no projection, ``"linear"``
  adds ``head.proj`` (a bias with ``timm_proj_bias``), unset keeps the trunk's own head (with bias).
  open_clip gives timm trunks their own activation whatever ``quick_gelu`` says; so does jaxvit.

Refused in one line naming the setting: ResNet towers (``layers`` a list), ``attentional_pool``
``"parallel"``/``"cascade"`` (open_clip's WIP) or with another ``pool_type`` or epsilon,
``pool_type`` ``"avg"`` with ``final_ln_after_pool`` (a norm of the mean) or ``"none"``, open_clip's
custom attention block (``qk_norm``, ``scaled_cosine_attn``, ...), other ``act_kwargs``/``norm_kwargs``,
timm Eva trunks (PE, EVA-02), other timm models and SwiGLU trunks, ``timm_pool`` ``""`` (the trunk's
default, which the file does not say), ``abs_attn``/``rot_attn``, ``timm_proj="mlp"``, a ``map`` pool
over class or register tokens (timm leaves them out, jaxvit's attention pool takes them in), and a
``preprocess_cfg`` with ``resize_mode="longest"`` (resize and pad). ``patch_dropout``, ``timm_drop``,
``timm_drop_path`` and ``output_tokens`` change nothing of the pooled output at inference and are read.

A bare ``open_clip_model.safetensors`` (no JSON) is read too: a timm trunk is refused (the file
does not name its timm model), and an OpenAI-layout tower takes open_clip's defaults where they are
exact (epsilon 1e-5, the head count every open_clip config of its width has, ``HEADS_OF_WIDTH``);
its activation, and what else no default settles, must be passed (``activation="quick_gelu"`` for
OpenAI's weights). OpenAI's TorchScript ``.pt`` archives are refused by ``jaxvit.safety.files``.

The text tower, ``logit_scale`` and ``logit_bias`` are left out on purpose: this reader loads image
towers. At another image size the position embedding is resized as open_clip does (``resize_pos_embed``
when loading, timm's ``set_input_size`` for trunks): bicubic with antialiasing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit import ops
from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import (
    CLIP_MEAN,
    CLIP_STD,
    Checkpoint,
    Flat,
    Preprocessing,
    log,
    strip_prefix,
)
from jaxvit.families.vit import TIMM_ARCHITECTURES
from jaxvit.families.vit import timm as vit_timm
from jaxvit.model import VisionTransformer, create_model
from jaxvit.safety import files, validate
from jaxvit.sizes import to_pair

NAME = "open_clip"
FOLDER_CONFIG = "open_clip_config.json"
# open_clip's own preference among a folder's weights (factory._find_checkpoint_in_dir)
WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
# open_clip's PreprocessCfg defaults: OpenAI's statistics, shorter side to the size (bicubic), center crop.
PREPROCESSING = Preprocessing(CLIP_MEAN, CLIP_STD, 1.0, "bicubic", center_crop=True)
TOWER = "visual."

_BLOCK = "transformer.resblocks.{i}"
_OURS = "encoder/block_{i}"
_POOLER = "head/attn_pool"
OPENAI_RULES = tuple(
    [
        # open_clip's conv has no bias (a file with one is refused, as open_clip refuses it)
        layouts.Rule("conv1.weight", "patch_embed/kernel", "conv"),
        layouts.Rule("class_embedding", "cls_token/token", "token"),
        layouts.Rule("positional_embedding", "pos_embed/embedding", "table"),
        # torch's MultiheadAttention stacks q, k, v rows: transposed, that is jaxvit's (3, heads, head_dim)
        layouts.Rule(f"{_BLOCK}.attn.in_proj_weight", f"{_OURS}/attn/qkv/kernel", "linear"),
        layouts.Rule(f"{_BLOCK}.attn.in_proj_bias", f"{_OURS}/attn/qkv/bias"),
        layouts.Rule(f"{_BLOCK}.ls_1.gamma", f"{_OURS}/ls1/scale"),
        layouts.Rule(f"{_BLOCK}.ls_2.gamma", f"{_OURS}/ls2/scale"),
        # pooled @ proj: already (in, out)
        layouts.Rule("proj", "head/classifier/kernel"),
        layouts.Rule("attn_pool.query", f"{_POOLER}/query"),
    ]
    # CoCa's attentional pooler (its attention shaped per head by _pooler_params)
    + layouts.torch_mha_rules("attn_pool.attn", f"{_POOLER}/attn")
    + layouts.torch_rules("attn_pool.ln_q", f"{_POOLER}/norm_q", "ln")
    + layouts.torch_rules("attn_pool.ln_k", f"{_POOLER}/norm_kv", "ln")
    + layouts.torch_rules("ln_pre", "encoder/norm_pre", "ln")
    + layouts.torch_block_rules(
        _BLOCK,
        {
            "norm1": "ln_1",
            "attn/out": "attn.out_proj",
            "norm2": "ln_2",
            "mlp/fc1": "mlp.c_fc",
            "mlp/fc2": "mlp.c_proj",
        },
    )
    + layouts.torch_rules("ln_post", "encoder/norm", "ln")
)
TRUNK_RULES = tuple(layouts.Rule("trunk." + r.src, r.dst, r.transform) for r in vit_timm.RULES) + tuple(
    layouts.torch_rules("head.proj", "head/classifier", "linear")
)

# timm's Eva class (PE, EVA, rotary ViTs, DINOv3), told by name: jaxvit has no Eva tower.
_EVA_NAMES = ("eva", "_pe_", "rope", "dinov3", "sapiens", "lingbot")
# The head count of every open_clip config of an OpenAI-layout tower, by width (a bare file's only clue).
HEADS_OF_WIDTH = {384: 6, 512: 8, 768: 12, 896: 14, 1024: 16, 1280: 16, 1408: 16, 1664: 16, 1792: 16}

# CLIPVisionCfg's settings; open_clip itself fails on any other.
VISION_SETTINGS = frozenset(
    "layers width head_width mlp_ratio patch_size image_size ls_init_value patch_dropout attentional_pool"
    " attn_pooler_queries attn_pooler_heads no_ln_pre pos_embed_type final_ln_after_pool pool_type"
    " output_tokens act_kwargs norm_kwargs block_type qk_norm scaled_cosine_attn scale_heads"
    " scale_attn_inner scale_attn scale_fc timm_model_name timm_model_pretrained timm_pool timm_proj"
    " timm_proj_bias timm_drop timm_drop_path".split()
)
# Any of these makes open_clip build its custom attention block, which jaxvit does not have.
CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A state dict with open_clip's image-tower keys (``visual.conv1.weight`` or ``visual.trunk.``)."""
    if kind != "state_dict":
        return False
    for key in arrays:
        key = key[len("module.") :] if key.startswith("module.") else key
        if key == "visual.conv1.weight" or key.startswith("visual.trunk."):
            return True
    return False


def claims_folder(config: Mapping[str, Any]) -> bool:
    """An ``open_clip_config.json`` with a ``model_cfg`` (what open_clip itself requires)."""
    return isinstance(config.get("model_cfg"), Mapping)


def read(path: Path, arrays: Flat, metadata: Mapping[str, Any]) -> Checkpoint:
    """A bare open_clip state dict (no ``open_clip_config.json``) -> a ``Checkpoint`` of its image tower."""
    return _tower_checkpoint(Path(path), arrays, {})


def read_folder(folder: Path) -> Checkpoint:
    """An open_clip folder (``open_clip_config.json`` + weights) -> a ``Checkpoint`` of its image tower.

    The config is checked first: a tower jaxvit cannot compute is refused before the weights are read.
    """
    folder = Path(folder)
    where = str(folder / FOLDER_CONFIG)
    config = files.read_json(validate.member_path(folder, FOLDER_CONFIG, "config file"))
    model_cfg = _model_cfg(config, where)
    if _vision(model_cfg).get("timm_model_name"):
        _trunk_settings(model_cfg, where)
    else:
        _openai_fields(model_cfg, where)
    _preprocessing(config, where)
    found = files.read_folder_weights(folder, WEIGHTS)
    if found is None:
        raise FileNotFoundError(f"{folder} has {FOLDER_CONFIG} but none of {', '.join(WEIGHTS)}")
    weights, arrays, _ = found
    return _tower_checkpoint(weights, arrays, config)


def _model_cfg(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    model_cfg = config.get("model_cfg")
    if not isinstance(model_cfg, Mapping):
        raise ValueError(f"{where}: model_cfg must be a JSON object, got {type(model_cfg).__name__}")
    vision = model_cfg.get("vision_cfg", {})
    if not isinstance(vision, Mapping):
        raise ValueError(f"{where}: model_cfg.vision_cfg must be a JSON object, got {type(vision).__name__}")
    unknown = sorted(set(vision) - VISION_SETTINGS)
    if unknown:
        raise ValueError(
            f"{where}: vision_cfg has settings open_clip's CLIPVisionCfg does not know: {unknown}"
        )
    return dict(model_cfg)


def _vision(model_cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    return model_cfg.get("vision_cfg") or {}


def _tower_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> Flat:
    _, arrays = strip_prefix(arrays, ("module.",))  # open_clip's own training checkpoints (DDP)
    tower = {k[len(TOWER) :]: v for k, v in arrays.items() if k.startswith(TOWER)}
    if not tower:
        raise ValueError(
            f"{path} has no image tower (no 'visual.' keys). Its first keys: {sorted(arrays)[:5]}"
        )
    if len(tower) < len(arrays):
        log.info("%s: reading the image tower, leaving out %d other entries", path, len(arrays) - len(tower))
    return tower


def _tower_checkpoint(path: Path, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> Checkpoint:
    tower = _tower_arrays(path, arrays)
    trunk = any(k.startswith("trunk.") for k in tower)
    if not config:
        if trunk:
            raise ValueError(
                f"{path} is a bare open_clip timm-trunk state dict, which does not name its timm model:"
                f" read the folder it came in (with {FOLDER_CONFIG})"
            )
        return _openai_checkpoint(path, tower, None)
    where = f"{path.parent / FOLDER_CONFIG}"
    model_cfg = _model_cfg(config, where)
    stated = bool(_vision(model_cfg).get("timm_model_name"))
    if trunk != stated:
        raise ValueError(
            f"{where}: timm_model_name={_vision(model_cfg).get('timm_model_name')!r} but the weights have"
            f" {'a timm trunk (visual.trunk.)' if trunk else 'no timm trunk'}"
        )
    if trunk:
        return _trunk_checkpoint(path, tower, config, model_cfg, where)
    return _openai_checkpoint(path, tower, config)


# ---------------------------------------------------------------------------
# open_clip's own VisionTransformer (OpenAI's layout)
# ---------------------------------------------------------------------------


def _openai_checkpoint(path: Path, tower: Flat, config: Mapping[str, Any] | None) -> Checkpoint:
    if "class_embedding" not in tower:
        what = "a ResNet (ModifiedResNet) tower" if "conv1.weight" in tower else "no class_embedding"
        raise ValueError(f"{path}: the open_clip image tower is {what}; jaxvit reads ViT towers only")
    params, unmatched = layouts.rename(tower, OPENAI_RULES)
    grid, num_heads, unstated = None, None, {}
    if config:
        where = f"{path.parent / FOLDER_CONFIG}"
        fields, size = _openai_fields(_model_cfg(config, where), where)
        (p, q), num_heads = to_pair(fields["patch_size"]), fields["num_heads"]
        grid = (size[0] // p, size[1] // q)
        if fields["pool"] == "attn_pool":
            params = _pooler_params(params, fields["pool_heads"])
    elif any(k.startswith(f"{_POOLER}/") for k in params):
        raise ValueError(
            f"{path}: a bare open_clip state dict with CoCa's attentional pooler (visual.attn_pool) does"
            f" not say the pooler's heads: read the folder it came in, with {FOLDER_CONFIG}"
        )
    else:
        kernel = params.get("patch_embed/kernel")
        if kernel is not None and kernel.ndim == 4:
            num_heads = HEADS_OF_WIDTH.get(int(kernel.shape[-1]))
        unstated = _unstated(params)
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=1,
        grid=grid,
        num_heads=num_heads,
        config=dict(config or {}),
        posemb_resample="bicubic",
        posemb_antialias=True,
        # open_clip's LayerNorm default; what a bare file leaves open is in unstated
        implied_fields={} if config else dict(layer_norm_eps=1e-5),
        unstated=unstated,
    )


def _pooler_params(params: Flat, heads: int) -> Flat:
    """CoCa's pooler in jaxvit's shapes; its ``ln_post`` (of the pooler's width) is ``norm_out``."""
    out = {k.replace("encoder/norm/", f"{_POOLER}/norm_out/"): v for k, v in params.items()}
    return layouts.mha_heads(out, f"{_POOLER}/attn", heads)


def _unstated(params: Flat) -> dict[str, str]:
    """What a bare OpenAI-layout state dict cannot say and no exact default settles (field -> why)."""
    out = {
        "activation": "a bare open_clip state dict does not say its activation ('quick_gelu' for OpenAI's"
        " weights and open_clip's *-quickgelu models, 'gelu' for the others; or read the folder it came in,"
        f" with {FOLDER_CONFIG})"
    }
    if "encoder/norm_pre/scale" not in params:
        out["pool"] = (
            "a bare open_clip tower without ln_pre does not say its pooling (open_clip's CLIPA towers,"
            " which have none, pool by the mean: 'gap')"
        )
    return out


def _activation(model_cfg: Mapping[str, Any], vision: Mapping[str, Any], where: str) -> str:
    quick = validate.bool_field(model_cfg, "quick_gelu", where, default=False)
    kwargs = vision.get("act_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{where}: vision_cfg.act_kwargs must be a JSON object, got {kwargs!r}")
    if quick:
        if kwargs:
            raise ValueError(
                f"{where}: vision_cfg.act_kwargs={dict(kwargs)} with quick_gelu: QuickGELU takes none"
            )
        return "quick_gelu"
    approximate = kwargs.get("approximate", "none")
    if set(kwargs) - {"approximate"} or approximate not in ("none", "tanh"):
        raise ValueError(
            f"{where}: vision_cfg.act_kwargs={dict(kwargs)} is not supported: jaxvit has GELU exact or"
            " with approximate='tanh'"
        )
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _layer_norm_eps(vision: Mapping[str, Any], where: str) -> float:
    kwargs = vision.get("norm_kwargs") or {}
    if not isinstance(kwargs, Mapping) or set(kwargs) - {"eps"}:
        raise ValueError(
            f"{where}: vision_cfg.norm_kwargs={kwargs!r} is not supported: jaxvit's LayerNorm takes eps"
        )
    return validate.float_field(
        kwargs, "eps", f"{where}: vision_cfg.norm_kwargs", default=1e-5, lo=0.0, hi=1.0, lo_open=True
    )


def _refuse_openai_settings(vision: Mapping[str, Any], where: str) -> str:
    """The pool of an OpenAI-layout tower; ``ValueError`` naming any setting jaxvit cannot compute."""
    w = f"{where}: vision_cfg"
    if isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError(
            f"{w}.layers={vision['layers']!r} is a ResNet (ModifiedResNet) tower; jaxvit reads ViTs only"
        )
    attentional = _attentional_pool(vision, where)
    for name in CUSTOM_BLOCK:
        if vision.get(name):
            raise ValueError(
                f"{w}.{name}={vision[name]!r} (open_clip's custom attention block) is not part of"
                " jaxvit's model"
            )
    if vision.get("block_type") not in (None, "default"):
        raise ValueError(f"{w}.block_type={vision['block_type']!r} is not part of jaxvit's model")
    pool_type = validate.str_field(vision, "pool_type", w, default="tok")
    if pool_type not in ("tok", "avg"):
        raise ValueError(f"{w}.pool_type={pool_type!r} is not supported: jaxvit pools 'tok' and 'avg'")
    if pool_type == "avg" and validate.bool_field(vision, "final_ln_after_pool", w, default=False):
        raise ValueError(
            f"{w}: pool_type='avg' with final_ln_after_pool=true (a LayerNorm of the mean of the tokens)"
            " is not part of jaxvit's model, which averages normed tokens"
        )
    position = validate.str_field(vision, "pos_embed_type", w, default="learnable")
    if position not in ("learnable", "sin_cos_2d"):
        raise ValueError(f"{w}.pos_embed_type={position!r} is not supported")
    return "attn_pool" if attentional else {"tok": "tok", "avg": "gap"}[pool_type]


def _attentional_pool(vision: Mapping[str, Any], where: str) -> bool:
    """Whether CoCa's attentional pooler (``attentional_pool=true``) pools the tower; ``ValueError``
    for the forms and settings of it that jaxvit does not compute."""
    w, value = f"{where}: vision_cfg", vision.get("attentional_pool")
    if isinstance(value, str) and value:
        raise ValueError(
            f"{w}.attentional_pool={value!r} (two poolers, untested work in progress in open_clip itself)"
            " is not part of jaxvit's model"
        )
    if not value or not validate.bool_field(vision, "attentional_pool", w):  # open_clip tests its truth
        return False
    pool_type, eps = validate.str_field(vision, "pool_type", w, default="tok"), _layer_norm_eps(vision, where)
    if pool_type != "tok" or eps != 1e-5:
        raise ValueError(
            f"{w}: attentional_pool=true with pool_type={pool_type!r} and norm_kwargs epsilon {eps} is not"
            " supported: jaxvit pools the first query ('tok'), and the pooler's ln_q and ln_k keep torch's"
            " epsilon 1e-5"
        )
    return True


def _openai_fields(model_cfg: Mapping[str, Any], where: str) -> tuple[dict[str, Any], tuple[int, int]]:
    """``(VisionTransformer fields, image size)`` of an OpenAI-layout tower's ``model_cfg``."""
    vision = _vision(model_cfg)
    pool = _refuse_openai_settings(vision, where)
    w = f"{where}: vision_cfg"
    width = validate.int_field(vision, "width", w, default=768, lo=1, hi=validate.MAX_WIDTH)
    head_width = validate.int_field(vision, "head_width", w, default=64, lo=1, hi=validate.MAX_WIDTH)
    if width % head_width:
        raise ValueError(f"{w}: width={width} is not a multiple of head_width={head_width}")
    mlp_ratio = validate.float_field(vision, "mlp_ratio", w, default=4.0, lo=0.0, hi=1024.0, lo_open=True)
    scale = vision.get("ls_init_value")
    fields = dict(
        num_classes=validate.int_field(model_cfg, "embed_dim", where, lo=1, hi=validate.MAX_CLASSES),
        width=width,
        depth=validate.int_field(vision, "layers", w, default=12, lo=0, hi=validate.MAX_DEPTH),
        num_heads=width // head_width,
        mlp_dim=max(int(width * mlp_ratio), 1),  # open_clip's int(d_model * mlp_ratio)
        patch_size=validate.size_field(vision, "patch_size", w, default=16, hi=validate.MAX_PATCH),
        num_channels=3,
        activation=_activation(model_cfg, vision, where),
        layer_norm_eps=_layer_norm_eps(vision, where),
        pre_norm=not validate.bool_field(vision, "no_ln_pre", w, default=False),
        patch_bias=False,
        qkv_bias=True,
        head_bias=False,
        class_token=True,
        pool=pool,
        posemb="learn",
        layer_scale_init=None if scale is None else validate.float_field(vision, "ls_init_value", w),
    )
    if pool == "attn_pool":
        fields.update(
            pool_queries=validate.int_field(
                vision, "attn_pooler_queries", w, default=256, lo=1, hi=validate.MAX_WIDTH
            ),
            pool_heads=validate.int_field(
                vision, "attn_pooler_heads", w, default=8, lo=1, hi=validate.MAX_WIDTH
            ),
            # open_clip's pooler has the width of the output (embed_dim); proj is (embed_dim, embed_dim)
            pool_width=fields["num_classes"],
        )
    return fields, to_pair(validate.size_field(vision, "image_size", w, default=224))


# ---------------------------------------------------------------------------
# A timm trunk (TimmModel)
# ---------------------------------------------------------------------------


def _trunk_settings(model_cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """What a timm trunk's config states: the architecture's facts, the pool and the projection."""
    vision = _vision(model_cfg)
    w = f"{where}: vision_cfg"
    name = validate.str_field(vision, "timm_model_name", w)
    if name not in TIMM_ARCHITECTURES:
        if name.startswith("eva") or any(part in name for part in _EVA_NAMES):
            raise ValueError(
                f"{w}.timm_model_name={name!r} is a timm Eva trunk (PE, EVA, rotary ViTs), which jaxvit"
                " does not read"
            )
        raise ValueError(
            f"{w}.timm_model_name={name!r} is not a timm trunk jaxvit reads exactly (it reads the plain"
            " VisionTransformers of jaxvit.families.vit.TIMM_ARCHITECTURES)"
        )
    heads, activation, eps, no_embed_class = TIMM_ARCHITECTURES[name]
    if activation not in ops.ACTIVATIONS:
        # timm's SwiGLU giants: its attention pool and jaxvit's would take the MLP differently
        raise ValueError(
            f"{w}.timm_model_name={name!r} is a SwiGLU ({activation}) trunk, which jaxvit does not read"
        )
    pool = validate.str_field(vision, "timm_pool", w, default="avg")
    if pool not in vit_timm.TIMM_POOLS:
        why = "the trunk's default pooling, which the file does not say" if pool == "" else "not jaxvit's"
        raise ValueError(
            f"{w}.timm_pool={pool!r} is not supported ({why}); jaxvit reads {sorted(vit_timm.TIMM_POOLS)}"
        )
    proj = vision.get("timm_proj", "linear")
    if proj not in ("linear", "none", None, ""):
        raise ValueError(f"{w}.timm_proj={proj!r} is not supported: jaxvit reads 'linear', 'none' or unset")
    embed_dim = validate.int_field(model_cfg, "embed_dim", where, lo=1, hi=validate.MAX_CLASSES)
    if proj == "linear":
        projection = (embed_dim, validate.bool_field(vision, "timm_proj_bias", w, default=False))
    else:
        # without an extra projection, TimmModel asks timm for a head of embed_dim classes (with bias)
        projection = (None, False) if proj == "none" else (embed_dim, True)
    return dict(
        name=name,
        num_heads=heads,
        activation=activation,
        layer_norm_eps=eps,
        no_embed_class=no_embed_class,
        pool=vit_timm.TIMM_POOLS[pool],
        projection=projection,
        image_size=to_pair(validate.size_field(vision, "image_size", w, default=224)),
    )


def _check_trunk_head(params: Flat, unmatched: Flat, stated: Mapping[str, Any], where: str) -> None:
    kernel = params.get("head/classifier/kernel")
    found = (None if kernel is None else int(kernel.shape[-1]), "head/classifier/bias" in params)
    if found != stated["projection"]:
        (classes, bias), (has, has_bias) = stated["projection"], found
        raise ValueError(
            f"{where}: timm_proj, timm_proj_bias and embed_dim say a projection to {classes} (bias {bias})"
            f" but the weights have one to {has} (bias {has_bias})"
        )
    if any(".fc_norm." in f".{k}" for k in unmatched):
        raise ValueError(
            f"{where}: the trunk has timm's fc_norm (a LayerNorm after the mean pool), which jaxvit's 'gap'"
            " does not have: it pools the tokens after the final norm"
        )


def _trunk_checkpoint(
    path: Path, tower: Flat, config: Mapping[str, Any], model_cfg: Mapping[str, Any], where: str
) -> Checkpoint:
    stated = _trunk_settings(model_cfg, where)
    params, unmatched = layouts.rename(tower, TRUNK_RULES)
    kernel = params.get("patch_embed/kernel")
    if kernel is None or kernel.ndim != 4:
        raise ValueError(
            f"{path}: the timm trunk has no patch embedding (visual.trunk.patch_embed.proj.weight)"
        )
    _check_trunk_head(params, unmatched, stated, where)
    prefix = int("cls_token/token" in params)
    prefix += int(params["registers/tokens"].shape[1]) if "registers/tokens" in params else 0
    if stated["pool"] == "map" and prefix:
        raise ValueError(
            f"{where}: timm_pool='map' over a trunk with {prefix} class/register token(s): timm's attention"
            " pool leaves them out, jaxvit's takes them in"
        )
    (h, w), (p, q) = stated["image_size"], kernel.shape[:2]
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        # timm's no_embed_class adds the table to the patches before the prefix tokens go in front
        num_prefix_tokens=0 if stated["no_embed_class"] else prefix,
        grid=(h // p, w // q),
        num_heads=stated["num_heads"],
        config=dict(config),
        # timm's resample_abs_pos_embed, as set_input_size calls it
        posemb_resample="bicubic",
        posemb_antialias=True,
        implied_fields=dict(
            activation=stated["activation"], layer_norm_eps=stated["layer_norm_eps"], pool=stated["pool"]
        ),
    )


# ---------------------------------------------------------------------------
# The model and the preprocessing a checkpoint states
# ---------------------------------------------------------------------------


def build_model(ckpt: Checkpoint, **overrides: Any) -> tuple[VisionTransformer, tuple[int, int]] | None:
    """``(model, image_size)`` of an open_clip folder's OpenAI-layout tower, from its ``vision_cfg``.

    ``overrides`` set any model field. None for a timm trunk and a bare state dict: the model is
    then told from the shapes, the fields the reader implies and those the caller must pass.
    """
    model_cfg = ckpt.config.get("model_cfg")
    if not model_cfg or _vision(model_cfg).get("timm_model_name"):
        return None
    fields, size = _openai_fields(model_cfg, f"{Path(ckpt.path).parent / FOLDER_CONFIG}")
    fields.update(overrides)
    return create_model(None, **fields), size


def _preprocessing(config: Mapping[str, Any], where: str) -> Preprocessing:
    cfg = config.get("preprocess_cfg") or {}
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where}: preprocess_cfg must be a JSON object, got {type(cfg).__name__}")
    w = f"{where}: preprocess_cfg"
    # open_clip's merge_preprocess_dict skips nulls
    cfg = {k: v for k, v in cfg.items() if v is not None}
    mean, std = validate.channel_stats(cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD), 3, w)
    interpolation = validate.str_field(cfg, "interpolation", w, default="bicubic")
    if interpolation not in ("bicubic", "bilinear", "random"):
        raise ValueError(
            f"{w}.interpolation={interpolation!r} is not supported (jaxvit has bicubic, bilinear)"
        )
    mode = validate.str_field(cfg, "resize_mode", w, default="shortest")
    if mode == "squash":
        return Preprocessing(mean, std, 1.0, "bilinear" if interpolation == "bilinear" else "bicubic")
    if mode != "shortest":
        raise ValueError(
            f"{w}.resize_mode={mode!r} is not supported: jaxvit resizes 'shortest' (shorter side, center"
            " crop) and 'squash' (the whole image)"
        )
    size = to_pair(validate.size_field(_vision(_model_cfg(config, where)), "image_size", where, default=224))
    # a non-square target goes through ResizeKeepRatio, which open_clip leaves at bicubic
    bilinear = interpolation == "bilinear" and size[0] == size[1]
    return Preprocessing(mean, std, 1.0, "bilinear" if bilinear else "bicubic", center_crop=True)


def preprocessing(ckpt: Checkpoint) -> Preprocessing:
    """How open_clip prepares images for this checkpoint: its ``preprocess_cfg`` over open_clip's defaults
    (``PREPROCESSING``); ``"random"`` interpolation is bicubic at inference, as in open_clip."""
    if not ckpt.config:
        return PREPROCESSING
    return _preprocessing(ckpt.config, f"{Path(ckpt.path).parent / FOLDER_CONFIG}")
