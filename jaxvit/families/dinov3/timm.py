"""timm's DINOv3 (``vit_*_patch16_dinov3``, built on timm's ``Eva``) state dicts.

No position-embedding table: a 2-D rotary embedding of the patch tokens
(``posemb="rope"``), computed as transformers' DINOv3 does (timm divides by
periods where transformers multiplies by frequencies: the same to rounding).
LayerScale is ``gamma_1`` / ``gamma_2``; the fused ``qkv`` has no bias, or
``q_bias`` and ``v_bias`` with a key bias fixed at zero; the MLP is plain
(``mlp.fc1``, ``mlp.fc2``) or SwiGLU with separate ``fc1_g`` (gate) and
``fc1_x``, which jaxvit packs into one ``fc1``, gate first. The LayerNorm
epsilon (1e-5) and rotary base (100) are those of timm's DINOv3 models; the
weights cannot tell them. The other ``Eva`` models (EVA02, the RoPE ViTs: a position table or
another rotary layout) are ``jaxvit.families.eva``'s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts, timm_hub
from jaxvit.checkpoints.checkpoint import (
    Checkpoint,
    Flat,
    Preprocessing,
    grid_from_config,
    strip_prefix,
)
from jaxvit.families.dinov3 import TIMM_HEADS
from jaxvit.safety import validate

NAME = "timm_dinov3"
# a timm hub folder's weights are read here when they are DINOv3's (timm_hub)
READS_TIMM_FOLDERS = True
HAS_SINCOS = False
EXPORT_FORMAT = "timm"
TARGET = "timm Eva (DINOv3)"
TIMM_MODEL = "vit_small_patch16_dinov3"
# timm_kwargs says each of these; timm's DINOv3 fixes the rest (exact GELU, no norm_pre, a
# patch and a head bias, class-token pooling), and the LayerNorm epsilon at 1e-5.
CARRIES = (
    "posemb",
    "rope_theta",
    "layer_norm_eps",
    "qkv_bias",
    "num_registers",
    "layer_scale_init",
    "mlp_type",
)
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=5, posemb="rope", layer_norm_eps=1e-5)
# timm's DINOv3 configs: the whole image to 256 x 256, bicubic, ImageNet statistics.
PREPROCESSING = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0, "bicubic")
DEFAULT_IMAGE_SIZE = 256
IMPLIED_FIELDS = dict(posemb="rope", rope_theta=100.0, layer_norm_eps=1e-5)
RULES = tuple(
    layouts.torch_rules("patch_embed.proj", "patch_embed", "conv")
    + [
        layouts.Rule("cls_token", "cls_token/token"),
        layouts.Rule("reg_token", "registers/tokens"),
        layouts.Rule("blocks.{i}.gamma_1", "encoder/block_{i}/ls1/scale"),
        layouts.Rule("blocks.{i}.gamma_2", "encoder/block_{i}/ls2/scale"),
    ]
    + layouts.TIMM_ENCODER_RULES
    + layouts.torch_rules("head", "head/classifier", "linear")
)


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A state dict with ``Eva``'s LayerScale names (``blocks.{i}.gamma_1``) and nothing that DINOv3
    cannot have (``not_dinov3``: the other Eva models are ``families/eva``'s)."""
    if kind != "state_dict":
        return False
    _, keys = strip_prefix(dict.fromkeys(arrays), ("module.",))
    return (
        any(re.fullmatch(r"blocks\.\d+\.gamma_1", k) for k in keys)
        and not any(k.endswith("relative_position_bias_table") for k in keys)  # BEiT's (beit/timm.py)
        and not_dinov3(keys, {}) is None
    )


def _without_exported_fillers(params: Flat, saved: Mapping[str, Any]) -> Flat:
    """What jaxvit's export of a model without qkv biases or LayerScale filled in (zero biases,
    unit scales: timm's DINOv3 always has them), left out again as the saved fields say."""
    fillers = []
    if saved.get("qkv_bias") is False:
        fillers += [(k, 0.0) for k in params if k.endswith("/attn/qkv/bias")]
    if "layer_scale_init" in saved and saved["layer_scale_init"] is None:
        fillers += [(k, 1.0) for k in params if k.endswith(("/ls1/scale", "/ls2/scale"))]
    return {k: v for k, v in params.items() if not any(k == f and np.all(v == c) for f, c in fillers)}


def not_dinov3(arrays: Mapping[str, Any], metadata: Mapping[str, Any]) -> str | None:
    """Why a timm ``Eva`` state dict is not DINOv3, or None when it is.

    timm's ``Eva`` class holds DINOv3, EVA-02, Perception Encoder and the RoPE ViTs
    (``vit_*_rope_*``), whose rotary embeddings differ while their keys mostly agree. The file's
    metadata settles it when it names the timm model; otherwise only keys that DINOv3 cannot have
    (and the class token every timm DINOv3 has) let it be read as DINOv3.
    """
    named = str(metadata.get("timm_model", ""))
    if named:
        return None if "dinov3" in named else f"timm model {named!r}"
    blocks = [k for k in arrays if re.fullmatch(r"blocks\.\d+\..*", k)]
    if "pos_embed" in arrays:
        return "a position table besides the rotary embedding (EVA-02, Perception Encoder, vit_*_rope_ape_*)"
    if "rope.freqs" in arrays:
        return (
            "rotary embedding of kind RotaryEmbeddingMixed, learned per-head frequencies (vit_*_rope_mixed_*)"
        )
    if any(k.endswith(".attn.qkv.bias") for k in blocks):
        return "rotary embedding of kind RotaryEmbeddingCat, with a key bias (vit_*_rope_*)"
    if "fc_norm.weight" in arrays or "cls_token" not in arrays:
        return "no class token or an fc_norm (the vit_*_rope_*_gap models)"
    return None


# the create_model arguments a timm DINOv3 folder may state: those jaxvit's export writes
MODEL_ARGS = frozenset(
    "img_size patch_size in_chans num_classes embed_dim depth num_heads mlp_ratio qkv_bias init_values"
    " rope_temperature num_reg_tokens global_pool swiglu_mlp swiglu_align_to dynamic_img_size".split()
)


def _stated_by_timm_config(path: Path, params: Flat, config: Mapping[str, Any]) -> dict[str, Any]:
    """What a timm hub folder's ``config.json`` states: heads, input size, rotary base, labels."""
    where = f"{path.parent / 'config.json'}"
    name, args = timm_hub.known_model_args(config, where, TIMM_HEADS, MODEL_ARGS, "DINOv3")
    if args.get("global_pool", config.get("global_pool", "token")) != "token":
        raise ValueError(f"{where}: timm DINOv3 with a global_pool other than 'token': not supported")
    timm_hub.check_num_classes(config, params, where, default=0)
    theta = validate.float_field(
        args, "rope_temperature", where, default=IMPLIED_FIELDS["rope_theta"], lo=0.0
    )
    return dict(
        num_heads=validate.int_field(args, "num_heads", where, default=TIMM_HEADS[name], lo=1, hi=4096),
        size=timm_hub.input_size(config, where),
        config=timm_hub.checkpoint_config(config),
        fields={**IMPLIED_FIELDS, "rope_theta": theta},
    )


def preprocessing(ckpt: Checkpoint) -> Preprocessing:
    """A timm folder's ``pretrained_cfg``, else timm's DINOv3 default (``PREPROCESSING``)."""
    return timm_hub.folder_preprocessing(ckpt, PREPROCESSING)


def read(path: Path, arrays: Flat, metadata: Mapping[str, Any]) -> Checkpoint:
    """A timm DINOv3 state dict (and its safetensors metadata) -> a ``Checkpoint``.

    Any other timm ``Eva`` model is refused in one line that says what it has (``not_dinov3``).
    """
    _, arrays = strip_prefix(arrays, ("module.",))
    reason = not_dinov3(arrays, metadata)
    if reason is not None:
        raise ValueError(
            f"{path}: a timm Eva model with {reason}: not supported as DINOv3; of timm's other Eva"
            " models jaxvit reads those of jaxvit.families.eva.TIMM_MODELS"
        )
    arrays = layouts.pack_swiglu(layouts.fuse_q_v_biases(arrays))
    params, unmatched = layouts.rename(arrays, RULES)
    config = json.loads(metadata["jaxvit_model"]) if "jaxvit_model" in metadata else {}
    saved = config.get("model", {})
    params = _without_exported_fillers(params, saved)
    grid = grid_from_config({**saved, **config})
    stated = (
        _stated_by_timm_config(path, params, metadata["timm_config"]) if "timm_config" in metadata else {}
    )
    kernel = params.get("patch_embed/kernel")
    if stated.get("size") is not None and kernel is not None:
        grid = (stated["size"][0] // kernel.shape[0], stated["size"][1] // kernel.shape[1])
    if grid is None and kernel is not None:  # no table to tell it: timm's DINOv3 resolution
        grid = (DEFAULT_IMAGE_SIZE // kernel.shape[0], DEFAULT_IMAGE_SIZE // kernel.shape[1])
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=0,
        num_heads=stated.get("num_heads", saved.get("num_heads")),
        grid=grid,
        config={**config, **stated.get("config", {})},
        implied_fields=stated.get("fields", dict(IMPLIED_FIELDS)),
    )


def exports(model: Any) -> bool:
    """Whether ``format="timm"`` writes ``model`` as timm's DINOv3 (it has the rotary position embedding)."""
    return model.posemb == "rope" and model.rel_pos_bias == "none"


def timm_kwargs(model: Any, size: tuple[int, int]) -> dict[str, Any]:
    """``timm.create_model(TIMM_MODEL, **kwargs)`` arguments of the same architecture."""
    kwargs: dict[str, Any] = dict(
        **timm_hub.size_kwargs(model, size),
        qkv_bias=model.qkv_bias,
        init_values=model.layer_scale_init if model.layer_scale_init is not None else 1.0,
        rope_temperature=model.rope_theta,
        num_reg_tokens=model.num_registers,
        global_pool="token",
        # swiglu_align_to=0: timm then packs gate and value into one fc1, gate first, as jaxvit does
        swiglu_mlp=model.mlp_type == "swiglu",
        swiglu_align_to=0,
    )
    return kwargs


def write(flat: Flat, model: Any, size: tuple[int, int], path: Path, labels: Sequence[str] | None) -> Path:
    """jaxvit params (flat, unrolled) -> a timm DINOv3 (``Eva``) state dict as safetensors at ``path``."""
    problems = []
    if model.posemb != "rope":
        problems.append(f"posemb={model.posemb!r} (timm's DINOv3 is rotary: 'rope')")
    if model.layer_norm_eps != 1e-5:
        problems.append(f"layer_norm_eps={model.layer_norm_eps} (timm's DINOv3 has 1e-5)")
    if model.config.activation != "gelu":
        problems.append(f"activation={model.config.activation!r} (timm's DINOv3 MLP is exact GELU)")
    if model.pool != "tok" or model.distill_token or not model.class_token:
        problems.append("a pooling other than 'tok', or a distillation token")
    flat = dict(flat)
    if model.layer_scale_init is None:
        for i in range(model.depth):
            for name in ("ls1", "ls2"):
                flat[f"encoder/block_{i}/{name}/scale"] = np.ones((model.width,), np.float32)
    out = layouts.rename_back(layouts.split_attention(flat, model.num_heads, "fused", "heads"), RULES, "timm")
    out, nonzero = layouts.split_q_v_biases(out)
    problems += [f"a key bias that is not zero ({key}); timm's DINOv3 fixes it at zero" for key in nonzero]
    if problems:
        raise ValueError("format='timm' cannot write this model as timm's DINOv3: " + "; ".join(problems))
    kwargs = timm_kwargs(model, size)
    return timm_hub.write_state_dict(
        out, path, model, size, labels, timm_model=TIMM_MODEL, timm_class="Eva", timm_kwargs=kwargs
    )
