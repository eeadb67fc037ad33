"""MAE (He et al. 2021), the masked-autoencoder pre-trained ViT: transformers' ``ViTMAEModel``
folders. Its encoder is a plain ViT whose position embedding is the fixed sin-cos table of
``posemb="sincos2d_mae"``; timm's fine-tuned form (``global_pool="avg"`` and ``fc_norm``) is
read by the plain ViT's timm format."""

# variant family -> (sizes, options every size has): MAE's published sizes (H at patch 14)
VARIANTS = {"mae": (("B", "L", "H"), dict(patch_size=16, posemb="sincos2d_mae", layer_norm_eps=1e-6))}
