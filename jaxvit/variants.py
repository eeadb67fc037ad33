"""Model sizes by name: ``decode_variant("B/16")``, ``decode_variant("dinov2:g/14")``."""

from __future__ import annotations

from typing import Any

from jaxvit import families

# width, depth, mlp_dim, num_heads, as in "How to train your ViT" and big_vision. CLIP's
# towers use the same sizes (ViT-L/14 is "L/14", OpenCLIP's bigG/14 is "G/14").
VARIANTS: dict[str, dict[str, int]] = {
    "mu": dict(width=32, depth=1, mlp_dim=128, num_heads=2),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16),
    "e": dict(width=1792, depth=56, mlp_dim=15360, num_heads=16),
    # SigLIP's shape-optimised sizes ("Getting ViT in Shape").
    "So150m": dict(width=880, depth=18, mlp_dim=2320, num_heads=16),
    "So400m": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
}


# Today's backbone families: "family:size/patch", e.g. "dinov2:g/14". A family's
# sizes live in its own home (jaxvit/families/<family>/__init__.py), so DINOv2's giant
# ("dinov2:g", 1536 wide, SwiGLU) cannot be mistaken for big_vision's "g" (1408 wide); a
# bare size is always big_vision's. Each family also sets the options its checkpoints have.
def _family_variants() -> dict[str, tuple[dict[str, dict[str, Any]], dict[str, Any]]]:
    out = {}
    for name in families.NAMES:
        for variant, (sizes, options) in families.family(name).VARIANTS.items():
            if not isinstance(sizes, dict):  # names of VARIANTS
                sizes = {size: VARIANTS[size] for size in sizes}
            out[variant] = (sizes, options)
    return out


# family: (sizes, fields every size of it has; patch_size is the default patch)
FAMILY_VARIANTS: dict[str, tuple[dict[str, dict[str, Any]], dict[str, Any]]] = _family_variants()


def decode_variant(variant: str) -> dict[str, Any]:
    """``"B/16"`` -> ``dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)``.

    A name without a patch (``"B"``) gives the sizes alone. Non-square patches
    are written ``"B/16x8"``. A family in front (``"dinov2:g/14"``,
    ``"deit-distilled:S"``, see ``FAMILY_VARIANTS``) takes the size from that
    family's table and adds the family's options and default patch.
    """
    family, _, sized = variant.rpartition(":")
    name, _, patch = sized.partition("/")
    if family:
        if family not in FAMILY_VARIANTS or name not in FAMILY_VARIANTS[family][0]:
            known = {f: list(sizes) for f, (sizes, _) in FAMILY_VARIANTS.items()}
            raise ValueError(
                f"unknown variant {variant!r}: family:size must be one of {known}, optionally followed by"
                " /patch, e.g. 'dinov2:g/14'"
            )
        sizes, options = FAMILY_VARIANTS[family]
        config: dict[str, Any] = {**options, **sizes[name]}
    elif name in VARIANTS:
        config = dict(VARIANTS[name])
    else:
        raise ValueError(
            f"unknown variant {variant!r}: the size must be one of {list(VARIANTS)}"
            f" optionally followed by /patch, e.g. 'B/16', or family:size with a family of"
            f" {list(FAMILY_VARIANTS)}, e.g. 'dinov2:g/14'"
        )
    if patch:
        try:
            patch_sizes = tuple(int(s) for s in patch.split("x"))
        except ValueError:
            patch_sizes = ()
        if len(patch_sizes) not in (1, 2) or min(patch_sizes) < 1:
            raise ValueError(
                f"unknown variant {variant!r}: the patch after '/' must be a positive integer"
                " or PxQ, e.g. 'B/16' or 'B/16x8'"
            )
        config["patch_size"] = patch_sizes[0] if len(patch_sizes) == 1 else patch_sizes
    return config
