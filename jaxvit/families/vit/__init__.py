"""The plain ViT: google-research/vision_transformer and big_vision ``.npz``, transformers' ViT, timm's
``VisionTransformer`` (which also holds timm's DeiT, DINOv2 and CLIP variants).

Its sizes are the named sizes every family starts from (``jaxvit.variants.VARIANTS``).
"""

VARIANTS: dict = {}
