"""DINOv3 (Siméoni et al. 2025): transformers' ``DINOv3ViTModel`` folders and timm's DINOv3 ``Eva`` files."""

from jaxvit.families.dinov2 import SIZES as _DINOV2_SIZES

# variant family -> (sizes, options every size has; patch_size is the default)
VARIANTS = {
    "dinov3": (
        {name: _DINOV2_SIZES[name] for name in ("S", "B", "L")},
        dict(patch_size=16, layer_scale_init=1e-5, num_registers=4, posemb="rope", layer_norm_eps=1e-5),
    ),
}

# timm's DINOv3 models (Eva, RotaryEmbeddingDinoV3, LayerNorm epsilon 1e-5) -> num_heads, from
# timm 1.0.31's registry; the 7B model is not among them (jaxvit has not been checked on it).
TIMM_HEADS = {
    f"vit_{size}_patch16_dinov3{suffix}": heads
    for size, heads in (
        ("tiny", 3),
        ("small", 6),
        ("small_plus", 6),
        ("base", 12),
        ("large", 16),
        ("huge_plus", 20),
    )
    for suffix in ("", "_qkvb")
}
