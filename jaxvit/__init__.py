"""jaxvit: a Vision Transformer in JAX/Flax linen.

The package, bottom to top (a module imports only from its own level or below):

- ``sizes``, ``variants``, ``ops``, ``compat``, ``safety/``: sizes, variant names,
  the kernels, old spellings, and the checks on untrusted input;
- ``schema``: the model's options, declared once;
- ``layers/``: the small composable layers;
- ``model``, ``features``: ``VisionTransformer`` and what reads its outputs;
- ``checkpoints/`` and ``data/``: checkpoint families and formats; the input pipelines;
- ``training/``: configs, optimizer, the pure train step, the loop, workdirs;
- the commands ``predict``, ``visualize``, ``summary``, ``pack`` (``python -m jaxvit.<name>``).
"""

from jaxvit import compat
from jaxvit.checkpoints.exporting import export
from jaxvit.checkpoints.inference import InferenceBundle, load_for_inference
from jaxvit.checkpoints.pretrained import load_pretrained
from jaxvit.features import intermediate_features
from jaxvit.layers import (
    ClassToken,
    Dense,
    Encoder,
    EncoderBlock,
    Head,
    LayerScale,
    MAPHead,
    MlpBlock,
    PatchEmbed,
    PositionEmbedding,
    RegisterTokens,
    SelfAttention,
    SwiGLUMlp,
    drop_path,
    patchify,
    posemb_sincos_2d,
    resample_patch_embed,
    resample_posemb,
    scan_to_unrolled,
    swiglu_hidden_size,
    unpatchify,
    unrolled_to_scan,
)
from jaxvit.model import VisionTransformer, attention_weights, count_params, create_model, param_shapes
from jaxvit.schema import ViTConfig
from jaxvit.sizes import to_pair
from jaxvit.variants import VARIANTS, decode_variant

__version__ = "0.1.0"

compat.install_moved_modules()

# The command-line tools load on first use: imported here, ``python -m jaxvit.visualize``
# (or ``jaxvit.summary``) would find its module already loaded and run a second copy.
_LAZY = {
    "attention_rollout": "jaxvit.visualize",
    "plot_curves": "jaxvit.training.curves",
    "rollout_map": "jaxvit.visualize",
    "formula_flops": "jaxvit.summary",
    "summarize": "jaxvit.summary",
}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if f"{__name__}.{name}" in compat.MOVED_MODULES:  # jaxvit.pretrained, ...: with a warning
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'jaxvit' has no attribute {name!r}")


__all__ = [
    "VARIANTS",
    "ClassToken",
    "Dense",
    "Encoder",
    "EncoderBlock",
    "Head",
    "InferenceBundle",
    "LayerScale",
    "MAPHead",
    "MlpBlock",
    "PatchEmbed",
    "PositionEmbedding",
    "RegisterTokens",
    "SelfAttention",
    "SwiGLUMlp",
    "ViTConfig",
    "VisionTransformer",
    "attention_rollout",
    "attention_weights",
    "count_params",
    "create_model",
    "decode_variant",
    "drop_path",
    "export",
    "formula_flops",
    "intermediate_features",
    "load_for_inference",
    "load_pretrained",
    "param_shapes",
    "patchify",
    "plot_curves",
    "posemb_sincos_2d",
    "resample_patch_embed",
    "resample_posemb",
    "rollout_map",
    "scan_to_unrolled",
    "summarize",
    "swiglu_hidden_size",
    "to_pair",
    "unpatchify",
    "unrolled_to_scan",
]
