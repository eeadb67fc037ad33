"""timm ``VisionTransformer`` state dicts (safetensors, or ``.pth``/``.bin`` through PyTorch).

A timm state dict does not say its number of heads nor how its weights were
trained: jaxvit's own exports put the model fields and the matching
``timm.create_model`` kwargs in the safetensors metadata; foreign files get
timm's ImageNet preprocessing and a head count guessed from the width.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.convert import files, layouts
from jaxvit.convert.checkpoint import (
    IMAGENET_TIMM,
    Checkpoint,
    Flat,
    grid_from_config,
    model_fields,
    strip_prefix,
)
from jaxvit.model import resolve_activation, square_grid

NAME = "timm"
HAS_PRE_LOGITS = False
HAS_SINCOS = False
EXPORT_FORMAT = "timm"
PREPROCESSING = IMAGENET_TIMM
RULES = tuple(
    layouts.torch_rules("patch_embed.proj", "patch_embed", "conv")
    + [layouts.Rule("cls_token", "cls_token/token"), layouts.Rule("pos_embed", "pos_embed/embedding")]
    + layouts.torch_block_rules(
        "blocks.{i}",
        {
            "norm1": "norm1",
            "attn/qkv": "attn.qkv",
            "attn/out": "attn.proj",
            "norm2": "norm2",
            "mlp/fc1": "mlp.fc1",
            "mlp/fc2": "mlp.fc2",
        },
    )
    + layouts.torch_rules("norm", "encoder/norm", "ln")
    + layouts.torch_rules("head", "head/classifier", "linear")
    + [layouts.Rule("attn_pool.latent", "head/map/probe")]
    + layouts.torch_rules("attn_pool.q", "head/map/attn/query", "linear")
    + layouts.torch_rules("attn_pool.kv", "head/map/attn/kv", "linear")
    + layouts.torch_rules("attn_pool.proj", "head/map/attn/out", "linear")
    + layouts.torch_rules("attn_pool.norm", "head/map/norm", "ln")
    + layouts.torch_rules("attn_pool.mlp.fc1", "head/map/mlp/fc1", "linear")
    + layouts.torch_rules("attn_pool.mlp.fc2", "head/map/mlp/fc2", "linear")
)


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """Any state dict that the Hugging Face format (earlier in the registry) did not claim."""
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
    config = json.loads(metadata["jaxvit_model"]) if "jaxvit_model" in metadata else {}
    saved = config.get("model", {})
    has_cls = "cls_token/token" in params
    num_prefix = int(has_cls)
    posemb = params.get("pos_embed/embedding")
    if (
        posemb is not None
        and has_cls
        and not square_grid(posemb.shape[1] - 1)
        and square_grid(posemb.shape[1])
    ):
        num_prefix = 0  # timm's no_embed_class: the class token gets no position embedding
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=num_prefix,
        num_heads=saved.get("num_heads"),
        grid=grid_from_config({**saved, **config}),
        config=config,
    )


def timm_kwargs(model: Any, size: tuple[int, int]) -> dict[str, Any]:
    """The ``timm.create_model("vit_...", **kwargs)`` arguments of the same architecture."""
    kwargs: dict[str, Any] = dict(
        img_size=list(size),
        patch_size=model.patch_size,
        in_chans=model.num_channels,
        num_classes=model.num_classes,
        embed_dim=model.width,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=(model.mlp_dim or 4 * model.width) / model.width,
        class_token=model.class_token,
        global_pool={"tok": "token", "gap": "avg", "map": "map"}[model.pool],
        fc_norm=False,
    )
    activation = resolve_activation(model.activation, model.gelu_approximate)
    if activation != "gelu":
        kwargs["act_layer"] = activation  # timm's names are the same
    return kwargs


def write(flat: Flat, model: Any, size: tuple[int, int], path: Path, labels: Sequence[str] | None) -> Path:
    """jaxvit params (flat, unrolled) -> a timm state dict as safetensors at ``path``.

    The metadata holds ``timm_kwargs`` and the jaxvit model fields, image size and labels.
    """
    out = layouts.rename_back(
        layouts.split_attention(flat, model.num_heads, "fused", "flat_kv"), RULES, "timm"
    )
    metadata = {
        "jaxvit_model": json.dumps(
            {"model": model_fields(model), "image_size": list(size), "labels": list(labels or [])}
        ),
        "timm_kwargs": json.dumps(timm_kwargs(model, size)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_safetensors(out, path, metadata)
    return path
