"""Hugging Face DINOv3 ViT: ``DINOv3ViTModel`` folders and state dicts.

No position-embedding table: queries and keys of the patch tokens are
rotated by a 2-D rotary embedding (``posemb="rope"``, base ``rope_theta``),
with the class token and registers in front left alone. Attention has no key
bias (``key_bias=False``); jaxvit's fused ``qkv`` gets a zero one, which
computes exactly the same. Any projection or MLP bias a config turns off
is read as zeros the same way. The MLP is plain (``mlp.up_proj`` ->
``mlp.down_proj``) or gated (``gate_proj``, ``up_proj``, ``down_proj``),
which jaxvit packs into one ``fc1`` with the gate first (``mlp_type="swiglu"``).

The pooled output (``pooler_output``) is the final-normed class token:
``num_classes=0, pool="tok"``. Files name blocks ``layer.{i}``; the loaded
module calls them ``model.layer.{i}``: both are read, the first is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxvit.checkpoints import layouts
from jaxvit.checkpoints.checkpoint import Checkpoint, Flat, Preprocessing, grid_from_config
from jaxvit.families.vit.hf import HIDDEN_ACT, HIDDEN_ACT_OF
from jaxvit.model import VisionTransformer, create_model
from jaxvit.safety import files
from jaxvit.sizes import to_pair

NAME = "hf_dinov3"
HAS_SINCOS = False
EXPORT_FORMAT = "hf"
TARGET = "transformers DINOv3ViTModel"
# config.json says these (qkv_bias: query_bias, key_bias and value_bias).
CARRIES = (
    "posemb",
    "rope_theta",
    "activation",
    "qkv_bias",
    "layer_norm_eps",
    "num_registers",
    "layer_scale_init",
    "mlp_type",
)
# The options of a model this writer takes (with any sizes): the family's example, for tests.
EXAMPLE = dict(num_classes=0, posemb="rope", layer_scale_init=0.1)
HF_MODEL_TYPES = ("dinov3_vit",)
# The DINOv3 image processor: the whole image to 224 x 224, bilinear, ImageNet statistics.
PREPROCESSING = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0, "bilinear")

_BLOCK = "layer.{i}"
RULES = tuple(
    layouts.torch_rules("embeddings.patch_embeddings", "patch_embed", "conv")
    + [
        layouts.Rule("embeddings.cls_token", "cls_token/token"),
        layouts.Rule("embeddings.register_tokens", "registers/tokens"),
        layouts.Rule(f"{_BLOCK}.layer_scale1.lambda1", "encoder/block_{i}/ls1/scale"),
        layouts.Rule(f"{_BLOCK}.layer_scale2.lambda1", "encoder/block_{i}/ls2/scale"),
    ]
    + layouts.torch_block_rules(
        _BLOCK,
        {
            "norm1": "norm1",
            "attn/query": "attention.q_proj",
            "attn/key": "attention.k_proj",
            "attn/value": "attention.v_proj",
            "attn/out": "attention.o_proj",
            "norm2": "norm2",
            "mlp/fc1": "mlp.up_proj",
            "mlp/fc2": "mlp.down_proj",
        },
    )
    # a gated MLP's gate and up projections, packed on reading (gate first)
    + layouts.torch_rules(f"{_BLOCK}.mlp.packed_in", "encoder/block_{i}/mlp/fc1", "linear")
    + layouts.torch_rules("norm", "encoder/norm", "ln")
)
GATED_RULES = tuple(r for r in RULES if ".mlp.up_proj." not in r.src)
_IGNORED = ("embeddings.mask_token",)
_LINEARS = (
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.o_proj",
    "mlp.up_proj",
    "mlp.gate_proj",
    "mlp.down_proj",
)


def _with_zero_biases(arrays: Flat) -> Flat:
    """Biases the config turned off (always the key's) as zeros: adding zero changes nothing."""
    out = dict(arrays)
    for key, weight in arrays.items():
        if key.endswith(".weight") and any(f".{name}." in key for name in _LINEARS):
            out.setdefault(key[: -len("weight")] + "bias", np.zeros(weight.shape[0], weight.dtype))
    return out


_GATE = re.compile(r"(layer\.\d+\.mlp)\.gate_proj\.(weight|bias)")


def _pack_gate_and_up(arrays: Flat) -> Flat:
    out = dict(arrays)
    for key in list(arrays):
        match = _GATE.fullmatch(key)
        if match:
            up = f"{match.group(1)}.up_proj.{match.group(2)}"
            out[f"{match.group(1)}.packed_in.{match.group(2)}"] = np.concatenate(
                [out.pop(key), out.pop(up)], axis=0
            )
    return out


def claims(kind: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """A state dict with DINOv3's names (no position table, ``layer.{i}.attention.q_proj``)."""
    return kind == "state_dict" and any(
        k.startswith(("layer.0.attention.q_proj", "model.layer.0.attention.q_proj")) for k in arrays
    )


def read(path: Path, arrays: Flat, config: Mapping[str, Any]) -> Checkpoint:
    """A DINOv3 ViT state dict (and its ``config.json``, if any) -> a ``Checkpoint``."""
    if config and config.get("model_type") not in HF_MODEL_TYPES:
        raise ValueError(
            f"{path}: config.json has model_type={config.get('model_type')!r}, expected 'dinov3_vit'"
        )
    arrays = {(k[len("model.") :] if k.startswith("model.layer.") else k): v for k, v in arrays.items()}
    arrays = {k: v for k, v in arrays.items() if k not in _IGNORED}
    if arrays.get("embeddings.register_tokens", np.zeros((1, 1, 1))).shape[1] == 0:
        del arrays["embeddings.register_tokens"]  # transformers keeps an empty one without registers
    params, unmatched = layouts.rename(_pack_gate_and_up(_with_zero_biases(arrays)), RULES)
    return Checkpoint(
        path=str(path),
        origin=NAME,
        params=params,
        unmatched=unmatched,
        num_prefix_tokens=0,
        num_heads=config.get("num_attention_heads"),
        grid=grid_from_config(config),
        config=dict(config),
    )


def model_from_config(config: Mapping[str, Any], **overrides: Any) -> VisionTransformer:
    """A DINOv3 ViT ``config.json`` dict -> the matching ``VisionTransformer`` (``num_classes=0``)."""
    act = config.get("hidden_act", "gelu")
    gated = bool(config.get("use_gated_mlp", False))
    if gated and act != "silu":
        raise ValueError(f"a gated MLP with hidden_act={act!r} is not supported: jaxvit's SwiGLU uses silu")
    if not gated and act not in HIDDEN_ACT:
        raise ValueError(f"hidden_act={act!r} is not supported: expected one of {sorted(HIDDEN_ACT)}")
    fields = dict(
        num_classes=0,
        width=config.get("hidden_size", 384),
        depth=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 6),
        mlp_dim=config.get("intermediate_size", 1536),
        mlp_type="swiglu" if gated else "mlp",
        patch_size=config.get("patch_size", 16),
        num_channels=config.get("num_channels", 3),
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        activation="gelu" if gated else HIDDEN_ACT[act],
        layer_scale_init=float(config.get("layerscale_value", 1.0)),
        num_registers=int(config.get("num_register_tokens", 0)),
        posemb="rope",
        rope_theta=float(config.get("rope_theta", 100.0)),
        class_token=True,
        pool="tok",
    )
    fields.update(overrides)
    return create_model(None, **fields)


def build_model(ckpt: Checkpoint, **overrides: Any) -> tuple[VisionTransformer, tuple[int, int]] | None:
    """``(model, image_size)`` from the folder's config; None for a bare state dict."""
    if not ckpt.config:
        return None
    return model_from_config(ckpt.config, **overrides), to_pair(ckpt.config.get("image_size", 224))


def exports(model: VisionTransformer) -> bool:
    """Whether ``format="hf"`` writes ``model`` as DINOv3 (it has the rotary position embedding)."""
    return model.posemb == "rope" and model.rel_pos_bias == "none"


def write(
    flat: Flat, model: VisionTransformer, size: tuple[int, int], path: Path, labels: Sequence[str] | None
) -> Path:
    """jaxvit params (flat, unrolled) -> a ``DINOv3ViTModel`` folder at ``path``."""
    if model.posemb != "rope":
        raise ValueError(
            f"format='hf' writes {TARGET}, which is rotary; the model has posemb={model.posemb!r}"
        )
    if model.num_classes or model.pool != "tok" or not model.class_token or model.distill_token:
        raise ValueError(
            "format='hf' writes DINOv3ViTModel, a backbone: it needs num_classes=0, pool='tok', a class token"
            f" and no distillation token; the model has num_classes={model.num_classes}, pool={model.pool!r},"
            f" class_token={model.class_token}, distill_token={model.distill_token}"
        )
    flat = dict(flat)
    if model.layer_scale_init is None:  # DINOv3 always scales; a scale of one is the same
        for i in range(model.depth):
            for name in ("ls1", "ls2"):
                flat[f"encoder/block_{i}/{name}/scale"] = np.ones((model.width,), np.float32)
    swiglu = model.mlp_type == "swiglu"
    out = layouts.rename_back(
        layouts.split_attention(flat, model.num_heads, "flat", "heads"),
        GATED_RULES if swiglu else RULES,
        "hf",
    )
    if swiglu:
        for key in [k for k in out if ".mlp.packed_in." in k]:
            gate, up = np.split(out.pop(key), 2, axis=0)
            out[key.replace(".packed_in.", ".gate_proj.")] = np.ascontiguousarray(gate)
            out[key.replace(".packed_in.", ".up_proj.")] = np.ascontiguousarray(up)
    key_biases = [k for k in out if k.endswith("attention.k_proj.bias")]
    key_bias = any(np.any(out[k]) for k in key_biases)
    if not key_bias:  # DINOv3's default: no key bias (a zero one computes the same)
        for k in key_biases:
            del out[k]
    out["embeddings.mask_token"] = np.zeros((1, 1, model.width), np.float32)
    if not model.num_registers:
        out["embeddings.register_tokens"] = np.zeros((1, 0, model.width), np.float32)
    config = {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "hidden_size": model.width,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "intermediate_size": model.mlp_dim or 4 * model.width,
        "hidden_act": "silu" if swiglu else HIDDEN_ACT_OF[model.config.activation],
        "use_gated_mlp": swiglu,
        "layer_norm_eps": model.layer_norm_eps,
        "layerscale_value": model.layer_scale_init if model.layer_scale_init is not None else 1.0,
        "rope_theta": model.rope_theta,
        "image_size": list(size) if size[0] != size[1] else size[0],
        "patch_size": to_pair(model.patch_size)[0],
        "num_channels": model.num_channels,
        "num_register_tokens": model.num_registers,
        "query_bias": model.qkv_bias,
        "key_bias": key_bias,
        "value_bias": model.qkv_bias,
        "proj_bias": True,
        "mlp_bias": True,
        "drop_path_rate": 0.0,
        "pos_embed_shift": None,
        "pos_embed_jitter": None,
        "pos_embed_rescale": 2.0,
    }
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    files.write_safetensors(out, path / "model.safetensors")
    return path
