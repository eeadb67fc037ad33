"""Fine-tuning and probes from pretrained checkpoints: ``config.freeze``, ``optimizer.layer_decay``,
``model_from_checkpoint``, and short runs on the digits from tiny DINOv2-, SigLIP-, BEiT- and
EVA02-shaped checkpoints (transformers and timm models of random weights, saved here; nothing is
downloaded)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from timm.models._hub import save_for_hf
from transformers import (
    BeitConfig,
    BeitModel,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import jaxvit
from jaxvit.checkpoints.pretrained import fit_to_model, read_checkpoint
from jaxvit.training import checkpointing, optim, trainer
from jaxvit.training.configs import base_config

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_channels=1, patch_size=2)
NATIVE = 16  # the checkpoints' image size: an 8x8 grid, resampled to the digits' 4x4


def flat(tree):
    return {optim.param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def layered_model(scan: bool) -> jaxvit.VisionTransformer:
    """Depth 3 with every embedding parameter there is: patch, class, distillation, registers, norm_pre."""
    return jaxvit.create_model(
        None,
        num_classes=4,
        width=8,
        depth=3,
        num_heads=2,
        mlp_dim=16,
        patch_size=4,
        num_registers=2,
        distill_token=True,
        pre_norm=True,
        scan=scan,
    )


def sgd_config(**extra):
    c = base_config()
    c.optimizer.update(
        name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip_norm=0.0, schedule="constant"
    )
    c.update(extra)
    return c


@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_scales_each_layer_of_an_sgd_update(scan):
    """SGD, lr 1, decay 0.5, depth 3: the update is -scale * grad with scale 0.5**4 for the
    embeddings, 0.5**(3 - i) for block i (per slice of the scanned stack) and 1 for norm and head."""
    model = layered_model(scan)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(1)
    grads = treedef.unflatten([rng.normal(size=leaf.shape).astype(np.float32) for leaf in leaves])
    c = sgd_config()
    c.optimizer.layer_decay = 0.5
    tx, _ = optim.make_optimizer(c, 10, depth=3)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    got, grad = flat(updates), flat(grads)
    seen = set()
    for path, g in grad.items():
        top = path.split("/")[0]
        if top in ("patch_embed", "cls_token", "dist_token", "pos_embed", "registers") or "norm_pre" in path:
            expected = -(0.5**4) * g
        elif path.startswith(("head/", "encoder/norm/")):
            expected = -g
        elif scan:
            assert path.startswith("encoder/blocks/") and g.shape[0] == 3
            expected = -np.stack([0.5 ** (3 - i) * g[i] for i in range(3)])
        else:
            i = int(path.split("/")[1].removeprefix("block_"))
            expected = -(0.5 ** (3 - i)) * g
        np.testing.assert_allclose(got[path], expected, rtol=1e-6, err_msg=path)
        seen.add(top)
    assert seen == {"patch_embed", "cls_token", "dist_token", "pos_embed", "registers", "encoder", "head"}


def test_layer_decay_is_the_same_for_scanned_and_unrolled_parameters():
    unrolled = layered_model(False).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    grads = jax.tree_util.tree_map(jnp.ones_like, unrolled)
    c = sgd_config()
    c.optimizer.layer_decay = 0.7
    tx, _ = optim.make_optimizer(c, 10, depth=3)
    one, _ = tx.update(grads, tx.init(unrolled), unrolled)
    scanned = jaxvit.unrolled_to_scan(unrolled)
    two, _ = tx.update(jaxvit.unrolled_to_scan(grads), tx.init(scanned), scanned)
    for path, value in flat(jaxvit.unrolled_to_scan(one)).items():
        np.testing.assert_allclose(flat(two)[path], value, rtol=1e-6, err_msg=path)


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5])
def test_layer_decay_outside_zero_one_fails(decay):
    c = sgd_config()
    c.optimizer.layer_decay = decay
    with pytest.raises(ValueError, match=rf"layer_decay={decay} must be in \(0, 1\]"):
        optim.make_optimizer(c, 10, depth=3)


def test_frozen_parameters_stay_bit_identical_under_adamw_with_weight_decay():
    model = layered_model(False)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.5, params)  # no zeros that a decay would keep
    c = base_config()
    c.optimizer.update(weight_decay=0.5, lr=0.1)
    c.freeze = ("backbone", "head/dist_classifier")
    tx, _ = optim.make_optimizer(c, 10, depth=3)
    state, new = tx.init(params), params
    for seed in range(3):
        grads = jax.tree_util.tree_map(
            lambda p, seed=seed: jax.random.normal(jax.random.key(seed), p.shape), params
        )
        updates, state = tx.update(grads, state, new)
        new = jax.tree_util.tree_map(lambda p, u: p + u, new, updates)
    before, after = flat(params), flat(new)
    for path in before:
        if path.startswith("head/classifier/"):
            assert not np.array_equal(before[path], after[path]), path
        else:
            assert np.array_equal(before[path], after[path]), path
    # no Adam moments are kept for frozen parameters
    moments = sum(a.size for a in jax.tree_util.tree_leaves(state))
    assert moments < 3 * sum(v.size for p, v in before.items() if p.startswith("head/classifier/")) + 10


def test_freeze_patterns_name_parameters_or_modules():
    params = layered_model(False).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    frozen = {
        p for p, f in flat(optim.frozen_mask(params, ["patch_embed", "encoder/block_[01]"])).items() if f
    }
    assert frozen == {
        p for p in flat(params) if p.startswith(("patch_embed/", "encoder/block_0/", "encoder/block_1/"))
    }
    backbone = flat(optim.frozen_mask(params, "backbone"))
    assert {p for p, f in backbone.items() if not f} == {p for p in backbone if p.startswith("head/")}


def test_unknown_freeze_pattern_fails_listing_the_top_level_parameters():
    params = layered_model(False).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    with pytest.raises(
        ValueError, match=r"freeze pattern 'blocks' matches no parameter.*'cls_token'.*'head'"
    ):
        optim.frozen_mask(params, "blocks")
    with pytest.raises(ValueError, match="freezes every parameter"):
        optim.frozen_mask(params, ".*")
    with pytest.raises(ValueError, match="not a regular expression"):
        optim.frozen_mask(params, "head/(")


def test_model_from_checkpoint_needs_init_from(tmp_path):
    c = base_config()
    c.model_from_checkpoint = True
    with pytest.raises(ValueError, match="model_from_checkpoint=True needs init_from"):
        trainer.train_and_evaluate(c, str(tmp_path))


# -- short runs on the digits ------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    """DINOv2 with 2 registers, SwiGLU and LayerScale, 8x8 patch grid, 1 channel."""
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(
        **TINY, image_size=NATIVE, mlp_ratio=4, use_swiglu_ffn=True, num_register_tokens=2
    )
    folder = tmp_path_factory.mktemp("dinov2")
    Dinov2WithRegistersModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    """SigLIP's tower: no class token, MAP head, 8x8 patch grid, 1 channel."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("siglip")
    SiglipVisionModel(SiglipVisionConfig(**TINY, image_size=NATIVE, intermediate_size=64)).save_pretrained(
        folder
    )
    return str(folder)


def digits_finetune_config(init_from, **changes):
    """300 steps of batch 64 on the 8x8 digits from ``init_from``, the model taken from it."""
    c = base_config()
    c.num_channels = 1
    c.image_size = 8
    c.init_from = init_from
    c.model_from_checkpoint = True
    c.batch_size = 64
    c.total_steps = 300
    c.optimizer.warmup_steps = 10
    c.eval_every = 0
    c.checkpoint_every = 0
    c.progress_bar = False
    c.update_from_flattened_dict(changes)
    c.lock()
    return c


def test_dinov2_fine_tunes_on_digits_with_layer_decay(dinov2_folder, tmp_path):
    config = digits_finetune_config(dinov2_folder, **{"optimizer.lr": 2e-3, "optimizer.layer_decay": 0.75})
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    assert metrics["eval/top1"] > 0.7, metrics  # measured 0.856 (random-weight backbone, 2-core CPU)
    saved = json.load(open(tmp_path / "config.json"))["model"]
    assert saved["variant"] is None and saved["mlp_type"] == "swiglu" and saved["num_registers"] == 2
    assert saved["layer_scale_init"] == 1.0 and saved["depth"] == 2 and saved["width"] == 32
    # the workdir rebuilds the trained model with the new head, at the digits' size
    bundle = jaxvit.load_for_inference(tmp_path)
    _, params, _ = checkpointing.restore_params(str(tmp_path))
    assert bundle.model.num_classes == 10 and bundle.image_size == (8, 8)
    assert params["head"]["classifier"]["kernel"].shape == (32, 10)
    x = np.linspace(-1, 1, 2 * 64).reshape(2, 8, 8, 1).astype(np.float32)
    np.testing.assert_allclose(
        bundle.model.apply({"params": bundle.params}, x), bundle.model.apply({"params": params}, x), rtol=1e-6
    )


def test_siglip_probe_on_digits_keeps_the_frozen_backbone_bit_identical(siglip_folder, tmp_path):
    config = digits_finetune_config(siglip_folder, **{"optimizer.lr": 1e-2, "freeze": "backbone"})
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    assert metrics["eval/top1"] > 0.55, metrics  # measured 0.75 (random-weight backbone, 2-core CPU)
    model, tuned, _ = checkpointing.restore_params(str(tmp_path))
    assert (model.pool, model.class_token, model.num_classes, model.num_channels) == ("map", False, 10, 1)
    start = fit_to_model(read_checkpoint(siglip_folder), model, 8)
    before, after = flat(start), flat(tuned)
    assert before.keys() == after.keys()
    for path in before:
        if path.startswith("head/"):
            assert not np.array_equal(before[path], after[path]), path
        else:
            assert np.array_equal(before[path], after[path]), path
    # the position embedding went from the 8x8 grid to 4x4 as transformers' SigLIP resizes it
    native = flat(fit_to_model(read_checkpoint(siglip_folder), model, NATIVE))["pos_embed/embedding"]
    expected = jaxvit.resample_posemb(native, (4, 4), (8, 8), num_prefix_tokens=0, method="bicubic")
    np.testing.assert_allclose(after["pos_embed/embedding"], expected, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def beit_folder(tmp_path_factory):
    """BEiT: a relative position table per block, LayerScale, mean pooling + fc_norm, 8x8 grid, 1 channel."""
    torch.manual_seed(0)
    config = BeitConfig(**TINY, image_size=NATIVE, intermediate_size=64, use_relative_position_bias=True)
    model = BeitModel(config)
    with torch.no_grad():  # transformers starts the tables at zero; a pretrained one is not
        for i in range(config.num_hidden_layers):
            model.layers[i].relative_position_bias.relative_position_bias_table.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("beit")
    model.save_pretrained(folder)
    return str(folder)


def test_beit_fine_tunes_on_digits_with_layer_decay_and_its_tables_resized(beit_folder, tmp_path):
    config = digits_finetune_config(beit_folder, **{"optimizer.lr": 5e-3, "optimizer.layer_decay": 0.75})
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    assert metrics["eval/top1"] > 0.6, metrics  # measured 0.714 (random-weight backbone, 2-core CPU)
    model, tuned, _ = checkpointing.restore_params(str(tmp_path))
    assert (model.rel_pos_bias, model.pool, model.fc_norm, model.num_classes) == ("block", "gap", True, 10)
    table = "encoder/block_1/attn/rel_pos_bias/table"
    assert optim.layer_decay_scale(table, (0,), 0.75, model.depth) == 0.75
    # the 8x8 grid's tables (15x15 offsets) went to the digits' 4x4 (7x7) as transformers resizes them
    native = flat(fit_to_model(read_checkpoint(beit_folder), model, NATIVE))[table]
    start = flat(fit_to_model(read_checkpoint(beit_folder), model, 8))[table]
    np.testing.assert_allclose(start, jaxvit.layers.resample_rel_pos_bias(native, (4, 4), (8, 8)), atol=1e-6)
    assert start.shape == flat(tuned)[table].shape == (7 * 7 + 3, 2)
    assert not np.array_equal(start, flat(tuned)[table])  # the tables train


@pytest.fixture(scope="module")
def eva02_folder(tmp_path_factory):
    """timm's EVA02-B form: axial RoPE stretched to its pre-training grid, SwiGLU with sub-LN, separate
    q/k/v projections, mean pooling + fc_norm; 8x8 grid, 1 channel."""
    torch.manual_seed(0)
    peer = timm.create_model(
        "eva02_base_patch14_224",
        img_size=NATIVE,
        patch_size=2,
        in_chans=1,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    folder = tmp_path_factory.mktemp("eva02") / "peer"
    save_for_hf(peer, str(folder), safe_serialization=True)
    return str(folder)


def test_eva02_fine_tunes_on_digits_with_layer_decay(eva02_folder, tmp_path):
    config = digits_finetune_config(eva02_folder, **{"optimizer.lr": 2e-3, "optimizer.layer_decay": 0.75})
    metrics = trainer.train_and_evaluate(config, str(tmp_path))
    assert metrics["eval/top1"] > 0.8, metrics  # measured 0.919 (random-weight backbone, 2-core CPU)
    model, tuned, _ = checkpointing.restore_params(str(tmp_path))
    fields = ("rope", "rope_ref_grid", "mlp_type", "mlp_norm", "pool", "fc_norm", "num_classes")
    assert tuple(getattr(model, f) for f in fields) == ("axial", (16, 16), "swiglu", True, "gap", True, 10)
    sub_ln = "encoder/block_0/mlp/norm/scale"
    assert optim.layer_decay_scale(sub_ln, (32,), 0.75, model.depth) == 0.75**2
    start = flat(fit_to_model(read_checkpoint(eva02_folder), model, 8))
    assert not np.array_equal(start[sub_ln], flat(tuned)[sub_ln])  # the sub-LN trains
