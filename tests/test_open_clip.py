"""open_clip image towers (``jaxvit.families.clip.open_clip``) against open_clip itself.

Each tower is a tiny random open_clip model made from a config dict, every parameter then moved
by 0.1 * N(0, 1) (LayerNorms too) so that no default hides a mistake, and saved as the hub's
folders are: ``open_clip_config.json`` + ``open_clip_model.safetensors``. jaxvit's
``load_for_inference(folder)`` is compared with ``encode_image`` in fp32 at the tower's own size
and at others, where open_clip itself resizes the position embedding: ``create_model(...,
force_image_size=...)`` runs ``resize_pos_embed`` while loading (OpenAI layout) or timm's
``set_input_size`` after it (timm trunks). open_clip builds a timm trunk by its registered name
only, so the trunk cases swap the registered builder for one that calls the real one with tiny
sizes: heads, activation, epsilon and pooling stay the registered model's. ``MEASURED`` is
printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")
from safetensors.torch import load_file, save_file  # noqa: E402
from timm.models import _registry  # noqa: E402

import jaxvit  # noqa: E402
from jaxvit.families.clip import open_clip as reader  # noqa: E402
from jaxvit.families.vit import TIMM_ARCHITECTURES  # noqa: E402

# well under the 1e-4 asked: exact GELU read as its tanh form moves these outputs by ~3e-5
RTOL = 1e-5
TEXT = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
COCA_TEXT = dict(TEXT, embed_cls=True, output_tokens=True)  # as open_clip's coca_* configs
MEASURED: list[tuple[str, int, float]] = []
CASES = {
    # OpenAI's own towers: QuickGELU, everything else at open_clip's defaults
    "openai_quickgelu": dict(
        embed_dim=24,
        quick_gelu=True,
        vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
    ),
    # exact GELU, with the settings a LAION/DataComp-style config may add
    "openai_gelu": dict(
        embed_dim=16,
        vision_cfg=dict(
            image_size=32,
            layers=2,
            width=48,
            head_width=16,
            patch_size=8,
            mlp_ratio=3.0,
            ls_init_value=0.1,
            no_ln_pre=True,
            pool_type="avg",
            norm_kwargs={"eps": 1e-6},
            patch_dropout=0.5,
        ),
    ),
    # CoCa: the attentional pooler over the un-normed tokens, at embed_dim, narrower than the tower
    # (torch then keeps q, k, v apart), the multimodal decoder beside it
    "coca": dict(
        embed_dim=32,
        custom_text=True,
        text_cfg=COCA_TEXT,
        multimodal_cfg=TEXT,
        vision_cfg=dict(
            image_size=32,
            layers=2,
            width=48,
            head_width=16,
            patch_size=8,
            attentional_pool=True,
            attn_pooler_queries=4,
            attn_pooler_heads=2,
            output_tokens=True,
        ),
    ),
    # the pooler as wide as the tower: torch stacks q, k, v in one in_proj_weight
    "coca_stacked": dict(
        embed_dim=32,
        custom_text=True,
        text_cfg=COCA_TEXT,
        multimodal_cfg=TEXT,
        vision_cfg=dict(
            image_size=32,
            layers=2,
            width=32,
            head_width=16,
            patch_size=8,
            attentional_pool=True,
            attn_pooler_queries=3,
            attn_pooler_heads=4,
            output_tokens=True,
        ),
    ),
    # SigLIP 2: a timm trunk without class token, attention-pooled, tanh GELU, no projection
    "siglip_trunk": dict(
        embed_dim=48,
        custom_text=True,
        vision_cfg=dict(
            image_size=32, timm_model_name="vit_base_patch32_siglip_256", timm_pool="map", timm_proj="none"
        ),
    ),
    # MobileCLIP 2: timm's CLIP ViT (class token, norm_pre, eps 1e-5) with its own head as projection
    "clip_trunk": dict(
        embed_dim=24,
        custom_text=True,
        vision_cfg=dict(
            image_size=32, timm_model_name="vit_large_patch14_clip_224", timm_pool="token", timm_proj=None
        ),
    ),
}
SIZES = {
    "openai_quickgelu": (32, 48, 24),
    "openai_gelu": (32, 48),
    "coca": (32, 48),
    "coca_stacked": (32, 24),
    "siglip_trunk": (32, 48),
    "clip_trunk": (32, 24),
}
# the sizes the trunk cases swap in (width 48/64 keeps the registered head counts, 12 and 16)
TINY_TRUNKS = {
    "vit_base_patch32_siglip_256": dict(embed_dim=48, depth=2, patch_size=8, img_size=32, mlp_ratio=2.0),
    "vit_large_patch14_clip_224": dict(embed_dim=64, depth=2, patch_size=8, img_size=32, mlp_ratio=2.0),
}
PREPROCESS = {
    "siglip_trunk": dict(mean=[0.5] * 3, std=[0.5] * 3, interpolation="bicubic", resize_mode="squash")
}


@contextlib.contextmanager
def tiny_timm(name: str):
    """timm's registered ``name``, built at ``TINY_TRUNKS[name]``'s sizes while the block runs."""
    real = _registry._model_entrypoints[name]
    _registry._model_entrypoints[name] = lambda pretrained=False, **kw: real(
        pretrained=False, **{**kw, **TINY_TRUNKS[name]}
    )
    try:
        yield
    finally:
        _registry._model_entrypoints[name] = real


def write_folder(folder: Path, model_cfg: dict, preprocess_cfg: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": {"text_cfg": TEXT, **model_cfg}, "preprocess_cfg": preprocess_cfg or {}}
    (folder / reader.FOLDER_CONFIG).write_text(json.dumps(config))
    return folder


def images(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)


def encode(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        # CoCa normalises by default, CLIP does not
        x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        return model.encode_image(x, normalize=False).numpy()


def make_case(root: Path, name: str) -> dict:
    """The folder of case ``name`` and open_clip's ``encode_image`` of random images at each size."""
    folder = write_folder(root / name, CASES[name], PREPROCESS.get(name))
    timm_name = CASES[name]["vision_cfg"].get("timm_model_name")
    with tiny_timm(timm_name) if timm_name else contextlib.nullcontext():
        model = open_clip.create_model(f"local-dir:{folder}")
        gen = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))
        expected = {}
        for i, size in enumerate(SIZES[name]):
            peer = model if i == 0 else open_clip.create_model(f"local-dir:{folder}", force_image_size=size)
            x = images(size, seed=i)
            expected[size] = (x, encode(peer.eval(), x))
    return dict(folder=folder, expected=expected)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("open_clip")
    return {name: make_case(root, name) for name in CASES}


def relative_error(mine: np.ndarray, ref: np.ndarray) -> float:
    assert mine.shape == ref.shape
    return float(np.max(np.abs(mine - ref)) / np.max(np.abs(ref)))


def run(bundle, x: np.ndarray) -> np.ndarray:
    return np.asarray(bundle.model.apply({"params": bundle.params}, x))


@pytest.mark.parametrize("name, size", [(n, s) for n in CASES for s in SIZES[n]])
def test_encode_image_matches_open_clip(cases, name, size):
    case = cases[name]
    x, expected = case["expected"][size]
    bundle = jaxvit.load_for_inference(case["folder"], image_size=size)
    assert bundle.origin == "open_clip"
    error = relative_error(run(bundle, x), expected)
    MEASURED.append((name, size, error))
    assert error < RTOL, (name, size, error)


def test_the_models_state_what_the_configs_say(cases):
    models = {n: jaxvit.load_for_inference(cases[n]["folder"]).model for n in CASES}
    assert (models["openai_quickgelu"].activation, models["openai_quickgelu"].num_heads) == ("quick_gelu", 2)
    gelu = models["openai_gelu"]
    assert (gelu.activation, gelu.pool, gelu.pre_norm, gelu.layer_norm_eps) == ("gelu", "gap", False, 1e-6)
    assert (gelu.mlp_dim, gelu.layer_scale_init, gelu.num_classes, gelu.head_bias) == (144, 0.1, 16, False)
    siglip = models["siglip_trunk"]
    assert (siglip.activation, siglip.num_heads, siglip.pool, siglip.class_token) == (
        "gelu_tanh",
        12,
        "map",
        False,
    )
    assert siglip.num_classes == 0
    clip = models["clip_trunk"]
    assert (clip.pre_norm, clip.patch_bias, clip.layer_norm_eps, clip.head_bias) == (True, False, 1e-5, True)
    coca = models["coca"]
    assert (coca.pool, coca.pool_queries, coca.pool_heads, coca.pool_width) == ("attn_pool", 4, 2, 32)
    assert (coca.width, coca.num_heads, coca.num_classes, coca.head_bias) == (48, 3, 32, False)
    assert models["coca_stacked"].pool_heads == 4


def test_preprocessing_comes_from_preprocess_cfg(cases):
    siglip = jaxvit.load_for_inference(cases["siglip_trunk"]["folder"])
    assert (siglip.mean, siglip.std, siglip.center_crop, siglip.crop_pct) == (
        (0.5,) * 3,
        (0.5,) * 3,
        False,
        1.0,
    )
    openai = jaxvit.load_for_inference(cases["openai_quickgelu"]["folder"])
    assert (openai.mean, openai.interpolation, openai.center_crop) == (
        reader.PREPROCESSING.mean,
        "bicubic",
        True,
    )


def test_a_bare_file_needs_its_activation(cases, tmp_path):
    bare = tmp_path / "open_clip_model.safetensors"
    bare.write_bytes((cases["openai_quickgelu"]["folder"] / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"does not say its activation .*: pass activation=\.\.\.$") as info:
        jaxvit.load_for_inference(bare)
    assert "\n" not in str(info.value)
    # width 32 is no open_clip config's, so its head count is not known either
    with pytest.raises(ValueError, match=r"pass num_heads=\.\.\."):
        jaxvit.load_for_inference(bare, activation="quick_gelu")
    x, expected = cases["openai_quickgelu"]["expected"][32]
    bundle = jaxvit.load_for_inference(bare, activation="quick_gelu", num_heads=2)
    error = relative_error(run(bundle, x), expected)
    MEASURED.append(("openai_quickgelu bare", 32, error))
    assert error < RTOL


def test_a_folder_with_pytorch_weights_reads_the_same(cases, tmp_path):
    source = cases["openai_quickgelu"]["folder"]
    (tmp_path / reader.FOLDER_CONFIG).write_bytes((source / reader.FOLDER_CONFIG).read_bytes())
    torch.save(
        load_file(str(source / "open_clip_model.safetensors")), tmp_path / "open_clip_pytorch_model.bin"
    )
    x, expected = cases["openai_quickgelu"]["expected"][32]
    assert relative_error(run(jaxvit.load_for_inference(tmp_path), x), expected) < RTOL


def test_a_bare_coca_tower_is_refused(cases, tmp_path):
    bare = tmp_path / "open_clip_model.safetensors"
    bare.write_bytes((cases["coca"]["folder"] / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="attentional pooler .* does not say the pooler's heads") as info:
        jaxvit.load_for_inference(bare, activation="gelu")
    assert "\n" not in str(info.value)


def test_a_bare_timm_trunk_is_refused(cases, tmp_path):
    bare = tmp_path / "open_clip_model.safetensors"
    bare.write_bytes((cases["siglip_trunk"]["folder"] / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not name its timm model"):
        jaxvit.load_for_inference(bare)


REFUSED = {
    "pe_trunk": ({"timm_model_name": "vit_pe_core_base_patch16_224", "timm_pool": "map"}, "Eva"),
    "unknown_trunk": (
        {"timm_model_name": "vitamin_base_224", "timm_pool": "", "timm_proj": "linear"},
        "vitamin",
    ),
    "attentional_pool_parallel": ({"attentional_pool": "parallel"}, "attentional_pool='parallel'"),
    "attentional_pool_cascade": ({"attentional_pool": "cascade"}, "attentional_pool='cascade'"),
    "attentional_pool_avg": ({"attentional_pool": True, "pool_type": "avg"}, "pool_type='avg'"),
    "attentional_pool_eps": ({"attentional_pool": True, "norm_kwargs": {"eps": 1e-6}}, "epsilon 1e-06"),
    "final_ln_after_pool": ({"pool_type": "avg", "final_ln_after_pool": True}, "final_ln_after_pool"),
    "pool_none": ({"pool_type": "none"}, "pool_type"),
    "qk_norm": ({"qk_norm": True}, "qk_norm"),
    "resnet": ({"layers": [3, 4, 6, 3]}, "ResNet"),
    "timm_pool": ({"timm_model_name": "vit_base_patch16_siglip_224", "timm_pool": ""}, "timm_pool"),
    "timm_proj": ({"timm_model_name": "vit_base_patch16_siglip_224", "timm_proj": "mlp"}, "timm_proj"),
    "act_kwargs": ({"act_kwargs": {"approximate": "sigmoid"}}, "act_kwargs"),
    "norm_kwargs": ({"norm_kwargs": {"elementwise_affine": False}}, "norm_kwargs"),
    "unknown_setting": ({"rope": True}, "rope"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_settings_jaxvit_cannot_compute_are_refused_in_one_line(tmp_path, case):
    vision, named = REFUSED[case]
    folder = write_folder(
        tmp_path, dict(embed_dim=16, vision_cfg=dict(image_size=32, width=32, head_width=16, **vision))
    )
    with pytest.raises(ValueError, match=named) as info:
        jaxvit.load_for_inference(folder)  # refused from the config: there are no weights to read
    assert "\n" not in str(info.value)


def test_a_longest_side_resize_is_refused(tmp_path):
    cfg = dict(embed_dim=16, vision_cfg=dict(image_size=32, width=32, head_width=16))
    folder = write_folder(tmp_path, cfg, dict(resize_mode="longest"))
    with pytest.raises(ValueError, match="resize_mode='longest'"):
        jaxvit.load_for_inference(folder)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_a_torchscript_archive_is_refused_without_running_it(tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ValueError, match="TorchScript archive") as info:
        jaxvit.load_for_inference(path)
    assert "\n" not in str(info.value)


def test_every_siglip_trunk_of_open_clip_is_a_known_timm_architecture():
    names = set()
    for path in glob.glob(os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "*.json")):
        names.add(json.loads(Path(path).read_text())["vision_cfg"].get("timm_model_name") or "")
    siglip = {n for n in names if "siglip" in n}
    assert siglip and siglip <= set(TIMM_ARCHITECTURES)


def test_the_heads_of_a_width_are_those_of_every_open_clip_config_of_that_width():
    found: dict[int, set[int]] = {}
    for path in glob.glob(os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "*.json")):
        vision = json.loads(Path(path).read_text())["vision_cfg"]
        if "timm_model_name" in vision or isinstance(vision.get("layers"), list):
            continue
        width = vision.get("width", 768)
        found.setdefault(width, set()).add(width // vision.get("head_width", 64))
    assert {w: heads.pop() for w, heads in found.items() if len(heads) == 1} == reader.HEADS_OF_WIDTH


def teardown_module() -> None:
    for name, size, error in MEASURED:
        print(f"open_clip {name} at {size}px: max relative error {error:.2e}")
