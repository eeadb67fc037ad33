"""Near misses: files that one reader almost reads end in a one-line refusal, never in a load.

Each file is made by the peer's own code (timm here), with tiny random weights.
"""

from __future__ import annotations

import pytest
import timm
from safetensors.torch import save_file

import jaxvit

TIMM_TINY = dict(embed_dim=32, depth=1, num_heads=2, num_classes=0)

# timm's Eva models that are not DINOv3, and what the refusal names
EVA_NOT_DINOV3 = {
    "vit_small_patch16_rope_224": "rotary embedding of kind RotaryEmbeddingCat",
    "vit_small_patch16_rope_mixed_224": "rotary embedding of kind RotaryEmbeddingMixed",
    "vit_small_patch16_rope_ape_224": "a position table besides the rotary embedding",
    "vit_betwixt_patch16_rope_reg4_gap_256": "no class token, no registers or an fc_norm",
}


@pytest.mark.parametrize("name", sorted(EVA_NOT_DINOV3))
def test_a_timm_eva_model_that_is_not_dinov3_is_refused(name, tmp_path):
    model = timm.create_model(name, pretrained=False, **TIMM_TINY)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    message = f"a timm Eva model with {EVA_NOT_DINOV3[name]}.*not supported"
    with pytest.raises(ValueError, match=message):
        jaxvit.load_for_inference(path)
    with pytest.raises(ValueError, match=message):
        jaxvit.load_pretrained(path, jaxvit.create_model("mu/16", num_classes=0, posemb="rope"), 32)


def test_a_timm_eva_file_named_by_its_metadata_is_refused_unless_dinov3(tmp_path):
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, **TIMM_TINY)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "named.safetensors"
    save_file(weights, str(path), metadata={"timm_model": "vit_small_patch16_rope_224"})
    with pytest.raises(ValueError, match="timm model 'vit_small_patch16_rope_224': not supported"):
        jaxvit.load_for_inference(path)
    save_file(weights, str(path), metadata={"timm_model": "vit_small_patch16_dinov3"})
    assert jaxvit.load_for_inference(path).model.posemb == "rope"
