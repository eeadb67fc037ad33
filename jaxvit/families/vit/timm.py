"""timm ``VisionTransformer`` state dicts (safetensors, or ``.pth``/``.bin`` through PyTorch).

A timm state dict does not say its number of heads nor how its weights were
trained: jaxvit's own exports put the model fields and the matching
``timm.create_model(timm_model, **timm_kwargs)`` arguments in the safetensors
metadata; foreign files get a head count guessed from the width and the
preprocessing of their family, told from the keys: CLIP towers
(``vit_*_clip_*``, a ``norm_pre``) CLIP's statistics, SigLIP towers
(``vit_*_siglip_*``, attention pooling without class token) mean = std =
0.5, others timm's ImageNet defaults.

The layout also holds DINOv2 (``reg_token``, LayerScale ``ls1.gamma`` /
``ls2.gamma``, the packed SwiGLU ``mlp.fc1`` of ``SwiGLUPacked``, gate
first) and DeiT (``dist_token``, ``head_dist``). With ``no_embed_class``
(DeiT-3, DINOv2 with registers) the position embedding has no slots for the
prefix tokens. timm resizes it bicubically with antialiasing
(``resample_abs_pos_embed``), and so does jaxvit for these files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit import schema
from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_TIMM,
    Checkpoint,
    Flat,
    Preprocessing,
    grid_from_config,
    log,
    strip_prefix,
)
from jaxvit.safety import files, validate
from jaxvit.sizes import square_grid

NAME = "timm"
# any state dict that no narrower format claims
CLAIMS = "fallback"
HAS_SINCOS = False
EXPORT_FORMAT = "timm"
TARGET = "timm VisionTransformer"
# timm_kwargs says each of these; biases that timm always has are written as zeros. No
# pre_logits layer (timm's ViTs dropped representation_size); the rotary embedding is
# timm_dinov3's.
CARRIES = (
    "posemb",
    "class_token",
    "pool",
    "activation",
    "pre_norm",
    "patch_bias",
    "qkv_bias",
    "head_bias",
    "layer_norm_eps",
    "num_registers",
    "layer_scale_init",
    "mlp_type",
    "distill_token",
)
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=5)
PREPROCESSING = IMAGENET_TIMM
# timm's pretrained_cfg of its CLIP and SigLIP towers (crop_pct 0.9, bicubic)
CLIP_TIMM = Preprocessing(CLIP_MEAN, CLIP_STD, 0.9, "bicubic")
SIGLIP_TIMM = Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9, "bicubic")
RULES = tuple(
    layouts.torch_rules("patch_embed.proj", "patch_embed", "conv")
    + [
        layouts.Rule("cls_token", "cls_token/token"),
        layouts.Rule("dist_token", "dist_token/token"),
        layouts.Rule("reg_token", "registers/tokens"),
        layouts.Rule("pos_embed", "pos_embed/embedding"),
        layouts.Rule("blocks.{i}.ls1.gamma", "encoder/block_{i}/ls1/scale"),
        layouts.Rule("blocks.{i}.ls2.gamma", "encoder/block_{i}/ls2/scale"),
    ]
    + layouts.torch_rules("norm_pre", "encoder/norm_pre", "ln")
    + layouts.TIMM_ENCODER_RULES
    + layouts.torch_rules("head", "head/classifier", "linear")
    + layouts.torch_rules("head_dist", "head/dist_classifier", "linear")
    + [layouts.Rule("attn_pool.latent", "head/map/probe")]
    + layouts.torch_rules("attn_pool.q", "head/map/attn/query", "linear")
    + layouts.torch_rules("attn_pool.kv", "head/map/attn/kv", "linear")
    + layouts.torch_rules("attn_pool.proj", "head/map/attn/out", "linear")
    + layouts.torch_rules("attn_pool.norm", "head/map/norm", "ln")
    + layouts.torch_rules("attn_pool.mlp.fc1", "head/map/mlp/fc1", "linear")
    + layouts.torch_rules("attn_pool.mlp.fc2", "head/map/mlp/fc2", "linear")
)


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """Any state dict (``CLAIMS = "fallback"``: asked after every narrower format)."""
    return kind == "state_dict"


def read(path: Path, arrays: Flat, metadata: Mapping[str, Any]) -> Checkpoint:
    """A timm state dict (and its safetensors metadata) -> a ``Checkpoint`` in jaxvit's names."""
    _, arrays = strip_prefix(arrays, ("module.",))
    params, unmatched = layouts.rename(arrays, RULES)
    if "patch_embed/kernel" not in params:
        raise ValueError(
            f"{path} holds neither a timm ViT state dict (no 'patch_embed.proj.weight') nor a Hugging Face"
            f" ViT one. Its first keys: {sorted(arrays)[:5]}"
        )
    config = saved_config(path, metadata)
    saved = config.get("model", {})
    for field, key in (
        ("head_bias", "head/classifier/bias"),
        ("head_bias", "head/dist_classifier/bias"),
        ("patch_bias", "patch_embed/bias"),
    ):
        # timm always has these biases; an export of a model without them wrote zeros
        if saved.get(field) is False and key in params and not np.any(params[key]):
            del params[key]
    grid = grid_from_config({**saved, **config})
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=_posemb_prefix_slots(params, grid),
        num_heads=saved.get("num_heads"),
        grid=grid,
        config=config,
        posemb_resample="bicubic",
        posemb_antialias=True,
    )


def saved_config(path: Path, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The ``jaxvit_model`` metadata that ``export`` writes, every value checked; ``{}`` without it."""
    if "jaxvit_model" not in metadata:
        return {}
    where = f"{path}: metadata jaxvit_model"
    try:
        config = json.loads(metadata["jaxvit_model"])
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(config).__name__}")
    config["model"] = schema.read_fields(config.get("model", {}), where)
    if "image_size" in config:
        config["image_size"] = validate.size_field(config, "image_size", where)
    if config.get("labels"):
        config["labels"] = list(validate.str_list(config["labels"], "labels", where))
    return config


def _is_clip(params: Mapping[str, Any]) -> bool:
    return "encoder/norm_pre/scale" in params


def _is_siglip(params: Mapping[str, Any]) -> bool:
    return "cls_token/token" not in params and any(k.startswith("head/map/") for k in params)


def preprocessing(ckpt: Checkpoint) -> Preprocessing:
    """timm's preprocessing for the family the keys show (see the module docstring)."""
    if _is_clip(ckpt.params):
        return CLIP_TIMM
    if _is_siglip(ckpt.params):
        return SIGLIP_TIMM
    return IMAGENET_TIMM


def guess_fields(ckpt: Checkpoint) -> dict[str, Any]:
    """timm's CLIP towers use LayerNorm epsilon 1e-5 (its others 1e-6); the activation stays GELU.

    OpenAI's CLIP weights in timm (``vit_*_clip_quickgelu_*``) use QuickGELU,
    which the keys cannot show: pass ``activation="quick_gelu"``.
    """
    if _is_clip(ckpt.params):
        log.warning(
            "%s looks like a timm CLIP tower: using LayerNorm epsilon 1e-5 and exact GELU"
            " (pass activation='quick_gelu' for OpenAI's weights)",
            ckpt.path,
        )
        return dict(layer_norm_eps=1e-5)
    return {}


# A registered timm model whose fixed arguments (the LayerNorm epsilon, which kwargs
# cannot set) match; timm_kwargs set everything else.
TIMM_MODEL_OF_EPS = {1e-6: "vit_base_patch16_224", 1e-5: "vit_base_patch16_clip_224"}
TIMM_DISTILLED_MODEL = "deit_base_distilled_patch16_224"


def _posemb_prefix_slots(params: Flat, grid: tuple[int, int] | None) -> int:
    """How many prefix tokens have a slot in the position embedding (0 for timm's ``no_embed_class``).

    Told by the grid when the metadata gives it, else by which count leaves a square grid.
    """
    posemb = params.get("pos_embed/embedding")
    if posemb is None:
        return 0
    length = posemb.shape[1]
    if grid is not None:
        return length - grid[0] * grid[1]
    embedded = int("cls_token/token" in params) + int("dist_token/token" in params)
    registers = params["registers/tokens"].shape[1] if "registers/tokens" in params else 0
    for slots in (embedded, embedded + registers, 0):
        if square_grid(length - slots):
            return slots
    return embedded


def no_embed_class(flat: Flat, model: Any) -> bool:
    """Whether to write the model for timm's ``no_embed_class`` (no position-embedding slots in front).

    So timm's DINOv2 with registers is built; and so are DeiT-3 and the like,
    whose slots in front hold zeros when they came from such a file.
    """
    prefix = model.num_posemb_prefix_tokens
    posemb = flat.get("pos_embed/embedding")
    if model.num_registers:
        return True
    return bool(prefix) and posemb is not None and not np.any(posemb[:, :prefix])


def timm_kwargs(model: Any, size: tuple[int, int], without_prefix_slots: bool = False) -> dict[str, Any]:
    """The ``timm.create_model(name, **kwargs)`` arguments of the same architecture.

    ``name`` is a ``vit_*`` model, or a ``deit_*_distilled_*`` one for a model
    with a distillation token. A SwiGLU model gets ``mlp_layer="SwiGLUPacked"``
    and ``act_layer="silu"``: pass ``timm.layers.SwiGLUPacked`` for the string.
    """
    mlp_dim = model.mlp_dim or 4 * model.width
    kwargs: dict[str, Any] = dict(
        img_size=list(size),
        patch_size=model.patch_size,
        in_chans=model.num_channels,
        num_classes=model.num_classes,
        embed_dim=model.width,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=mlp_dim / model.width,
        class_token=model.class_token,
        global_pool={"tok": "token", "gap": "avg", "map": "map"}[model.pool],
        fc_norm=False,
        # explicit: the model named for epsilon 1e-5 (a CLIP tower) has norm_pre
        pre_norm=model.pre_norm,
    )
    if model.posemb == "none":
        kwargs["pos_embed"] = "none"
    if model.pool == "map" and model.num_prefix_tokens:
        kwargs["pool_include_prefix"] = True  # jaxvit's attention pool sees every token
    if not model.qkv_bias:
        kwargs["qkv_bias"] = False
    activation = model.config.activation
    if activation != "gelu":
        kwargs["act_layer"] = activation  # timm's names are the same
    if model.mlp_type == "swiglu":
        # timm's packed fc1 is int(width * mlp_ratio) wide; the half step keeps int() from rounding down.
        kwargs.update(mlp_ratio=(2 * mlp_dim + 0.5) / model.width, mlp_layer="SwiGLUPacked", act_layer="silu")
    if model.layer_scale_init is not None:
        kwargs["init_values"] = model.layer_scale_init
    if model.num_registers:
        kwargs["reg_tokens"] = model.num_registers
    if without_prefix_slots:
        kwargs["no_embed_class"] = True
    return kwargs


def _check_exportable(model: Any) -> None:
    """Raises ``ValueError`` for values of carried fields that timm's ViT cannot take, naming them."""
    if model.posemb not in ("learn", "sincos2d", "none"):
        raise ValueError(
            f"timm's VisionTransformer has no posemb={model.posemb!r} (timm_dinov3 writes 'rope')"
        )
    if model.pre_norm and model.patch_bias:
        raise ValueError(
            "timm's VisionTransformer with norm_pre (pre_norm=True) has no patch-embedding bias;"
            " the model has pre_norm=True, patch_bias=True"
        )
    if model.mlp_type == "swiglu" and model.pool == "map":
        raise ValueError(
            "timm's attention pool takes the blocks' MLP ratio and activation, which SwiGLU changes;"
            " the model has mlp_type='swiglu', pool='map'"
        )
    if model.layer_norm_eps not in TIMM_MODEL_OF_EPS or (
        model.distill_token and model.layer_norm_eps != 1e-6
    ):
        raise ValueError(
            f"timm's ViTs have LayerNorm epsilon 1e-6 (1e-5 for the CLIP towers); the model has"
            f" layer_norm_eps={model.layer_norm_eps}"
        )


def write(flat: Flat, model: Any, size: tuple[int, int], path: Path, labels: Sequence[str] | None) -> Path:
    """jaxvit params (flat, unrolled) -> a timm state dict as safetensors at ``path``.

    The metadata holds ``timm_model`` and ``timm_kwargs``
    (``timm.create_model(timm_model, **timm_kwargs)`` builds the matching
    model), ``timm_class`` (``VisionTransformer`` or, with a distillation
    token, ``VisionTransformerDistilled``) and the jaxvit model fields, image
    size and labels. For ``no_embed_class`` the prefix tokens'
    position-embedding slots are added to the tokens (the same sum, done once).
    """
    _check_exportable(model)
    flat = dict(flat)
    # timm has these biases whatever the model; zeros compute the same
    for head in ("head/classifier", "head/dist_classifier"):
        if not model.head_bias and f"{head}/kernel" in flat:
            flat[f"{head}/bias"] = np.zeros(flat[f"{head}/kernel"].shape[-1], np.float32)
    if not model.patch_bias and not model.pre_norm:
        flat["patch_embed/bias"] = np.zeros(model.width, np.float32)
    without_slots = no_embed_class(flat, model)
    if without_slots and "pos_embed/embedding" in flat:
        posemb = flat["pos_embed/embedding"]
        prefix_names = ["cls_token/token"] * model.class_token + ["dist_token/token"] * model.distill_token
        for slot, name in enumerate(prefix_names):
            flat[name] = flat[name] + posemb[:, slot : slot + 1]
        flat["pos_embed/embedding"] = posemb[:, len(prefix_names) :]
    out = layouts.rename_back(
        layouts.split_attention(flat, model.num_heads, "fused", "flat_kv"), RULES, "timm"
    )
    saved = {"model": schema.json_fields(model), "image_size": list(size), "labels": list(labels or [])}
    metadata = {
        "jaxvit_model": json.dumps(saved),
        "timm_kwargs": json.dumps(timm_kwargs(model, size, without_slots)),
        "timm_class": "VisionTransformerDistilled" if model.distill_token else "VisionTransformer",
        "timm_model": TIMM_DISTILLED_MODEL
        if model.distill_token
        else TIMM_MODEL_OF_EPS[model.layer_norm_eps],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_safetensors(out, path, metadata)
    return path
