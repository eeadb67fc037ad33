"""DINOv3 (Siméoni et al. 2025): transformers' ``DINOv3ViTModel`` folders and timm's DINOv3 ``Eva`` files."""

from jaxvit.families.dinov2 import SIZES as _DINOV2_SIZES

# variant family -> (sizes, options every size has; patch_size is the default)
VARIANTS = {
    "dinov3": (
        {name: _DINOV2_SIZES[name] for name in ("S", "B", "L")},
        dict(patch_size=16, layer_scale_init=1e-5, num_registers=4, posemb="rope", layer_norm_eps=1e-5),
    ),
}
