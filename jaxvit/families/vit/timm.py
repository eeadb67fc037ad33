"""timm ``VisionTransformer`` state dicts (safetensors, or ``.pth``/``.bin`` through PyTorch).

A bare timm state dict does not say its number of heads, its grid nor (for
a CLIP tower) its activation. What says them, in this order: jaxvit's own
exports (the model fields and the matching ``timm.create_model(timm_model,
**timm_kwargs)`` arguments in the safetensors metadata); a timm hub folder's
``config.json`` (``stated_by_timm_config``: the architecture, its
``model_args`` and ``pretrained_cfg``); else the caller (``num_heads=``,
``checkpoint_grid=``, ``activation=``): a file that leaves one open is
refused naming the option, never guessed. The preprocessing is the
folder's ``pretrained_cfg``, else that of the family the keys show: CLIP
towers (``vit_*_clip_*``, a ``norm_pre``) CLIP's statistics, SigLIP towers
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
from jaxvit.checkpoints import layouts, timm_hub
from jaxvit.checkpoints.checkpoint import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_TIMM,
    Checkpoint,
    Flat,
    Preprocessing,
    grid_from_config,
    strip_prefix,
)
from jaxvit.families.vit import TIMM_ARCHITECTURES
from jaxvit.safety import validate
from jaxvit.sizes import square_grid

NAME = "timm"
# a timm hub folder's weights are read here, its config.json as their metadata (timm_hub)
READS_TIMM_FOLDERS = True
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
    "fc_norm",
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
    + layouts.torch_rules("fc_norm", "head/fc_norm", "ln")
    + layouts.torch_rules("head", "head/classifier", "linear")
    + layouts.torch_rules("head_dist", "head/dist_classifier", "linear")
    + layouts.TIMM_ATTN_POOL_RULES
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
    if (
        not saved
        and "timm_config" not in metadata
        and "encoder/norm_pre/scale" in params
        and "head/map/probe" in params
    ):
        # no timm VisionTransformer has both; Perception Encoder (timm's Eva) has, and a rotary embedding
        raise ValueError(
            f"{path}: norm_pre with attention pooling is timm's Perception Encoder (vit_pe_core_*, an Eva"
            " with a rotary embedding that a bare file does not state): load its timm hub folder"
        )
    stated = stated_by_timm_config(path, params, metadata["timm_config"]) if "timm_config" in metadata else {}
    for field, key in (
        ("head_bias", "head/classifier/bias"),
        ("head_bias", "head/dist_classifier/bias"),
        ("patch_bias", "patch_embed/bias"),
    ):
        # timm always has these biases; an export of a model without them wrote zeros
        if saved.get(field) is False and key in params and not np.any(params[key]):
            del params[key]
    grid = stated.get("grid") or grid_from_config({**saved, **config})
    slots, ambiguity = (stated["slots"], "") if "slots" in stated else _posemb_prefix_slots(params, grid)
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=slots,
        num_heads=stated.get("num_heads", saved.get("num_heads")),
        grid=grid,
        config={**config, **stated.get("config", {})},
        posemb_resample="bicubic",
        posemb_antialias=True,
        implied_fields=stated.get("fields", {}),
        unstated=_unstated(params, saved, stated),
        grid_ambiguity=ambiguity and f"{path}: {ambiguity}",
    )


# timm create_model arguments (model_args) that jaxvit reads: the sizes and options the keys
# show, and those the config must state. Any other argument is refused by name.
MODEL_ARGS = frozenset(
    "img_size patch_size in_chans num_classes embed_dim depth num_heads mlp_ratio class_token"
    " global_pool fc_norm pre_norm qkv_bias act_layer mlp_layer init_values reg_tokens"
    " no_embed_class pos_embed pool_include_prefix dynamic_img_size".split()
)
TIMM_POOLS = {"token": "tok", "avg": "gap", "map": "map"}
TIMM_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def _refuse_model_args(where: str, args: Mapping[str, Any], params: Flat, pool: str) -> None:
    unknown = sorted(set(args) - MODEL_ARGS)
    if unknown:
        raise ValueError(f"{where}: timm model_args {unknown} are not supported")
    refused = {
        "act_layer": args.get("act_layer", "gelu") not in TIMM_ACTIVATIONS
        and not (args.get("act_layer") == "silu" and args.get("mlp_layer") == "SwiGLUPacked"),
        "mlp_layer": args.get("mlp_layer", "SwiGLUPacked") != "SwiGLUPacked",
        "pos_embed": args.get("pos_embed", "learn") not in ("learn", "none"),
        # jaxvit's mean pool leaves the prefix tokens out, its attention pool takes them in
        "pool_include_prefix": args.get("pool_include_prefix", pool == "map") != (pool == "map")
        and ("cls_token/token" in params or "registers/tokens" in params),
    }
    for name, bad in refused.items():
        if bad:
            raise ValueError(f"{where}: timm model_args {name}={args[name]!r} is not supported")


def stated_by_timm_config(path: Path, params: Flat, config: Mapping[str, Any]) -> dict[str, Any]:
    """What a timm hub folder's ``config.json`` states that the weights cannot show.

    ``create_model(architecture, **model_args)`` made the weights: the head
    count, activation, LayerNorm epsilon and ``no_embed_class`` are the
    architecture's (``TIMM_ARCHITECTURES``) unless ``model_args`` set them;
    the grid is ``pretrained_cfg``'s input size. An architecture jaxvit does
    not know, and a setting it cannot represent, are refused.
    """
    where = f"{path.parent / 'config.json'}"
    name = timm_hub.architecture(config)
    if name not in TIMM_ARCHITECTURES:
        raise ValueError(
            f"{where}: timm model {name!r} is not one jaxvit reads exactly (it knows timm's plain"
            " VisionTransformer models, jaxvit.families.vit.TIMM_ARCHITECTURES)"
        )
    heads, activation, eps, no_embed = TIMM_ARCHITECTURES[name]
    args = config.get("model_args", {})
    pool_name = args.get("global_pool", config.get("global_pool", "token"))
    if pool_name not in TIMM_POOLS:
        raise ValueError(
            f"{where}: timm global_pool={pool_name!r} is not supported (jaxvit has {sorted(TIMM_POOLS)})"
        )
    pool = TIMM_POOLS[pool_name]
    _refuse_model_args(where, args, params, pool)
    # timm's fc_norm=None means a LayerNorm after the pooling exactly when the pool is the mean
    fc_norm = pool == "gap" if args.get("fc_norm") is None else bool(args["fc_norm"])
    if fc_norm != ("head/fc_norm/scale" in params):
        raise ValueError(
            f"{where}: global_pool={pool_name!r}, fc_norm={args.get('fc_norm')!r} make timm's fc_norm"
            f" {'on' if fc_norm else 'off'}, but the weights {'lack' if fc_norm else 'have'} fc_norm.weight"
        )
    num_heads = validate.int_field(args, "num_heads", f"{where}: model_args", default=heads, lo=1, hi=4096)
    fields: dict[str, Any] = dict(pool=pool, layer_norm_eps=eps)
    activation = args.get("act_layer", activation)
    if activation in TIMM_ACTIVATIONS:
        fields["activation"] = activation
    no_embed = bool(args.get("no_embed_class", no_embed))
    stated: dict[str, Any] = dict(num_heads=num_heads, fields=fields)
    timm_hub.check_num_classes(config, params, where)
    size = timm_hub.input_size(config, where)
    kernel = params["patch_embed/kernel"]
    posemb = params.get("pos_embed/embedding")
    if size is not None and posemb is not None:
        grid = (size[0] // kernel.shape[0], size[1] // kernel.shape[1])
        slots = 0 if no_embed else sum(_prefix_tokens(params))
        if posemb.shape[1] != slots + grid[0] * grid[1]:
            raise ValueError(
                f"{where}: input size {size} (a {grid[0]}x{grid[1]} grid) and {slots} prefix slot(s) make"
                f" {slots + grid[0] * grid[1]} position-embedding rows, but the weights have {posemb.shape[1]}"
            )
        stated.update(grid=grid, slots=slots)
    stated["config"] = timm_hub.checkpoint_config(config)
    if size is not None:
        stated["config"]["image_size"] = list(size)
    return stated


def _unstated(params: Flat, saved: Mapping[str, Any], stated: Mapping[str, Any]) -> dict[str, str]:
    if saved or stated:
        return {}
    unstated = {}
    if _is_clip(params):
        unstated["activation"] = (
            "a bare timm CLIP tower does not say its activation: 'quick_gelu' for OpenAI's"
            " weights (vit_*_clip_quickgelu_*), 'gelu' for the others"
        )
    if "head/fc_norm/scale" in params and "cls_token/token" in params:
        unstated["pool"] = (
            "a bare timm state dict with fc_norm and a class token does not say what it pools:"
            " 'gap' (global_pool='avg', MAE's fine-tuned models) or 'tok'"
        )
    return unstated


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
    """A timm folder's ``pretrained_cfg``; for a bare file, timm's preprocessing for the family the
    keys show (see the module docstring)."""
    default = IMAGENET_TIMM
    if _is_clip(ckpt.params):
        default = CLIP_TIMM
    elif _is_siglip(ckpt.params):
        default = SIGLIP_TIMM
    timm_config = ckpt.config.get("timm_config")
    return timm_hub.preprocessing(timm_config, ckpt.path, default) if timm_config else default


def guess_fields(ckpt: Checkpoint) -> dict[str, Any]:
    """timm's CLIP towers (the only ones of its ViTs with ``norm_pre``) have LayerNorm epsilon 1e-5."""
    return dict(layer_norm_eps=1e-5) if _is_clip(ckpt.params) else {}


# A registered timm model whose fixed arguments (the LayerNorm epsilon, which kwargs
# cannot set) match; timm_kwargs set everything else.
TIMM_MODEL_OF_EPS = {1e-6: "vit_base_patch16_224", 1e-5: "vit_base_patch16_clip_224"}
TIMM_DISTILLED_MODEL = "deit_base_distilled_patch16_224"
TIMM_SWIGLU_MODEL = "vit_giant_patch14_dinov2"


# A bare file's grid is refused as ambiguous when another count of prefix slots leaves a grid
# this close to square (a 4x6 grid and a class slot is 25 rows, as a 5x5 grid without one is).
AMBIGUOUS_ASPECT = 1.5


def _near_square_grids(length: int) -> list[tuple[int, int]]:
    """The grids ``(h, w)`` of ``length`` patches with ``max(h, w) <= AMBIGUOUS_ASPECT * min(h, w)``."""
    return [
        (h, length // h)
        for h in range(1, length + 1)
        if length % h == 0 and max(h, length // h) <= AMBIGUOUS_ASPECT * min(h, length // h)
    ]


def _prefix_tokens(params: Flat) -> tuple[int, int]:
    """``(class and distillation tokens, registers)`` the keys hold."""
    embedded = int("cls_token/token" in params) + int("dist_token/token" in params)
    return embedded, params["registers/tokens"].shape[1] if "registers/tokens" in params else 0


def _posemb_prefix_slots(params: Flat, grid: tuple[int, int] | None) -> tuple[int, str]:
    """``(slots, ambiguity)``: how many prefix tokens have a slot in the position embedding (0 for
    timm's ``no_embed_class``), and a message when the file cannot tell (else ``""``).

    The grid settles it when the metadata gives it. Otherwise the count of
    slots that leaves a square grid is taken, unless another count leaves a
    grid of nearly the same shape: then the file is ambiguous and
    ``checkpoint_grid`` must say.
    """
    posemb = params.get("pos_embed/embedding")
    if posemb is None:
        return 0, ""
    length = posemb.shape[1]
    if grid is not None:
        return length - grid[0] * grid[1], ""
    embedded, registers = _prefix_tokens(params)
    counts = [c for c in dict.fromkeys((embedded, embedded + registers, 0)) if c < length]
    readings = {c: _near_square_grids(length - c) for c in counts}
    squares = [c for c in counts if square_grid(length - c)]
    if not squares:
        return embedded, ""
    others = [(c, g) for c in counts if c != squares[0] for g in readings[c]]
    if not others:
        return squares[0], ""
    choices = [(squares[0], square_grid(length - squares[0])), *others]
    said = " or ".join(f"{h}x{w} after {c} slot(s)" for c, (h, w) in choices)
    options = " or ".join(f"({h}, {w})" for _, (h, w) in choices)
    return squares[0], (
        f"the position embedding's {length} rows are a {said}, and the file does not say which:"
        f" pass checkpoint_grid={options} (a timm hub folder's config.json says it)"
    )


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


def timm_model_of(model: Any) -> str:
    """The registered timm model whose fixed parts (LayerNorm epsilon, MLP class) ``model`` has."""
    if model.distill_token:
        return TIMM_DISTILLED_MODEL
    if model.mlp_type == "swiglu":
        return TIMM_SWIGLU_MODEL
    return TIMM_MODEL_OF_EPS[model.layer_norm_eps]


def timm_kwargs(model: Any, size: tuple[int, int], without_prefix_slots: bool = False) -> dict[str, Any]:
    """The ``timm.create_model(name, **kwargs)`` arguments of the same architecture.

    ``name`` is ``timm_model_of(model)``, whose registered defaults these
    arguments override: for a SwiGLU model ``vit_giant_patch14_dinov2``,
    whose ``SwiGLUPacked`` MLP and SiLU no JSON argument could name.
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
        global_pool={ours: theirs for theirs, ours in TIMM_POOLS.items()}[model.pool],
        fc_norm=model.fc_norm,
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
        # timm drops None arguments; 0 turns the giant's LayerScale off (its Block tests init_values' truth)
        kwargs.update(mlp_ratio=(2 * mlp_dim + 0.5) / model.width, init_values=0.0)
        kwargs.pop("act_layer", None)
    if model.layer_scale_init is not None:
        kwargs["init_values"] = model.layer_scale_init
    if model.num_registers:
        kwargs["reg_tokens"] = model.num_registers
    if without_prefix_slots:
        kwargs["no_embed_class"] = True
    return kwargs


def _check_exportable(model: Any) -> None:
    """Raises ``ValueError`` for values of carried fields that timm's ViT cannot take, naming them."""
    if model.pool not in TIMM_POOLS.values():
        raise ValueError(
            f"timm's VisionTransformer has no pool={model.pool!r} (its global_pools are jaxvit's"
            f" {sorted(TIMM_POOLS.values())})"
        )
    if model.posemb not in ("learn", "sincos2d", "sincos2d_mae", "none"):
        raise ValueError(
            f"timm's VisionTransformer has no posemb={model.posemb!r} (timm_dinov3 writes 'rope')"
        )
    if model.pre_norm and model.patch_bias:
        raise ValueError(
            "timm's VisionTransformer with norm_pre (pre_norm=True) has no patch-embedding bias;"
            " the model has pre_norm=True, patch_bias=True"
        )
    if model.mlp_type == "swiglu" and (model.distill_token or model.layer_norm_eps != 1e-6):
        raise ValueError(
            "timm's SwiGLU ViTs (vit_giant_patch14_dinov2) have LayerNorm epsilon 1e-6 and no distillation"
            f" token; the model has layer_norm_eps={model.layer_norm_eps}, distill_token={model.distill_token}"
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
    return timm_hub.write_state_dict(
        out,
        path,
        model,
        size,
        labels,
        timm_model=timm_model_of(model),
        timm_class="VisionTransformerDistilled" if model.distill_token else "VisionTransformer",
        timm_kwargs=timm_kwargs(model, size, without_slots),
    )
