"""BEiT (Bao et al. 2021) and BEiT v2: transformers' ``BeitModel`` / ``BeitForImageClassification``
folders. A ViT with a learned relative position bias in every block (``rel_pos_bias="block"``),
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
