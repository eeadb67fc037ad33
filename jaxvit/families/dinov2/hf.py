"""Hugging Face DINOv2: ``Dinov2Model`` and ``Dinov2WithRegistersModel`` folders and state dicts.

Both share one key layout: LayerScale on each branch (``layer_scale{1,2}.lambda1``),
an MLP that is plain (``mlp.fc1``/``mlp.fc2``) or SwiGLU. Files on the Hub
(and what ``save_pretrained`` writes) pack the SwiGLU's gate and value
projections into ``mlp.weights_in`` (gate first) and name its output
``mlp.weights_out``; the loaded modules call them ``gate_proj``, ``up_proj``,
``down_proj``. Both are read; the first is written.

The pooled output (``pooler_output``) is the final-normed class token, which
is what a jaxvit model with ``num_classes=0, pool="tok"`` returns. The
position embedding is resized bicubically as transformers'
``interpolate_pos_encoding`` does it: without antialiasing for DINOv2, with it
for DINOv2 with registers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import IMAGENET_TIMM, Checkpoint, Flat, grid_from_config
from jaxvit.families.vit.hf import HIDDEN_ACT, HIDDEN_ACT_OF, check_posemb
from jaxvit.layers.mlp import swiglu_hidden_size
from jaxvit.model import VisionTransformer, create_model
from jaxvit.safety import files
from jaxvit.sizes import to_pair

NAME = "hf_dinov2"
HAS_SINCOS = False
EXPORT_FORMAT = "hf"
TARGET = "transformers Dinov2Model / Dinov2WithRegistersModel"
# config.json says these; LayerScale is always there (a scale of ones without it).
CARRIES = (
    "posemb",
    "activation",
    "qkv_bias",
    "layer_norm_eps",
    "num_registers",
    "layer_scale_init",
    "mlp_type",
)
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=0, layer_scale_init=0.1)
HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
# The DINOv2 image processor: shorter side to 256, center crop 224, bicubic, ImageNet statistics.
PREPROCESSING = IMAGENET_TIMM

_BLOCK = "encoder.layer.{i}"
_SWIGLU_RULES = layouts.torch_rules(f"{_BLOCK}.mlp.weights_in", "encoder/block_{i}/mlp/fc1", "linear") + (
    layouts.torch_rules(f"{_BLOCK}.mlp.weights_out", "encoder/block_{i}/mlp/fc2", "linear")
)
RULES = tuple(
    layouts.torch_rules("embeddings.patch_embeddings.projection", "patch_embed", "conv")
    + [
        layouts.Rule("embeddings.cls_token", "cls_token/token"),
        layouts.Rule("embeddings.position_embeddings", "pos_embed/embedding"),
        layouts.Rule("embeddings.register_tokens", "registers/tokens"),
        layouts.Rule(f"{_BLOCK}.layer_scale1.lambda1", "encoder/block_{i}/ls1/scale"),
        layouts.Rule(f"{_BLOCK}.layer_scale2.lambda1", "encoder/block_{i}/ls2/scale"),
    ]
    + layouts.torch_block_rules(
        _BLOCK,
        {
            "norm1": "norm1",
            "attn/query": "attention.attention.query",
            "attn/key": "attention.attention.key",
            "attn/value": "attention.attention.value",
            "attn/out": "attention.output.dense",
            "norm2": "norm2",
            "mlp/fc1": "mlp.fc1",
            "mlp/fc2": "mlp.fc2",
        },
    )
    + _SWIGLU_RULES
    # the names of the loaded modules (a state dict taken from a live model)
    + layouts.torch_block_rules(
        _BLOCK,
        {
            "attn/query": "attention.q_proj",
            "attn/key": "attention.k_proj",
            "attn/value": "attention.v_proj",
            "attn/out": "attention.o_proj",
        },
    )
    + layouts.torch_rules(f"{_BLOCK}.mlp.down_proj", "encoder/block_{i}/mlp/fc2", "linear")
    + layouts.torch_rules("layernorm", "encoder/norm", "ln")
)
# Export looks up the first rule naming a jaxvit key: the SwiGLU's names must come first for it.
SWIGLU_RULES = tuple(_SWIGLU_RULES) + RULES
# Pre-training leftovers that inference never reads.
_IGNORED = ("embeddings.mask_token",)


def _pack_gate_and_up(arrays: Mapping[str, np.ndarray]) -> Flat:
    """``mlp.gate_proj`` + ``mlp.up_proj`` (live-module names) -> the packed ``mlp.weights_in`` (gate first)."""
    out = dict(arrays)
    for key in [k for k in arrays if ".mlp.gate_proj." in k]:
        up = key.replace(".gate_proj.", ".up_proj.")
        if up in out:
            out[key.replace(".gate_proj.", ".weights_in.")] = np.concatenate(
                [out.pop(key), out.pop(up)], axis=0
            )
    return out


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A state dict with DINOv2's LayerScale names."""
    return kind == "state_dict" and any(".layer_scale1.lambda1" in k for k in arrays)


def read(path: Path, arrays: Flat, config: Mapping[str, Any]) -> Checkpoint:
    """A DINOv2 state dict (and its ``config.json``, if any) -> a ``Checkpoint``."""
    if config and config.get("model_type") not in HF_MODEL_TYPES:
        raise ValueError(
            f"{path}: config.json has model_type={config.get('model_type')!r}, expected one of {HF_MODEL_TYPES}"
        )
    for prefix in ("dinov2_with_registers.", "dinov2."):
        if any(k.startswith(prefix) for k in arrays):
            arrays = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in arrays.items()}
    if any(k.startswith("classifier.") for k in arrays):
        raise ValueError(
            f"{path}: Dinov2ForImageClassification's head reads the class token and the mean patch token"
            " together, which jaxvit's head does not; load the backbone (Dinov2Model) instead"
        )
    arrays = {k: v for k, v in _pack_gate_and_up(arrays).items() if k not in _IGNORED}
    params, unmatched = layouts.rename(arrays, RULES)
    registers = "registers/tokens" in params or config.get("model_type") == "dinov2_with_registers"
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=1,
        num_heads=config.get("num_attention_heads"),
        grid=grid_from_config(config),
        config=dict(config),
        posemb_resample="bicubic",
        posemb_antialias=registers,
    )


def model_from_config(config: Mapping[str, Any], **overrides: Any) -> VisionTransformer:
    """A DINOv2 ``config.json`` dict -> the matching ``VisionTransformer`` (``num_classes=0``: the backbone)."""
    act = config.get("hidden_act", "gelu")
    if act not in HIDDEN_ACT:
        raise ValueError(f"hidden_act={act!r} is not supported: expected one of {sorted(HIDDEN_ACT)}")
    width = config.get("hidden_size", 768)
    mlp_dim = int(width * config.get("mlp_ratio", 4))
    swiglu = bool(config.get("use_swiglu_ffn", False))
    fields = dict(
        num_classes=0,
        width=width,
        depth=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 12),
        mlp_dim=swiglu_hidden_size(mlp_dim) if swiglu else mlp_dim,
        mlp_type="swiglu" if swiglu else "mlp",
        patch_size=config.get("patch_size", 14),
        num_channels=config.get("num_channels", 3),
        layer_norm_eps=config.get("layer_norm_eps", 1e-6),
        activation=HIDDEN_ACT[act],
        qkv_bias=bool(config.get("qkv_bias", True)),
        layer_scale_init=float(config.get("layerscale_value", 1.0)),
        num_registers=int(config.get("num_register_tokens", 0)),
        class_token=True,
        pool="tok",
        posemb="learn",
    )
    fields.update(overrides)
    return create_model(None, **fields)


def build_model(ckpt: Checkpoint, **overrides: Any) -> tuple[VisionTransformer, tuple[int, int]] | None:
    """``(model, image_size)`` from the folder's config; None for a bare state dict."""
    if not ckpt.config:
        return None
    return model_from_config(ckpt.config, **overrides), to_pair(ckpt.config.get("image_size", 518))


def exports(model: VisionTransformer) -> bool:
    """Whether ``format="hf"`` writes ``model`` as a DINOv2 backbone (it has a DINOv2 feature, no distillation)."""
    dinov2_feature = (
        model.layer_scale_init is not None or model.num_registers > 0 or model.mlp_type == "swiglu"
    )
    other_family = (
        model.distill_token  # DeiT
        or model.pre_norm  # CLIP
        or model.posemb == "rope"  # DINOv3
        or (model.pool == "map" and not model.class_token)  # SigLIP
        or model.rel_pos_bias != "none"  # BEiT
    )
    return dinov2_feature and not other_family


def _export_config(model: VisionTransformer, size: tuple[int, int]) -> dict[str, Any]:
    # transformers' DINOv2 config has only an integer mlp_ratio; the SwiGLU width derives from it.
    mlp_dim = model.mlp_dim or 4 * model.width
    width_of = swiglu_hidden_size if model.mlp_type == "swiglu" else (lambda m: m)
    ratio = next((r for r in range(1, 65) if width_of(model.width * r) == mlp_dim), None)
    if ratio is None:
        raise ValueError(
            f"no integer DINOv2 mlp_ratio gives mlp_dim={mlp_dim} ({model.mlp_type}) at width {model.width}"
        )
    registers = model.num_registers > 0
    config: dict[str, Any] = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": model.width,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "mlp_ratio": ratio,
        "hidden_act": HIDDEN_ACT_OF[model.config.activation],
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": model.layer_norm_eps,
        "image_size": size[0],
        "patch_size": to_pair(model.patch_size)[0],
        "num_channels": model.num_channels,
        "qkv_bias": model.qkv_bias,
        "layerscale_value": model.layer_scale_init if model.layer_scale_init is not None else 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": model.mlp_type == "swiglu",
    }
    if registers:
        config["num_register_tokens"] = model.num_registers
    return config


def write(
    flat: Flat, model: VisionTransformer, size: tuple[int, int], path: Path, labels: Sequence[str] | None
) -> Path:
    """jaxvit params (flat, unrolled) -> a ``Dinov2Model`` / ``Dinov2WithRegistersModel`` folder at ``path``."""
    problems = []
    if model.num_classes:
        problems.append(f"num_classes={model.num_classes} (the DINOv2 classifier reads two tokens; use 0)")
    if model.pool != "tok" or not model.class_token:
        problems.append(
            f"pool={model.pool!r}, class_token={model.class_token} (needs 'tok' and a class token)"
        )
    if size[0] != size[1] or to_pair(model.patch_size)[0] != to_pair(model.patch_size)[1]:
        problems.append(f"image size {size} and patch {model.patch_size} (transformers' DINOv2 is square)")
    if problems:
        raise ValueError("format='hf' cannot write this model as a DINOv2 backbone: " + "; ".join(problems))
    check_posemb(model, TARGET)
    flat = dict(flat)
    if model.layer_scale_init is None:  # transformers' DINOv2 always scales; a scale of one is the same
        for i in range(model.depth):
            for name in ("ls1", "ls2"):
                flat[f"encoder/block_{i}/{name}/scale"] = np.ones((model.width,), np.float32)
    rules = SWIGLU_RULES if model.mlp_type == "swiglu" else RULES
    out = layouts.rename_back(layouts.split_attention(flat, model.num_heads, "flat", "heads"), rules, "hf")
    # The files on the Hub carry the (pre-training) mask token; a zero one keeps loaders from reporting it missing.
    out["embeddings.mask_token"] = np.zeros((1, model.width), np.float32)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(_export_config(model, size), f, indent=2)
    files.write_safetensors(out, path / "model.safetensors")
    return path
