"""BEiT (Bao et al. 2021) and BEiT v2: transformers' ``BeitModel`` / ``BeitForImageClassification``
folders and timm's ``Beit`` (``beit_*``, ``beitv2_*``) state dicts and hub folders. A ViT with a learned relative position bias in every block (``rel_pos_bias="block"``),
LayerScale, no key bias, and mean pooling followed by ``fc_norm``."""

# variant family -> (sizes, options every size has): the fine-tuned BEiT models' form
VARIANTS = {
    "beit": (
        ("B", "L"),
        dict(
            patch_size=16,
            posemb="none",
            rel_pos_bias="block",
            layer_scale_init=0.1,
            pool="gap",
            fc_norm=True,
            layer_norm_eps=1e-12,
        ),
    )
}

# timm's registered BEiT models -> their heads (every one has a table per block, LayerNorm epsilon
# 1e-6, exact GELU; BEiT 3's are another architecture)
TIMM_HEADS = {
    "beit_base_patch16_224": 12,
    "beit_base_patch16_384": 12,
    "beit_large_patch16_224": 16,
    "beit_large_patch16_384": 16,
    "beit_large_patch16_512": 16,
    "beitv2_base_patch16_224": 12,
    "beitv2_large_patch16_224": 16,
}
