"""timm's ``Eva`` class beyond DINOv3: EVA-01 and EVA02 (Fang et al. 2023; classification and CLIP
towers) and the RoPE ViTs (Heo et al. 2024: ``vit_*_rope_*``, axial and mixed; timm's
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
# architecture -> (num_heads, fields). Perception Encoder (vit_pe_*), the post-norm
# eva02_enormous and DINOv3 (families/dinov3) are not here.
_EVA02 = dict(rope="axial", rope_theta=10_000.0, rope_ref_grid=(16, 16), pool="gap")
_EVA02_CLIP = {**_EVA02, "pool": "tok"}
_AXIAL = dict(rope="axial", rope_theta=100.0, rope_xy=True, pool="tok")
_MIXED = dict(rope="mixed", rope_theta=10.0, rope_xy=True, pool="tok")
_REG_GAP = dict(rope="axial", rope_theta=10_000.0, rope_ref_grid=(16, 16), pool="gap")
_EVA01 = dict(rope="none", pool="gap")
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
}
