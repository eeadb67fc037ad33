"""jaxvit: a Vision Transformer in JAX/Flax linen."""

from jaxvit.exporting import export
from jaxvit.features import intermediate_features
from jaxvit.inference import InferenceBundle, load_for_inference
from jaxvit.model import (
    VARIANTS,
    ClassToken,
    Encoder,
    EncoderBlock,
    Head,
    MAPHead,
    MlpBlock,
    PatchEmbed,
    PositionEmbedding,
    SelfAttention,
    VisionTransformer,
    attention_weights,
    count_params,
    create_model,
    decode_variant,
    drop_path,
    patchify,
    posemb_sincos_2d,
    resample_posemb,
    scan_to_unrolled,
    to_pair,
    unpatchify,
    unrolled_to_scan,
)
from jaxvit.pretrained import load_pretrained

__version__ = "0.1.0"

# The command-line tools load on first use: imported here, ``python -m jaxvit.visualize``
# (or ``jaxvit.summary``) would find its module already loaded and run a second copy.
_LAZY = {
    "attention_rollout": "jaxvit.visualize",
    "plot_curves": "jaxvit.visualize",
    "rollout_map": "jaxvit.visualize",
    "formula_flops": "jaxvit.summary",
    "summarize": "jaxvit.summary",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxvit' has no attribute {name!r}")


__all__ = [
    "VARIANTS",
    "ClassToken",
    "Encoder",
    "EncoderBlock",
    "Head",
    "MAPHead",
    "MlpBlock",
    "PatchEmbed",
    "PositionEmbedding",
    "SelfAttention",
    "VisionTransformer",
    "attention_rollout",
    "attention_weights",
    "count_params",
    "create_model",
    "decode_variant",
    "drop_path",
    "formula_flops",
    "intermediate_features",
    "patchify",
    "plot_curves",
    "posemb_sincos_2d",
    "resample_posemb",
    "rollout_map",
    "scan_to_unrolled",
    "to_pair",
    "summarize",
    "unpatchify",
    "unrolled_to_scan",
    "InferenceBundle",
    "export",
    "load_for_inference",
    "load_pretrained",
]
