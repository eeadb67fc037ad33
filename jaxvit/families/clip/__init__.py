"""CLIP's image tower (OpenAI; transformers' ``CLIPVisionModel`` / ``CLIPModel`` folders). Its sizes are
the named sizes (ViT-L/14 is ``"L/14"``, OpenCLIP's bigG/14 is ``"G/14"``)."""

VARIANTS: dict = {}
