"""SigLIP's image tower (transformers' ``SiglipVisionModel`` / ``SiglipModel`` folders; big_vision's
``.npz`` is read by the plain ViT's big_vision format). Its sizes include the shape-optimised
``So150m`` and ``So400m`` of ``jaxvit.variants.VARIANTS``."""

VARIANTS: dict = {}
