"""Hugging Face BEiT: ``BeitModel`` and ``BeitForImageClassification`` folders.

Both key layouts are read: the Hub's (``encoder.layer.{i}.attention.attention.query``,
``lambda_1``, ``...attention.relative_position_bias.relative_position_bias_table``) and
transformers 5's (``layers.{i}.attention.q_proj``, ``layers.{i}.relative_position_bias...``);
the first is written. BEiT's attention has no key bias (read as a zero one). The config
says the rest: ``use_relative_position_bias`` (a table per block, resized bilinearly for
another grid as transformers' ``BeitRelativePositionBias`` does), ``use_absolute_position_embeddings``
(a learned table, resized bicubically), ``layer_scale_init_value`` (LayerScale when > 0) and
``use_mean_pooling`` (``pool="gap"`` with ``fc_norm``; else the class token after a final
LayerNorm). A shared relative position bias (``use_shared_relative_position_bias``, BEiT's
pre-training: ``encoder.relative_position_bias``, transformers 5's ``shared_position_bias``) is
``rel_pos_bias="shared"``. The masked-image-modeling and segmentation heads are refused.
``embeddings.mask_token``, which only masked pre-training inputs use, is not read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import INCEPTION, Checkpoint, Flat, grid_from_config
from jaxvit.families.vit import hf as hf_vit
from jaxvit.layers.attention import relative_position_index
from jaxvit.model import VisionTransformer
from jaxvit.safety import files, validate
from jaxvit.sizes import to_pair

NAME = "hf_beit"
HAS_SINCOS = False
EXPORT_FORMAT = "hf"
TARGET = "transformers BeitModel / BeitForImageClassification"
CARRIES = (
    "posemb",
    "activation",
    "qkv_bias",
    "layer_norm_eps",
    "layer_scale_init",
    "rel_pos_bias",
    "fc_norm",
    "pool",
)
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=5, rel_pos_bias="block", posemb="none", pool="gap", fc_norm=True)
HF_MODEL_TYPES = ("beit",)
# microsoft/beit-*'s image processor: the whole image to the size, mean = std = 0.5.
PREPROCESSING = INCEPTION
SUPPORTED_ARCHITECTURES = ("BeitModel", "BeitForImageClassification")

_TABLE = "relative_position_bias.relative_position_bias_table"


def _block_extras(src: str, table: str) -> list[layouts.Rule]:
    dst = "encoder/block_{i}"
    return [
        layouts.Rule(f"{src}.lambda_1", f"{dst}/ls1/scale"),
        layouts.Rule(f"{src}.lambda_2", f"{dst}/ls2/scale"),
        layouts.Rule(f"{src}.{table}", f"{dst}/attn/rel_pos_bias/table"),
    ]


# The Hub's names first: what export writes.
RULES = tuple(
    layouts.torch_rules("embeddings.patch_embeddings.projection", "patch_embed", "conv")
    + [
        layouts.Rule("embeddings.cls_token", "cls_token/token"),
        layouts.Rule("embeddings.position_embeddings", "pos_embed/embedding"),
    ]
    + layouts.torch_block_rules("encoder.layer.{i}", hf_vit.HUB_BLOCK)
    + _block_extras("encoder.layer.{i}", f"attention.attention.{_TABLE}")
    + layouts.torch_block_rules("layers.{i}", hf_vit.NEW_BLOCK)
    + _block_extras("layers.{i}", _TABLE)
    + [
        layouts.Rule(f"encoder.{_TABLE}", "encoder/rel_pos_bias/table"),
        layouts.Rule("shared_position_bias.relative_position_bias_table", "encoder/rel_pos_bias/table"),
    ]
    + layouts.torch_rules("layernorm", "encoder/norm", "ln")
    + layouts.torch_rules("pooler.layernorm", "head/fc_norm", "ln")
    + layouts.torch_rules("classifier", "head/classifier", "linear")
)
_QUERY_WEIGHT = re.compile(r"(.*)\.(attention\.attention\.query|attention\.q_proj)\.weight")
_INDEX = re.compile(r".*(relative|shared)_position_bias\.relative_position_index")


def drop_index_buffers(
    path: Path, arrays: Flat, pattern: re.Pattern[str], grid: tuple[int, int] | None, whose: str
) -> Flat:
    """``arrays`` without the index buffers (keys matching ``pattern``) that older files saved beside
    each table; each must be BEiT's own index of ``grid`` (``whose`` grid it is, for the message)."""
    out = dict(arrays)
    for key in [k for k in arrays if pattern.fullmatch(k)]:
        index = out.pop(key)
        if grid is None or not np.array_equal(index, relative_position_index(grid)):
            raise ValueError(f"{path}: {key} {index.shape} is not BEiT's index of {whose} grid {grid}")
    return out


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """Folders only (by ``model_type``)."""
    return False


def _refuse_config(path: Path, config: Mapping[str, Any]) -> None:
    unsupported = set(config.get("architectures") or ["BeitModel"]) - set(SUPPORTED_ARCHITECTURES)
    if unsupported:
        raise ValueError(
            f"{path}: {sorted(unsupported)} is not supported (a head jaxvit does not have); supported BEiT"
            f" architectures: {SUPPORTED_ARCHITECTURES}"
        )
    if config.get("use_shared_relative_position_bias") and config.get("use_relative_position_bias"):
        raise ValueError(
            f"{path}: a shared relative position table and one per block (use_shared_relative_position_bias"
            " and use_relative_position_bias): not supported"
        )


def _with_zero_key_biases(arrays: Flat) -> Flat:
    """BEiT's key has no bias: a zero one computes the same."""
    out = dict(arrays)
    for key, weight in arrays.items():
        match = _QUERY_WEIGHT.fullmatch(key)
        if match:
            key_name = match.group(2).replace("query", "key").replace("q_proj", "k_proj")
            out.setdefault(f"{match.group(1)}.{key_name}.bias", np.zeros(weight.shape[0], weight.dtype))
    return out


def read(path: Path, arrays: Flat, config: Mapping[str, Any]) -> Checkpoint:
    """A BEiT state dict and its ``config.json`` -> a ``Checkpoint``."""
    _refuse_config(path, config)
    arrays = {(k[5:] if k.startswith("beit.") else k): v for k, v in arrays.items()}
    arrays.pop("embeddings.mask_token", None)
    grid = grid_from_config(config)
    arrays = drop_index_buffers(path, arrays, _INDEX, grid, "the config's")
    params, unmatched = layouts.rename(_with_zero_key_biases(arrays), RULES)
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=1,
        num_heads=config.get("num_attention_heads"),
        grid=grid,
        config=dict(config),
        posemb_resample="bicubic",
        posemb_antialias=False,
    )


def model_from_config(config: Mapping[str, Any], *, source: str, **overrides: Any) -> VisionTransformer:
    """A BEiT ``config.json`` dict -> the matching ``VisionTransformer``."""
    mean_pooling = validate.bool_field(config, "use_mean_pooling", source, default=True)
    layer_scale = validate.float_field(config, "layer_scale_init_value", source, default=0.1, lo=0.0)
    relative = validate.bool_field(config, "use_relative_position_bias", source, default=False)
    shared = validate.bool_field(config, "use_shared_relative_position_bias", source, default=False)
    absolute = validate.bool_field(config, "use_absolute_position_embeddings", source, default=False)
    fields: dict[str, Any] = dict(
        posemb="learn" if absolute else "none",
        rel_pos_bias="block" if relative else ("shared" if shared else "none"),
        layer_scale_init=layer_scale if layer_scale > 0 else None,
        pool="gap" if mean_pooling else "tok",
        fc_norm=mean_pooling,
        qkv_bias=True,
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
    )
    vit_config = {**config, "qkv_bias": True}
    return hf_vit.model_from_config(vit_config, source=source, **{**fields, **overrides})


def build_model(ckpt: Checkpoint, **overrides: Any) -> tuple[VisionTransformer, tuple[int, int]]:
    """``(model, image_size)`` from the folder's config."""
    model = model_from_config(ckpt.config, source=f"{ckpt.path}/config.json", **overrides)
    return model, to_pair(ckpt.config.get("image_size", 224))


labels = hf_vit.labels


def exports(model: VisionTransformer) -> bool:
    """Whether ``format="hf"`` writes ``model`` as BEiT: it has the relative position bias."""
    return model.rel_pos_bias != "none"


def export_config(model: VisionTransformer, size: tuple[int, int], labels: Sequence[str] | None) -> dict:
    """The ``config.json`` of a BEiT with ``model``'s architecture at ``size``."""
    config = hf_vit.export_config(model, size, labels)
    if not model.num_classes:
        config.pop("id2label"), config.pop("label2id")
    config.pop("encoder_stride")
    return {
        **config,
        "architectures": ["BeitForImageClassification" if model.num_classes else "BeitModel"],
        "model_type": "beit",
        # a fixed sin-cos embedding is written as the table it is (exporting.export)
        "use_absolute_position_embeddings": model.posemb != "none",
        "use_relative_position_bias": model.rel_pos_bias == "block",
        "use_shared_relative_position_bias": model.rel_pos_bias == "shared",
        "layer_scale_init_value": model.layer_scale_init or 0.0,
        "use_mean_pooling": model.pool == "gap",
        "use_mask_token": False,
        "drop_path_rate": 0.0,
    }


def _check_exportable(flat: Flat, model: VisionTransformer, size: tuple[int, int]) -> None:
    problems = []
    if (model.pool, model.fc_norm) not in (("gap", True), ("tok", False)) or not model.class_token:
        problems.append(
            f"pool={model.pool!r}, fc_norm={model.fc_norm}, class_token={model.class_token} (BEiT pools the"
            " mean with fc_norm or the class token after a final norm)"
        )
    if model.posemb == "rope":
        problems.append("posemb='rope' (BEiT's position table is learned or fixed)")
    if size[0] != size[1]:
        problems.append(f"image size {size} (transformers' BEiT grid is square)")
    if layouts.nonzero_key_biases(flat, model.width):
        problems.append("a non-zero key bias (BEiT's attention has none)")
    if problems:
        raise ValueError(f"format='hf' cannot write this model as {TARGET}: " + "; ".join(problems))


def write(
    flat: Flat, model: VisionTransformer, size: tuple[int, int], path: Path, labels: Sequence[str] | None
) -> Path:
    """jaxvit params (flat, unrolled) -> a ``BeitModel`` / ``BeitForImageClassification`` folder."""
    _check_exportable(flat, model, size)
    flat = dict(flat)
    if not model.qkv_bias:  # BEiT always has query and value biases; zeros compute the same
        for i in range(model.depth):
            flat[f"encoder/block_{i}/attn/qkv/bias"] = np.zeros(3 * model.width, np.float32)
    out = layouts.rename_back(layouts.split_attention(flat, model.num_heads, "flat", "heads"), RULES, "hf")
    out = {k: v for k, v in out.items() if not k.endswith("attention.attention.key.bias")}
    out = {(k if k.startswith("classifier.") else f"beit.{k}"): v for k, v in out.items()}
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(export_config(model, size, labels), f, indent=2)
    files.write_safetensors(out, path / "model.safetensors")
    return path
