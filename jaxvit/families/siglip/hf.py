"""Hugging Face SigLIP image towers: ``SiglipVisionModel`` and the image half of ``SiglipModel``.

The tower is a ViT without class token whose position embedding is an
``nn.Embedding`` table, with a LayerNorm on every token at the end
(``post_layernorm``) and attention pooling (``head``: a probe, a torch
``nn.MultiheadAttention`` with one fused ``in_proj``, a LayerNorm and an
MLP), which is jaxvit's ``pool="map"``. ``last_hidden_state`` is jaxvit's
``encoded`` and ``pooler_output`` its pooled ``features`` (the output of the
``num_classes=0`` model built from the folder). SigLIP 2's fixed-resolution
checkpoints have the same tower.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import SIGLIP_HF, Checkpoint, Flat, grid_from_config, log
from jaxvit.families.vit.hf import HIDDEN_ACT, HIDDEN_ACT_OF, POSEMBS
from jaxvit.model import VisionTransformer, create_model
from jaxvit.safety import files
from jaxvit.sizes import to_pair

NAME = "hf_siglip"
HF_MODEL_TYPES = ("siglip_vision_model", "siglip")
MODEL_TYPES = ("siglip_vision_model", "siglip")
HAS_SINCOS = False
EXPORT_FORMAT = "hf"
TARGET = "transformers SiglipVisionModel"
# config.json says the activation and epsilon; the tower fixes pool="map" and no class token.
CARRIES = ("posemb", "activation", "layer_norm_eps", "class_token", "pool")
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=0, pool="map", class_token=False)
PREPROCESSING = SIGLIP_HF
TOWER = "vision_model."
_IN_PROJ = "head.attention.in_proj_"
_PATCH = "embeddings.patch_embedding.weight"
RULES = tuple(
    layouts.torch_rules("embeddings.patch_embedding", "patch_embed", "conv")
    + [layouts.Rule("embeddings.position_embedding.weight", "pos_embed/embedding", "table")]
    + layouts.CLIP_ENCODER_RULES
    + [layouts.Rule("head.probe", "head/map/probe")]
    + layouts.torch_rules("head.attention.q_proj", "head/map/attn/query", "linear")
    + layouts.torch_rules("head.attention.k_proj", "head/map/attn/key", "linear")
    + layouts.torch_rules("head.attention.v_proj", "head/map/attn/value", "linear")
    + layouts.torch_rules("head.attention.out_proj", "head/map/attn/out", "linear")
    + layouts.torch_rules("head.layernorm", "head/map/norm", "ln")
    + layouts.torch_rules("head.mlp.fc1", "head/map/mlp/fc1", "linear")
    + layouts.torch_rules("head.mlp.fc2", "head/map/mlp/fc2", "linear")
)


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A state dict with SigLIP's image-tower names: a conv patch embedding (SigLIP 2 NaFlex's is a
    ``Linear``) and no class embedding."""
    patch = arrays.get(_PATCH, arrays.get(TOWER + _PATCH))
    cls = any(k in arrays for k in ("embeddings.class_embedding", TOWER + "embeddings.class_embedding"))
    return kind == "state_dict" and patch is not None and np.ndim(patch) == 4 and not cls


def split_in_proj(arrays: Mapping[str, np.ndarray]) -> Flat:
    """torch ``MultiheadAttention``'s fused ``in_proj_weight (3D, D)`` / ``in_proj_bias (3D,)`` -> q, k, v."""
    out = dict(arrays)
    for part in ("weight", "bias"):
        fused = out.pop(_IN_PROJ + part, None)
        if fused is None:
            continue
        if fused.shape[0] % 3:
            raise ValueError(f"{_IN_PROJ}{part} has shape {fused.shape}: its first axis is not 3 x width")
        for name, piece in zip(("q", "k", "v"), np.split(fused, 3, axis=0), strict=True):
            out[f"head.attention.{name}_proj.{part}"] = piece
    return out


def join_in_proj(arrays: Mapping[str, np.ndarray]) -> Flat:
    """The inverse of ``split_in_proj``."""
    out = dict(arrays)
    for part in ("weight", "bias"):
        names = [f"head.attention.{n}_proj.{part}" for n in ("q", "k", "v")]
        if all(n in out for n in names):
            out[_IN_PROJ + part] = np.concatenate([out.pop(n) for n in names], axis=0)
    return out


def vision_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The image tower's config: a ``SiglipModel`` nests it under ``vision_config``."""
    return dict(config.get("vision_config") or {}) if "vision_config" in config else dict(config)


def read(path: Path, arrays: Flat, config: Mapping[str, Any]) -> Checkpoint:
    """A SigLIP image tower's state dict (and its ``config.json``, if any) -> a ``Checkpoint``."""
    tower = vision_config(config) if config else {}
    kept, left_out = layouts.image_tower(arrays)
    if left_out:
        log.info("%s: reading the image tower, leaving out %d other entries", path, left_out)
    params, unmatched = layouts.rename(split_in_proj(kept), RULES)
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=0,
        num_heads=tower.get("num_attention_heads"),
        grid=grid_from_config(tower),
        config=tower,
        # transformers' interpolate_pos_encoding: F.interpolate(mode="bicubic", align_corners=False)
        posemb_resample="bicubic",
        posemb_antialias=False,
    )


def model_from_config(config: Mapping[str, Any], **overrides: Any) -> VisionTransformer:
    """A ``SiglipVisionConfig`` (or ``SiglipConfig``) dict -> the matching ``VisionTransformer``.

    ``num_classes=0``: the output is ``pooler_output``. A tower without its
    head (``vision_use_head=False``) pools by the mean of the tokens, which
    transformers does not compute (its ``pooler_output`` is None).
    """
    tower = vision_config(config)
    act = tower.get("hidden_act", "gelu_pytorch_tanh")
    if act not in HIDDEN_ACT:
        raise ValueError(f"hidden_act={act!r} is not supported: expected one of {sorted(HIDDEN_ACT)}")
    fields = dict(
        num_classes=0,
        width=tower.get("hidden_size", 768),
        depth=tower.get("num_hidden_layers", 12),
        num_heads=tower.get("num_attention_heads", 12),
        mlp_dim=tower.get("intermediate_size", 3072),
        patch_size=tower.get("patch_size", 16),
        num_channels=tower.get("num_channels", 3),
        layer_norm_eps=tower.get("layer_norm_eps", 1e-6),
        activation=HIDDEN_ACT[act],
        class_token=False,
        pool="map" if tower.get("vision_use_head", True) else "gap",
        posemb="learn",
    )
    fields.update(overrides)
    return create_model(None, **fields)


def build_model(ckpt: Checkpoint, **overrides: Any) -> tuple[VisionTransformer, tuple[int, int]] | None:
    """``(model, image_size)`` from the folder's config; None for a bare state dict."""
    if not ckpt.config:
        return None
    return model_from_config(ckpt.config, **overrides), to_pair(ckpt.config.get("image_size", 224))


def guess_fields(ckpt: Checkpoint) -> dict[str, Any]:
    """What a bare SigLIP state dict cannot say: transformers' SiglipVisionConfig defaults."""
    return dict(layer_norm_eps=1e-6, activation="gelu_tanh")


def exports(model: VisionTransformer) -> bool:
    """Whether ``format="hf"`` writes ``model`` as a SigLIP tower: attention pooling, no class token
    (and neither CLIP's norm before the blocks, DINOv3's rotary embedding nor a table of its own
    grid, which SigLIP 2 NaFlex's writer takes)."""
    return (
        model.pool == "map"
        and not model.class_token
        and not model.pre_norm
        and model.posemb != "rope"
        and model.posemb_grid is None
    )


def export_config(model: VisionTransformer, size: tuple[int, int]) -> dict[str, Any]:
    """The ``SiglipVisionConfig`` of ``model`` at ``size``."""
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": model.width,
        "intermediate_size": model.mlp_dim or 4 * model.width,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "num_channels": model.num_channels,
        "image_size": size[0],
        "patch_size": to_pair(model.patch_size)[0],
        "hidden_act": HIDDEN_ACT_OF[model.config.activation],
        "layer_norm_eps": model.layer_norm_eps,
        "attention_dropout": 0.0,
        "vision_use_head": True,
    }


def state_dict(flat: Flat, model: VisionTransformer, size: tuple[int, int]) -> Flat:
    """jaxvit params (flat, unrolled) -> a SigLIP image tower's state dict (``vision_model.`` keys)."""
    wrong = {
        k: getattr(model, k)
        for k, v in dict(
            num_classes=0, pre_norm=False, patch_bias=True, qkv_bias=True, pool="map", class_token=False
        ).items()
        if getattr(model, k) != v
    }
    if model.posemb not in POSEMBS:
        wrong["posemb"] = model.posemb
    if size[0] != size[1] or to_pair(model.patch_size)[0] != to_pair(model.patch_size)[1]:
        wrong["image_size, patch_size"] = (size, model.patch_size)
    if wrong:
        raise ValueError(
            "format='hf' writes a SiglipVisionModel (the model has pool='map' and no class token), which"
            f" has no classifier, biases everywhere, a square image and patch; the model has {wrong}"
        )
    out = layouts.rename_back(layouts.split_attention(flat, model.num_heads, "flat", "flat"), RULES, "SigLIP")
    return {TOWER + k: v for k, v in join_in_proj(out).items()}


def write(
    flat: Flat, model: VisionTransformer, size: tuple[int, int], path: Path, labels: Sequence[str] | None
) -> Path:
    """jaxvit params (flat, unrolled) -> a ``SiglipVisionModel`` folder at ``path``."""
    out = state_dict(flat, model, size)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(export_config(model, size), f, indent=2)
    files.write_safetensors(out, path / "model.safetensors")
    return path
