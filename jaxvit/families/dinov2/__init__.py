"""DINOv2 (Oquab et al. 2023), with and without registers: transformers' ``Dinov2Model`` /
``Dinov2WithRegistersModel`` folders; timm's files are read by the plain ViT's timm format."""

# DINOv2's own sizes: its giant (1536 wide, SwiGLU) is not big_vision's "g" (1408 wide).
SIZES = {
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    # SwiGLU of nominal width 4 * 1536, two thirds of it rounded up to 8: 4096 (swiglu_hidden_size)
    "g": dict(width=1536, depth=40, mlp_dim=4096, num_heads=24, mlp_type="swiglu"),
}

# variant family -> (sizes, options every size has; patch_size is the default)
VARIANTS = {
    "dinov2": (SIZES, dict(patch_size=14, layer_scale_init=1e-5)),
    "dinov2-reg4": (SIZES, dict(patch_size=14, layer_scale_init=1e-5, num_registers=4)),
}
