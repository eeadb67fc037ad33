"""timm's ``Eva`` class beyond DINOv3: EVA-01 and EVA02 (Fang et al. 2023; classification and CLIP
towers, EVA02-E's post-norm), Meta's Perception Encoder (``vit_pe_core_*``, ``vit_pe_spatial_*``,
``vit_pe_lang_*``) and the RoPE ViTs (Heo et al. 2024: ``vit_*_rope_*``, axial and mixed; timm's
``vit_*_rope_reg*_gap_256``). Rotary embeddings of timm's ``RotaryEmbeddingCat`` (``rope="axial"``)
and ``RotaryEmbeddingMixed`` (``rope="mixed"``), EVA02's SwiGLU with its sub-LN (``mlp_norm``) and
EVA-CLIP's LayerNorm on the attention output (``attn_out_norm``)."""

# variant family -> (sizes, options every size has): EVA02 as fine-tuned on ImageNet (timm's
# eva02_*_patch14_*): SwiGLU of 8/3 the width (the sub-LN from B on), mean pooling with fc_norm,
# and a rotary embedding stretched to the 16x16 grid of pre-training.
VARIANTS = {
    "eva02": (
        {
            "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=512),
            "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1024),
            "B": dict(width=768, depth=12, num_heads=12, mlp_dim=2048, mlp_norm=True),
            "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=2730, mlp_norm=True),
        },
        dict(
            patch_size=14,
            mlp_type="swiglu",
            rope="axial",
            rope_theta=10_000.0,
            rope_ref_grid=16,
            pool="gap",
            fc_norm=True,
        ),
    )
}

# What the weights of timm's registered Eva models cannot tell, from timm 1.0.31's registry:
# architecture -> (num_heads, fields). DINOv3 is in families/dinov3; the Sapiens2 and LingBot
# models are not here.
_EVA02 = dict(rope="axial", rope_theta=10_000.0, rope_ref_grid=(16, 16), pool="gap")
_EVA02_CLIP = {**_EVA02, "pool": "tok"}
_AXIAL = dict(rope="axial", rope_theta=100.0, rope_xy=True, pool="tok")
_MIXED = dict(rope="mixed", rope_theta=10.0, rope_xy=True, pool="tok")
_REG_GAP = dict(rope="axial", rope_theta=10_000.0, rope_ref_grid=(16, 16), pool="gap")
_EVA01 = dict(rope="none", pool="gap")
# Perception Encoder (Bolya et al. 2025): a rotary embedding on the (x, y) patch indices plus one,
# stretched to the pre-training grid, beside a learned table; LayerNorms of epsilon 1e-5.
# PE-Core pools with attention (8 heads); PE-Spatial and PE-Lang have no final norm at all.
_PE = dict(rope="axial", rope_theta=10_000.0, rope_grid_offset=1.0, rope_xy=True, layer_norm_eps=1e-5)
_PE_CORE = {**_PE, "pool": "map", "pool_heads": 8}
_PE_SPATIAL = {**_PE, "pool": "gap", "fc_norm": False, "final_norm": False, "rope_ref_grid": (32, 32)}
_PE_GIGANTIC = dict(rope_grid_offset=0.0, rope_ref_grid=(32, 32))  # no class token either
TIMM_MODELS = {
    **{
        f"eva02_{size}_patch14_{res}": (heads, _EVA02)
        for size, heads, resolutions in (
            ("tiny", 3, (224, 336)),
            ("small", 6, (224, 336)),
            ("base", 12, (224, 448)),
            ("large", 16, (224, 448)),
        )
        for res in resolutions
    },
    "eva02_base_patch16_clip_224": (12, _EVA02_CLIP),
    "eva02_large_patch14_clip_224": (16, _EVA02_CLIP),
    "eva02_large_patch14_clip_336": (16, _EVA02_CLIP),
    **{f"eva_giant_patch14_{res}": (16, _EVA01) for res in (224, 336, 560)},
    "eva_giant_patch14_clip_224": (16, {**_EVA01, "pool": "tok"}),
    **{
        f"vit_{size}_patch16_rope{kind}_224": (heads, fields)
        for size, heads in (("small", 6), ("base", 12), ("large", 16))
        for kind, fields in (("", _AXIAL), ("_ape", _AXIAL), ("_mixed", _MIXED), ("_mixed_ape", _MIXED))
    },
    "vit_medium_patch16_rope_reg1_gap_256": (8, _REG_GAP),
    "vit_mediumd_patch16_rope_reg1_gap_256": (8, _REG_GAP),
    "vit_betwixt_patch16_rope_reg4_gap_256": (10, _REG_GAP),
    "vit_base_patch16_rope_reg1_gap_256": (12, _REG_GAP),
    "vit_pe_core_tiny_patch16_384": (3, {**_PE_CORE, "rope_ref_grid": (24, 24)}),
    "vit_pe_core_small_patch16_384": (6, {**_PE_CORE, "rope_ref_grid": (24, 24)}),
    "vit_pe_core_base_patch16_224": (12, {**_PE_CORE, "rope_ref_grid": (14, 14)}),
    "vit_pe_core_large_patch14_336": (16, {**_PE_CORE, "rope_ref_grid": (24, 24)}),
    "vit_pe_core_gigantic_patch14_448": (16, {**_PE_CORE, **_PE_GIGANTIC}),
    "vit_pe_spatial_tiny_patch16_512": (3, _PE_SPATIAL),
    "vit_pe_spatial_small_patch16_512": (6, _PE_SPATIAL),
    "vit_pe_spatial_base_patch16_512": (12, _PE_SPATIAL),
    "vit_pe_spatial_large_patch14_448": (16, _PE_SPATIAL),
    "vit_pe_spatial_gigantic_patch14_448": (16, {**_PE_SPATIAL, **_PE_GIGANTIC}),
    "vit_pe_lang_large_patch14_448": (16, _PE_SPATIAL),
    "vit_pe_lang_gigantic_patch14_448": (16, {**_PE_SPATIAL, **_PE_GIGANTIC}),
    # EVA02-E: EVA-CLIP's residual post-norm blocks, its LayerScale argument ignored by timm
    "eva02_enormous_patch14_clip_224": (16, {**_EVA01, "pool": "tok", "post_norm": True}),
}
