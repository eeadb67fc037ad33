"""timm's BEiT (``Beit``: ``beit_*``, ``beitv2_*``) state dicts and hub folders, read and written.

A relative position table per block (``blocks.{i}.attn.relative_position_bias_table``), resized
for another grid as timm's ``checkpoint_filter_fn`` does it, which is BEiT's own fine-tuning
(``resample_rel_pos_bias(..., method="geometric")``); LayerScale ``gamma_1`` / ``gamma_2``;
``q_bias`` and ``v_bias`` with no key bias; mean pooling with ``fc_norm`` or the class token.
timm's BEiT fixes the LayerNorm epsilon (1e-6) and exact GELU. A bare state dict says neither
its head count nor, with ``fc_norm``, its pool: both are asked for. A shared table
(``rel_pos_bias.*``, BEiT's pre-training) is read as ``rel_pos_bias="shared"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts, timm_hub
from jaxvit.checkpoints.checkpoint import Checkpoint, Flat, Preprocessing, grid_from_config, strip_prefix
from jaxvit.families.beit import TIMM_HEADS
from jaxvit.families.beit.hf import drop_index_buffers
from jaxvit.families.vit.timm import saved_config
from jaxvit.layers.attention import square_rel_pos_grid
from jaxvit.safety import validate

NAME = "timm_beit"
# a timm hub folder's weights are read here when they are BEiT's (timm_hub)
READS_TIMM_FOLDERS = True
HAS_SINCOS = False
EXPORT_FORMAT = "timm"
TARGET = "timm Beit"
TIMM_MODEL = "beit_base_patch16_224"
CARRIES = ("posemb", "qkv_bias", "layer_scale_init", "rel_pos_bias", "fc_norm", "pool")
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=5, rel_pos_bias="block", posemb="none", pool="gap", fc_norm=True)
# timm's BEiT configs: shorter side to size / 0.9, center crop, bicubic, mean = std = 0.5.
PREPROCESSING = Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.9, "bicubic")
IMPLIED_FIELDS = dict(layer_norm_eps=1e-6, rel_pos_bias="block")
_TABLE = "relative_position_bias_table"
RULES = tuple(
    layouts.torch_rules("patch_embed.proj", "patch_embed", "conv")
    + [
        layouts.Rule("cls_token", "cls_token/token"),
        layouts.Rule("pos_embed", "pos_embed/embedding"),
        layouts.Rule("blocks.{i}.gamma_1", "encoder/block_{i}/ls1/scale"),
        layouts.Rule("blocks.{i}.gamma_2", "encoder/block_{i}/ls2/scale"),
        layouts.Rule(f"blocks.{{i}}.attn.{_TABLE}", "encoder/block_{i}/attn/rel_pos_bias/table"),
        layouts.Rule(f"rel_pos_bias.{_TABLE}", "encoder/rel_pos_bias/table"),
    ]
    + layouts.TIMM_ENCODER_RULES
    + layouts.torch_rules("fc_norm", "head/fc_norm", "ln")
    + layouts.torch_rules("head", "head/classifier", "linear")
)
# the create_model arguments a timm BEiT folder may state: those jaxvit's export writes
MODEL_ARGS = frozenset(
    "img_size patch_size in_chans num_classes embed_dim depth num_heads mlp_ratio qkv_bias init_values"
    " use_abs_pos_emb use_rel_pos_bias use_shared_rel_pos_bias global_pool use_fc_norm".split()
)
_INDEX = re.compile(r"(blocks\.\d+\.attn|rel_pos_bias)\.relative_position_index")


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A timm state dict with BEiT's relative position tables."""
    return kind == "state_dict" and any(
        k.endswith(_TABLE) and k.startswith(("blocks.", "module.blocks.", "rel_pos_bias.")) for k in arrays
    )


def _stated_by_timm_config(path: Path, params: Flat, config: Mapping[str, Any]) -> dict[str, Any]:
    """What a timm hub folder's ``config.json`` states: heads, pool, input size, labels."""
    where = f"{path.parent / 'config.json'}"
    name, args = timm_hub.known_model_args(config, where, TIMM_HEADS, MODEL_ARGS, "BEiT")
    pool_name = args.get("global_pool", config.get("global_pool", "avg"))
    if pool_name not in ("avg", "token"):
        raise ValueError(f"{where}: timm BEiT with global_pool={pool_name!r}: not supported")
    fc_norm = pool_name == "avg" if args.get("use_fc_norm") is None else bool(args["use_fc_norm"])
    if fc_norm != ("head/fc_norm/scale" in params):
        raise ValueError(f"{where}: global_pool={pool_name!r} and use_fc_norm disagree with the weights")
    timm_hub.check_num_classes(config, params, where)
    heads = validate.int_field(args, "num_heads", where, default=TIMM_HEADS[name], lo=1, hi=4096)
    pool = "gap" if pool_name == "avg" else "tok"
    return dict(
        num_heads=heads,
        size=timm_hub.input_size(config, where),
        config=timm_hub.checkpoint_config(config),
        fields={**IMPLIED_FIELDS, "pool": pool, "fc_norm": fc_norm},
    )


def read(path: Path, arrays: Flat, metadata: Mapping[str, Any]) -> Checkpoint:
    """A timm BEiT state dict (and its metadata, or its hub folder's config) -> a ``Checkpoint``."""
    _, arrays = strip_prefix(arrays, ("module.",))
    shared = f"rel_pos_bias.{_TABLE}" in arrays
    if shared and f"blocks.0.attn.{_TABLE}" in arrays:
        raise ValueError(f"{path}: a shared relative position table and one per block: not supported")
    first = f"rel_pos_bias.{_TABLE}" if shared else f"blocks.0.attn.{_TABLE}"
    table_grid = square_rel_pos_grid(arrays[first].shape[0]) if first in arrays else None
    arrays = layouts.fuse_q_v_biases(drop_index_buffers(path, arrays, _INDEX, table_grid, "the table's"))
    params, unmatched = layouts.rename(arrays, RULES)
    config = saved_config(path, metadata)
    saved = config.get("model", {})
    stated = (
        _stated_by_timm_config(path, params, metadata["timm_config"]) if "timm_config" in metadata else {}
    )
    grid = grid_from_config({**saved, **config}) or table_grid
    kernel = params.get("patch_embed/kernel")
    if stated.get("size") is not None and kernel is not None:
        grid = (stated["size"][0] // kernel.shape[0], stated["size"][1] // kernel.shape[1])
    absolute = "pos_embed/embedding" in params
    unstated = {}
    if not saved and not stated and "head/fc_norm/scale" in params:
        unstated["pool"] = (
            "a bare timm BEiT state dict with fc_norm does not say what it pools: 'gap' (global_pool='avg',"
            " every published BEiT) or 'tok'"
        )
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=1,
        num_heads=stated.get("num_heads", saved.get("num_heads")),
        grid=grid,
        config={**config, **stated.get("config", {})},
        posemb_resample="bicubic",
        posemb_antialias=True,
        rel_pos_resample="geometric",
        # no table in the file: none at all (not a fixed sin-cos one)
        implied_fields={
            **stated.get("fields", IMPLIED_FIELDS),
            "posemb": "learn" if absolute else "none",
            "rel_pos_bias": "shared" if shared else "block",
        },
        unstated=unstated,
    )


def preprocessing(ckpt: Checkpoint) -> Preprocessing:
    """A timm folder's ``pretrained_cfg``, else timm's BEiT default (``PREPROCESSING``)."""
    return timm_hub.folder_preprocessing(ckpt, PREPROCESSING)


def exports(model: Any) -> bool:
    """Whether ``format="timm"`` writes ``model`` as timm's BEiT (it has the relative position bias)."""
    return model.rel_pos_bias != "none"


def timm_kwargs(model: Any, size: tuple[int, int]) -> dict[str, Any]:
    """``timm.create_model(TIMM_MODEL, **kwargs)`` arguments of the same architecture."""
    return dict(
        **timm_hub.size_kwargs(model, size),
        qkv_bias=True,  # zeros for a model without: timm's BEiT without them has no q_bias key
        # timm drops None arguments (the registered 0.1 would stay); 0 turns its LayerScale off
        init_values=model.layer_scale_init if model.layer_scale_init is not None else 0.0,
        use_abs_pos_emb=model.posemb != "none",
        use_rel_pos_bias=model.rel_pos_bias == "block",
        use_shared_rel_pos_bias=model.rel_pos_bias == "shared",
        global_pool="avg" if model.pool == "gap" else "token",
        use_fc_norm=model.fc_norm,
    )


def _check_exportable(flat: Flat, model: Any) -> None:
    problems = []
    if model.pool not in ("gap", "tok") or not model.class_token:
        problems.append(f"pool={model.pool!r} (timm's BEiT pools the mean or the class token)")
    if model.posemb == "rope":
        problems.append("posemb='rope' (timm's BEiT has a learned table or none)")
    if model.layer_scale_init == 0.0:
        problems.append("layer_scale_init=0.0 (timm's BEiT reads init_values=0 as no LayerScale)")
    if layouts.nonzero_key_biases(flat, model.width):
        problems.append("a non-zero key bias (BEiT's attention has none)")
    if problems:
        raise ValueError(f"format='timm' cannot write this model as {TARGET}: " + "; ".join(problems))


def write(flat: Flat, model: Any, size: tuple[int, int], path: Path, labels: Sequence[str] | None) -> Path:
    """jaxvit params (flat, unrolled) -> a timm BEiT state dict as safetensors at ``path``."""
    _check_exportable(flat, model)
    flat = dict(flat)
    if not model.qkv_bias:
        for i in range(model.depth):
            flat[f"encoder/block_{i}/attn/qkv/bias"] = np.zeros(3 * model.width, np.float32)
    out, _ = layouts.split_q_v_biases(layouts.rename_back(flat, RULES, "timm"))
    kwargs = timm_kwargs(model, size)
    return timm_hub.write_state_dict(
        out, path, model, size, labels, timm_model=TIMM_MODEL, timm_class="Beit", timm_kwargs=kwargs
    )
