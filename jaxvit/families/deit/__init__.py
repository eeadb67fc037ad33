"""DeiT (Touvron et al. 2021) and DeiT III: transformers' ``DeiTModel`` /
``DeiTForImageClassificationWithTeacher`` folders; timm's files are read by the plain ViT's timm format."""

_DEIT = ("Ti", "S", "B")
_DEIT3 = ("S", "M", "B", "L", "H")

# variant family -> (size names from jaxvit.variants.VARIANTS, options every size has; patch_size is the default)
VARIANTS = {
    "deit": (_DEIT, dict(patch_size=16)),
    "deit-distilled": (_DEIT, dict(patch_size=16, distill_token=True)),
    "deit3": (_DEIT3, dict(patch_size=16, layer_scale_init=1e-6)),
}
