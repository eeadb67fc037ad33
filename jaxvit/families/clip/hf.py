"""Hugging Face CLIP image towers: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``.

The tower is a ViT with a LayerNorm before the blocks (``pre_layrnorm`` ->
``pre_norm=True``), a patch embedding without bias, the class token as a
vector and the position embedding as an ``nn.Embedding`` table. It maps onto
jaxvit as follows:

- ``pooler_output`` (``post_layernorm`` of the class token) is jaxvit's
  pooled ``features``, the output of a ``num_classes=0`` model.
- ``image_embeds`` (``visual_projection``, a Linear without bias) is jaxvit's
  classifier with ``head_bias=False`` and ``num_classes=projection_dim``: the
  output of the model built from a ``...WithProjection`` or ``CLIPModel``
  folder.
- ``last_hidden_state`` is the last block's output, *before*
  ``post_layernorm`` (``intermediates/encoder/block_{depth-1}/out``);
  jaxvit's ``encoded`` is ``post_layernorm`` applied to every token, as
  timm's CLIP towers define their final tokens.

A ``CLIPModel`` folder (both towers) loads its image tower; the text tower's
keys are left out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import CLIP_HF, Checkpoint, Flat, grid_from_config, log
from jaxvit.families.vit.hf import HIDDEN_ACT, HIDDEN_ACT_OF, POSEMBS
from jaxvit.model import VisionTransformer, create_model
from jaxvit.safety import files
from jaxvit.sizes import to_pair

NAME = "hf_clip"
HF_MODEL_TYPES = ("clip_vision_model", "clip")
MODEL_TYPES = ("clip_vision_model", "clip")
HAS_SINCOS = False
EXPORT_FORMAT = "hf"
TARGET = "transformers CLIPVisionModel / CLIPVisionModelWithProjection"
# config.json says the activation and epsilon; the tower fixes pre_norm=True, patch_bias=False
# and (for the projection) head_bias=False, which write refuses otherwise.
CARRIES = ("posemb", "activation", "layer_norm_eps", "pre_norm", "patch_bias", "head_bias")
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=8, pre_norm=True, patch_bias=False, head_bias=False)
PREPROCESSING = CLIP_HF
TOWER = "vision_model."
PROJECTION = "visual_projection.weight"
RULES = tuple(
    [
        layouts.Rule("embeddings.class_embedding", "cls_token/token", "token"),
        layouts.Rule("embeddings.patch_embedding.weight", "patch_embed/kernel", "conv"),
        layouts.Rule("embeddings.position_embedding.weight", "pos_embed/embedding", "table"),
    ]
    + layouts.torch_rules("pre_layrnorm", "encoder/norm_pre", "ln")
    + layouts.CLIP_ENCODER_RULES
    + [layouts.Rule(PROJECTION, "head/classifier/kernel", "linear")]
)


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A state dict with CLIP's image-tower names (``[vision_model.]embeddings.class_embedding``)."""
    return kind == "state_dict" and any(
        k in arrays for k in (TOWER + "embeddings.class_embedding", "embeddings.class_embedding")
    )


def vision_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The image tower's config: a ``CLIPModel`` nests it under ``vision_config``."""
    if "vision_config" not in config:
        return dict(config)
    tower = dict(config["vision_config"] or {})
    # the projection belongs to the pair: its size is the outer config's
    tower["projection_dim"] = config.get("projection_dim", 512)
    tower["architectures"] = config.get("architectures")
    return tower


def tower_arrays(arrays: Mapping[str, np.ndarray], path: Path | str) -> Flat:
    """The image tower's arrays without the ``vision_model.`` prefix (the projection kept)."""
    kept, left_out = layouts.image_tower(arrays, keep=(PROJECTION,))
    if left_out:
        log.info("%s: reading the image tower, leaving out %d other entries", path, left_out)
    return kept


def read(path: Path, arrays: Flat, config: Mapping[str, Any]) -> Checkpoint:
    """A CLIP image tower's state dict (and its ``config.json``, if any) -> a ``Checkpoint``."""
    tower = vision_config(config) if config else {}
    params, unmatched = layouts.rename(tower_arrays(arrays, path), RULES)
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=1,
        num_heads=tower.get("num_attention_heads"),
        grid=grid_from_config(tower),
        config=tower,
        # transformers' interpolate_pos_encoding: F.interpolate(mode="bicubic", align_corners=False)
        posemb_resample="bicubic",
        posemb_antialias=False,
    )


def model_from_config(
    config: Mapping[str, Any], with_projection: bool | None = None, **overrides: Any
) -> VisionTransformer:
    """A ``CLIPVisionConfig`` (or ``CLIPConfig``) dict -> the matching ``VisionTransformer``.

    With the projection (``...WithProjection``, ``CLIPModel``, or
    ``with_projection=True``) the output is ``image_embeds``
    (``num_classes=projection_dim``); without it, ``pooler_output``.
    """
    tower = vision_config(config)
    act = tower.get("hidden_act", "quick_gelu")
    if act not in HIDDEN_ACT:
        raise ValueError(f"hidden_act={act!r} is not supported: expected one of {sorted(HIDDEN_ACT)}")
    if with_projection is None:
        architectures = tower.get("architectures") or []
        with_projection = any(a.endswith("WithProjection") or a == "CLIPModel" for a in architectures)
    fields = dict(
        num_classes=tower.get("projection_dim", 512) if with_projection else 0,
        width=tower.get("hidden_size", 768),
        depth=tower.get("num_hidden_layers", 12),
        num_heads=tower.get("num_attention_heads", 12),
        mlp_dim=tower.get("intermediate_size", 3072),
        patch_size=tower.get("patch_size", 32),
        num_channels=tower.get("num_channels", 3),
        layer_norm_eps=tower.get("layer_norm_eps", 1e-5),
        activation=HIDDEN_ACT[act],
        pre_norm=True,
        patch_bias=False,
        head_bias=False,
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
    with_projection = "head/classifier/kernel" in ckpt.params
    model = model_from_config(ckpt.config, with_projection=with_projection, **overrides)
    return model, to_pair(ckpt.config.get("image_size", 224))


def guess_fields(ckpt: Checkpoint) -> dict[str, Any]:
    """What a bare CLIP state dict cannot say: transformers' CLIPVisionConfig defaults."""
    return dict(layer_norm_eps=1e-5, activation="quick_gelu", head_bias=False)


def exports(model: VisionTransformer) -> bool:
    """Whether ``format="hf"`` writes ``model`` as a CLIP tower: CLIP's norm before the blocks
    (and no rotary embedding, which is DINOv3's). One family writer at most takes a model."""
    return model.pre_norm and model.posemb != "rope" and model.rel_pos_bias == "none"


def _check_exportable(model: VisionTransformer, size: tuple[int, int]) -> None:
    wanted = dict(pre_norm=True, patch_bias=False, qkv_bias=True, class_token=True, pool="tok")
    wrong = {k: getattr(model, k) for k, v in wanted.items() if getattr(model, k) != v}
    if model.posemb not in POSEMBS:
        wrong["posemb"] = model.posemb
    if model.num_classes and model.head_bias:
        wrong["head_bias"] = True
    if size[0] != size[1]:
        wrong["image_size"] = size
    if wrong:
        raise ValueError(
            f"format='hf' writes a CLIP tower (the model has pre_norm=True), which needs {wanted},"
            f" posemb in {POSEMBS}, a square image and, with num_classes > 0, head_bias=False (CLIP's"
            " projection has no bias);"
            f" the model has {wrong}"
        )


def export_config(model: VisionTransformer, size: tuple[int, int]) -> dict[str, Any]:
    """The ``CLIPVisionConfig`` of ``model`` at ``size``."""
    return {
        "architectures": ["CLIPVisionModelWithProjection" if model.num_classes else "CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": model.width,
        "intermediate_size": model.mlp_dim or 4 * model.width,
        "projection_dim": model.num_classes or 512,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "num_channels": model.num_channels,
        "image_size": size[0],
        "patch_size": to_pair(model.patch_size)[0],
        "hidden_act": HIDDEN_ACT_OF[model.config.activation],
        "layer_norm_eps": model.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
    }


def write(
    flat: Flat, model: VisionTransformer, size: tuple[int, int], path: Path, labels: Sequence[str] | None
) -> Path:
    """jaxvit params (flat, unrolled) -> a ``CLIPVisionModel[WithProjection]`` folder at ``path``."""
    _check_exportable(model, size)
    if to_pair(model.patch_size)[0] != to_pair(model.patch_size)[1]:
        raise ValueError(f"format='hf' (CLIP) needs a square patch, the model has {model.patch_size}")
    out = layouts.rename_back(layouts.split_attention(flat, model.num_heads, "flat", "heads"), RULES, "CLIP")
    out = {(k if k == PROJECTION else TOWER + k): v for k, v in out.items()}
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(export_config(model, size), f, indent=2)
    files.write_safetensors(out, path / "model.safetensors")
    return path
