"""The ViT's layers, small and composable: each takes its options as explicit fields.

``patch`` (step 1), ``tokens`` and ``posemb`` (step 2), ``attention``, ``mlp``
and ``encoder`` (step 3), ``head`` (step 4); ``scan`` converts the encoder's
parameters between the scanned and unrolled layouts; ``common`` holds what they
share. ``jaxvit.model.VisionTransformer`` composes them.
"""

from jaxvit.layers.attention import (
    RelativePositionBias,
    SelfAttention,
    relative_position_index,
    resample_rel_pos_bias,
)
from jaxvit.layers.encoder import Encoder, EncoderBlock, drop_path
from jaxvit.layers.head import Head, MAPHead
from jaxvit.layers.mlp import LayerScale, MlpBlock, SwiGLUMlp, swiglu_hidden_size
from jaxvit.layers.patch import Dense, PatchEmbed, patchify, resample_patch_embed, unpatchify
from jaxvit.layers.posemb import (
    PositionEmbedding,
    apply_rope,
    posemb_sincos_2d,
    resample_posemb,
    resize_matrix,
    rope_2d_tables,
    rope_axial_coords,
    rope_axial_tables,
    rope_mixed_tables,
)
from jaxvit.layers.scan import scan_to_unrolled, unrolled_to_scan
from jaxvit.layers.tokens import ClassToken, RegisterTokens

__all__ = [
    "ClassToken",
    "Dense",
    "Encoder",
    "EncoderBlock",
    "Head",
    "LayerScale",
    "MAPHead",
    "MlpBlock",
    "PatchEmbed",
    "PositionEmbedding",
    "RegisterTokens",
    "RelativePositionBias",
    "SelfAttention",
    "SwiGLUMlp",
    "apply_rope",
    "drop_path",
    "patchify",
    "resample_patch_embed",
    "posemb_sincos_2d",
    "relative_position_index",
    "resample_posemb",
    "resample_rel_pos_bias",
    "resize_matrix",
    "rope_2d_tables",
    "rope_axial_coords",
    "rope_axial_tables",
    "rope_mixed_tables",
    "scan_to_unrolled",
    "swiglu_hidden_size",
    "unpatchify",
    "unrolled_to_scan",
]
