"""Every architecture field an export writes reaches the peer, or the export refuses it by name.

The cases are generated from the registry: for each writer (``registry.EXPORTERS``)
a tiny model of its family (the writer's ``EXAMPLE``), and for each non-default value of each
architecture field (``VALUES``) that model with the value set. A pair that is no
valid model, or whose model the registry hands to another writer (a ViT with
registers is DINOv2's), is left out of the list: it is another writer's case.

Each case either

- exports, loads the file with the peer's own code (timm's ``_load_weights`` for
  ``.npz``; ``timm.create_model(timm_model, **timm_kwargs)`` and a strict
  ``load_state_dict`` for ``"timm"``; transformers' ``from_pretrained`` for
  ``"hf"``, with no weight missing) and compares the fp32 features, tokens and
  logits to jaxvit's, or
- expects a ``ValueError`` naming each field that is not in the writer's
  ``CARRIES`` (nor a size every layout states), or the value of a carried field
  that the writer cannot express (``REFUSED_VALUES``), and nothing written.

The weights are random at the scales of jaxvit's init, plus noise everywhere,
so zero-initialised heads, biases and tokens are not zero. The images are
small (``IMAGE_STD``), so that the first LayerNorm sees a variance near its
epsilon and a wrong epsilon shows. The tolerance is below 1e-4 because exact
and tanh GELU differ by only about 1.5e-4 (relative) on these models.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file as load_torch_safetensors
from timm.models.vision_transformer import _load_weights as timm_load_npz

import jaxvit
from jaxvit import schema
from jaxvit.checkpoints import registry
from jaxvit.families.vit import timm as timm_format

REL_TOL = 1e-5  # measured: at most 1.2e-6 where the field is carried
SIZE = 16  # pixels: a 2x2 grid of 8-pixel patches
IMAGE_STD = 0.05
TINY = dict(width=32, depth=1, num_heads=2, patch_size=8, mlp_dim=64)

# (the field, the fields that set it to a non-default value: with what that value needs)
VALUES = [
    ("activation", dict(activation="gelu_tanh")),
    ("activation", dict(activation="quick_gelu")),
    ("gelu_approximate", dict(gelu_approximate=True)),  # the deprecated spelling of gelu_tanh
    ("layer_norm_eps", dict(layer_norm_eps=1e-5)),
    ("qkv_bias", dict(qkv_bias=False)),
    ("patch_bias", dict(patch_bias=False)),
    ("head_bias", dict(head_bias=False)),
    ("pre_norm", dict(pre_norm=True, patch_bias=False)),
    ("num_registers", dict(num_registers=2)),
    ("layer_scale_init", dict(layer_scale_init=0.1)),
    ("mlp_type", dict(mlp_type="swiglu")),
    ("pool", dict(pool="gap")),
    ("pool", dict(pool="map")),
    ("pool", dict(pool="attn_pool")),
    ("pool_queries", dict(pool="attn_pool", pool_queries=3)),  # the pooler's fields count only with it
    ("pool_heads", dict(pool="attn_pool", pool_heads=4)),
    ("pool_width", dict(pool="attn_pool", pool_width=16)),
    ("class_token", dict(class_token=False, pool="gap")),
    ("class_token", dict(class_token=False, pool="map")),
    ("distill_token", dict(distill_token=True)),
    ("representation_size", dict(representation_size=16)),
    ("posemb", dict(posemb="sincos2d")),
    ("posemb", dict(posemb="sincos2d_mae")),
    ("fc_norm", dict(fc_norm=True)),
    ("fc_norm", dict(fc_norm=True, pool="gap")),
    ("rel_pos_bias", dict(rel_pos_bias="block")),
    ("rel_pos_bias", dict(rel_pos_bias="shared")),
    ("posemb", dict(posemb="rope")),
    ("posemb", dict(posemb="none")),
    ("rope_theta", dict(rope_theta=50.0)),  # counts only with a rotary embedding
    ("rope", dict(rope="axial")),
    ("rope", dict(rope="mixed", posemb="none")),
    ("rope_ref_grid", dict(rope="axial", rope_ref_grid=4)),  # the rope_ fields count only with rope
    ("rope_grid_offset", dict(rope="axial", rope_grid_offset=1.0)),
    ("rope_xy", dict(rope="axial", rope_xy=True)),
    ("mlp_norm", dict(mlp_norm=True)),
    ("mlp_norm", dict(mlp_norm=True, mlp_type="swiglu")),
    ("attn_out_norm", dict(attn_out_norm=True)),
    ("pool_heads", dict(pool="map", pool_heads=4)),
    ("pool_mlp_dim", dict(pool="map", pool_mlp_dim=48)),
    ("final_norm", dict(final_norm=False)),
    ("final_norm", dict(final_norm=False, pool="gap")),
    ("post_norm", dict(post_norm=True)),
    ("posemb_grid", dict(posemb_grid=3)),
]

# Values of a carried field that a writer refuses by name: its layout has the field, not the value.
REFUSED_VALUES = {
    ("posemb", "rope"): {"vt", "hf_clip", "hf_siglip", "hf_beit", "timm_beit"},
    ("posemb", "none"): {"vt", "hf", "hf_deit", "hf_dinov2", "hf_clip", "hf_siglip", "hf_siglip2"},
    ("pool", "attn_pool"): {"vt", "timm", "hf_beit", "timm_beit"},
    ("pool", "map"): {"hf_beit", "timm_beit"},
    ("layer_norm_eps", 1e-5): {"timm_eva"},  # written as PE, whose reference grid stays
    ("posemb", "sincos2d"): {"timm_eva"},
    ("posemb", "sincos2d_mae"): {"timm_eva"},
}


def _writers():
    return [(fmt, writer) for fmt, writers in registry.EXPORTERS.items() for writer in writers]


def _model(fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # gelu_approximate
        model = jaxvit.create_model(None, **{**TINY, **fields})
        model.check_config()
    return model


def _cases():
    cases = []
    for fmt, writer in _writers():
        family = writer.EXAMPLE
        for field, setting in VALUES:
            fields = {**family, **setting}
            if fields == family:
                continue  # the family has the value already
            try:
                model = _model(fields)
            except ValueError:
                continue  # no such model (a distillation token with attention pooling, ...)
            if registry.exporter(fmt, model) is not writer:
                continue  # another writer's family
            label = ",".join(f"{k}={v}" for k, v in setting.items())
            cases.append(pytest.param(writer.NAME, field, fields, id=f"{writer.NAME}-{label}"))
    return cases


CASES = _cases()


def off_default(model) -> dict:
    """The architecture fields that change what ``model`` computes and are not at their defaults."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fields = schema.differs_from_default(model)
    if model.posemb != "rope" and model.rope == "none":
        fields.pop("rope_theta", None)  # no rotary embedding: the base does nothing
    if not model.num_classes:
        fields.pop("head_bias", None)  # no classifier to have a bias
    return fields


# -- the peers, each loading the file with its own code --------------------------------------------


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous()


def _timm_outputs(peer, x: np.ndarray) -> dict:
    tokens = peer.forward_features(_nchw(x))
    out = {"tokens": tokens, "features": peer.forward_head(tokens, pre_logits=True)}
    if peer.num_classes:
        out["logits"] = peer.forward_head(tokens)
    return out


def run_timm(path, model, x) -> dict:
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    peer = timm.create_model(meta["timm_model"], pretrained=False, **json.loads(meta["timm_kwargs"])).eval()
    peer.load_state_dict(load_torch_safetensors(path), strict=True)
    return _timm_outputs(peer, x)


def run_npz(path, model, x) -> dict:
    """timm's reader of Google's ``.npz`` files, into the timm ViT with the model's architecture."""
    kwargs = timm_format.timm_kwargs(model, (SIZE, SIZE))
    if model.representation_size:  # timm has no pre_logits layer: the file's is applied below
        kwargs["num_classes"] = 0
    name = timm_format.timm_model_of(model)
    peer = timm.create_model(name, pretrained=False, **kwargs).eval()
    timm_load_npz(peer, str(path))
    out = _timm_outputs(peer, x)
    if model.representation_size:
        w = np.load(path)
        pre_logits, head = (torch.from_numpy(w[f"{n}/kernel"]) for n in ("pre_logits", "head"))
        out["features"] = torch.tanh(out["features"] @ pre_logits + torch.from_numpy(w["pre_logits/bias"]))
        out["logits"] = out["features"] @ head + torch.from_numpy(w["head/bias"])
    return out


def run_hf(path, model, x) -> dict:
    """The class ``config.json`` names, from ``from_pretrained`` (every weight from the file); DeiT's
    features as timm pools them."""
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    peer, info = getattr(transformers, arch).from_pretrained(path, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    peer.eval()
    px = _nchw(x)
    if arch.startswith("CLIP"):
        tower = peer.vision_model(pixel_values=px)
        out = {"features": tower.pooler_output}  # last_hidden_state is before post_layernorm
        if arch.endswith("WithProjection"):
            out["logits"] = peer(pixel_values=px).image_embeds
    elif arch == "ViTMAEModel":  # every token, in order: no masking, no shuffle
        noise = torch.arange(x.shape[1] * x.shape[2] // model.patch_size**2, dtype=torch.float32)
        tokens = peer(px, noise=noise[None].repeat(len(x), 1)).last_hidden_state
        out = {"tokens": tokens, "features": tokens[:, 0]}
    elif arch.startswith("Beit"):
        backbone = getattr(peer, "beit", peer)
        result = backbone(px)
        out = {"tokens": result.last_hidden_state, "features": result.pooler_output}
        if backbone is not peer:
            out["logits"] = peer(px).logits
    elif arch.startswith(("ViT", "DeiT")):
        backbone = getattr(peer, "vit", None) or getattr(peer, "deit", None) or peer
        tokens = backbone(px).last_hidden_state
        out = {"tokens": tokens, "features": tokens[:, : 1 + model.distill_token].mean(1)}
        if backbone is not peer:
            out["logits"] = peer(px).logits
    elif arch.startswith("Siglip2"):  # NaFlex: the image as one patch sequence of its whole grid
        grid = (x.shape[1] // model.patch_size, x.shape[2] // model.patch_size)
        patches = np.array(jaxvit.patchify(jnp.asarray(x), model.patch_size))
        result = peer(
            pixel_values=torch.from_numpy(patches),
            pixel_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long),
            spatial_shapes=torch.tensor([grid] * len(x)),
        )
        out = {"tokens": result.last_hidden_state, "features": result.pooler_output}
    else:
        result = peer(pixel_values=px)
        out = {"tokens": result.last_hidden_state, "features": result.pooler_output}
    return out


PEERS = {"npz": ("out.npz", run_npz), "timm": ("out.safetensors", run_timm), "hf": ("out", run_hf)}


# -- the cases --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return (IMAGE_STD * rng.normal(size=(2, SIZE, SIZE, 3))).astype(np.float32)


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    """A writer (by ``NAME``) and a folder for its files: one per writer, so its cases run together."""
    [(fmt, writer)] = [(f, w) for f, w in _writers() if w.NAME == request.param]
    return fmt, writer, tmp_path_factory.mktemp(writer.NAME)


def _shapes(model, x: np.ndarray) -> dict:
    return jax.eval_shape(lambda v: model.init(jax.random.key(0), v), jnp.asarray(x[:1]))["params"]


def _zeros(model, x: np.ndarray) -> dict:
    """Params of the right shapes, for an export that is to be refused."""
    return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), _shapes(model, x))


def _params(model, x: np.ndarray, seed: int) -> dict:
    """Random params at the scales of jaxvit's init (LeCun kernels, unit LayerNorm scales), plus noise
    everywhere: no zero head, bias or token hides a weight the export leaves out."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        noise = 0.05 * rng.normal(size=shape)
        if name == "kernel":
            return rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])) + noise
        return noise + (name == "scale")  # LayerNorm and LayerScale scales around one

    params = jax.tree_util.tree_map_with_path(draw, _shapes(model, x))
    dinov3 = model.posemb == "rope" and registry.exporter("timm", model).NAME == "timm_dinov3"
    if dinov3 or model.rel_pos_bias != "none":
        for i in range(model.depth):  # timm's DINOv3 and BEiT have no key bias (jaxvit's init is zero)
            bias = params["encoder"][f"block_{i}"]["attn"]["qkv"].get("bias")
            if bias is not None:
                bias[model.width : 2 * model.width] = 0.0
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)


def _ours(model, params, x: np.ndarray) -> dict:
    logits, state = model.apply({"params": params}, jnp.asarray(x), mutable=["intermediates"])
    out = {
        "tokens": state["intermediates"]["encoded"][0],
        "features": state["intermediates"]["head"]["features"][0],
    }
    if model.num_classes:
        out["logits"] = logits
    return out


def _expected_refusal(writer, field: str, model) -> tuple[list[str], bool]:
    """What the ``ValueError`` must name (nothing: no refusal), and whether the writer itself refuses.

    A field the writer does not carry is named as ``field=value``, with the others, before the
    params are read; a value of a carried field that the writer cannot express, by the writer.
    """
    left_out = {n: v for n, v in off_default(model).items() if n not in registry.carries(writer)}
    if left_out:
        named = [f"{n}={v!r}" for n, v in left_out.items()]
        return [f"writes {writer.TARGET}, which cannot express", *named], False
    for name in (field, *off_default(model)):  # the case's field first, then any other it sets
        value = getattr(model, name)
        if writer.NAME in REFUSED_VALUES.get((name, value), ()):
            return [name, repr(value)], True
    return [], False


@pytest.mark.filterwarnings("ignore:gelu_approximate is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("family", "field", "fields"), CASES, indirect=["family"])
def test_a_field_reaches_the_peer_or_is_refused_by_name(family, images, field, fields, request):
    fmt, writer, folder = family
    name = writer.NAME
    model, x = _model(fields), images
    filename, run_peer = PEERS[fmt]
    path = folder / request.node.callspec.id / filename
    expected, by_writer = _expected_refusal(writer, field, model)
    if expected:
        params = (
            _zeros(model, x) if by_writer else {}
        )  # a field not carried: refused before the params are read
        with pytest.raises(ValueError) as refused:
            jaxvit.export(params, path, fmt, model=model, image_size=SIZE)
        message = str(refused.value)
        assert all(part in message for part in expected), (expected, message)
        assert "\n" not in message and not path.exists()
        return
    params = _params(model, x, seed=len(request.node.name))
    jaxvit.export(params, path, fmt, model=model, image_size=SIZE)
    with torch.no_grad():
        theirs = run_peer(path, model, x)
    ours = _ours(model, params, x)
    for what, value in theirs.items():
        a, b = np.asarray(ours[what], np.float64), np.asarray(value, np.float64)
        assert a.shape == b.shape, (what, a.shape, b.shape)
        rel = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        assert rel < REL_TOL, f"{name} {field}: {what} differs from the peer's by {rel:.2e} (relative)"


# -- what the cases rely on -------------------------------------------------------------------------


def test_every_writer_declares_what_it_carries():
    architecture = set(schema.names("architecture"))
    assert set(registry.ALWAYS_CARRIED) <= architecture
    for _, writer in _writers():
        assert isinstance(writer.TARGET, str) and writer.TARGET, writer.NAME
        assert set(writer.CARRIES) <= architecture - set(registry.ALWAYS_CARRIED), writer.NAME


def test_every_field_and_writer_is_tried():
    tried = {field for field, _ in VALUES}
    assert set(schema.names("architecture")) - set(registry.ALWAYS_CARRIED) <= tried
    for fmt, writer in _writers():
        assert registry.exporter(fmt, _model(writer.EXAMPLE)) is writer, writer.NAME
    names = {case.values[0] for case in CASES}
    assert names == {w.NAME for _, w in _writers()}
