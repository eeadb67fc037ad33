"""NaFlex: patch sequences of images at their own aspect ratio, and SigLIP 2 NaFlex read and written
for transformers, in parity with the peer's own code.

A tiny ``Siglip2VisionModel`` (patch 4, a 4x4 position table) is built once, every parameter
moved by 0.05 * N(0, 1), and saved as the folder a user downloads. The batch mixes aspect ratios
and budgets: grids 3x5, 2x8, 4x4 and 1x2 in rows of 16 patches (the peer's own resize of its table
to each grid, against jaxvit's). Figures are max relative differences in fp32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import perturb_torch, relative_error
from PIL import Image
from transformers import Siglip2Config, Siglip2Model, Siglip2VisionConfig, Siglip2VisionModel
from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

import jaxvit
from jaxvit import ops
from jaxvit.data import naflex
from jaxvit.layers.posemb import resize_matrix, resize_posemb_to_grids

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
PATCH, TABLE, LENGTH = 4, 4, 16
GRIDS = np.array([[3, 5], [2, 8], [4, 4], [1, 2]], np.int32)


def sequences(grids: np.ndarray, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random patches for each grid, then padding that is not zero (it must not matter)."""
    rng = np.random.default_rng(seed)
    patches = rng.normal(size=(len(grids), length, PATCH * PATCH * 3)).astype(np.float32)
    mask = np.arange(length)[None] < grids.prod(1)[:, None]
    return {"patches": patches, "grids": grids, "mask": mask}


def peer_outputs(peer: torch.nn.Module, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = peer(
            pixel_values=torch.from_numpy(batch["patches"]),
            pixel_attention_mask=torch.from_numpy(batch["mask"].astype(np.int64)),
            spatial_shapes=torch.from_numpy(batch["grids"].astype(np.int64)),
        )
    return {"pooled": out.pooler_output.numpy(), "tokens": out.last_hidden_state.numpy()}


def our_outputs(model, params, batch) -> dict[str, np.ndarray]:
    def forward(variables, patches, grids, mask):
        out, state = model.apply(variables, patches, grids=grids, mask=mask, mutable=["intermediates"])
        return {"pooled": out, "tokens": state["intermediates"]["encoded"][0]}

    out = jax.jit(forward)({"params": params}, batch["patches"], batch["grids"], batch["mask"])
    return jax.tree_util.tree_map(np.asarray, out)


def assert_valid_tokens_equal(ours, ref, mask, tol=1e-4):
    assert relative_error(ours["pooled"], ref["pooled"]) < tol
    assert relative_error(ours["tokens"][mask], ref["tokens"][mask]) < tol


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory):
    torch.manual_seed(0)
    config = Siglip2VisionConfig(**TOWER, patch_size=PATCH, num_patches=TABLE * TABLE)
    peer = perturb_torch(Siglip2VisionModel(config), seed=1, scale=0.05)
    folder = tmp_path_factory.mktemp("siglip2") / "peer"
    peer.save_pretrained(folder)
    bundle = jaxvit.load_for_inference(folder)
    batch = sequences(GRIDS, LENGTH)
    return peer, folder, bundle, batch, our_outputs(bundle.model, bundle.params, batch)


def test_the_folder_gives_a_naflex_model(siglip2):
    _, _, bundle, _, _ = siglip2
    model = bundle.model
    assert (model.posemb_grid, model.patch_size, model.pool, model.class_token) == (
        TABLE,
        PATCH,
        "map",
        False,
    )
    assert bundle.params["pos_embed"]["embedding"].shape == (1, TABLE * TABLE, 32)
    assert bundle.params["patch_embed"]["kernel"].shape == (PATCH, PATCH, 3, 32)


def test_siglip2_features_equal_the_peers_on_mixed_grids(siglip2):
    peer, _, _, batch, ours = siglip2
    assert_valid_tokens_equal(ours, peer_outputs(peer, batch), batch["mask"])


def test_padding_changes_no_valid_output(siglip2):
    """The same images in rows of 16 and of 40 patches (the extra rows noise) give the same outputs."""
    _, _, bundle, batch, ours = siglip2
    longer = sequences(GRIDS, 40, seed=3)
    longer["patches"][:, :LENGTH][batch["mask"]] = batch["patches"][batch["mask"]]
    again = our_outputs(bundle.model, bundle.params, longer)
    np.testing.assert_allclose(again["pooled"], ours["pooled"], atol=2e-6)
    np.testing.assert_allclose(
        again["tokens"][:, :LENGTH][batch["mask"]], ours["tokens"][batch["mask"]], atol=2e-6
    )


def test_mean_pooling_and_a_class_token_see_the_valid_tokens_only():
    model = jaxvit.create_model(
        None, num_classes=5, width=16, depth=1, num_heads=2, patch_size=PATCH, pool="gap", posemb_grid=3
    )
    batch = sequences(GRIDS[:2], LENGTH)
    variables = model.init(jax.random.key(0), batch["patches"], grids=batch["grids"])
    short = model.apply(variables, batch["patches"], grids=batch["grids"], mask=batch["mask"])
    longer = sequences(GRIDS[:2], 24, seed=4)
    longer["patches"][:, :LENGTH][batch["mask"]] = batch["patches"][batch["mask"]]
    np.testing.assert_allclose(
        model.apply(variables, longer["patches"], grids=longer["grids"]), short, atol=2e-6
    )
    # a sequence of all of an image's patches equals the image itself
    image = jax.random.normal(jax.random.key(2), (1, 12, 20, 3))
    whole = jaxvit.patchify(image, PATCH)
    np.testing.assert_allclose(
        model.apply(variables, whole, grids=jnp.array([[3, 5]])), model.apply(variables, image), atol=2e-6
    )


def test_jaxvit_to_transformers_siglip2(siglip2, tmp_path):
    _, _, bundle, batch, ours = siglip2
    jaxvit.export(bundle.params, tmp_path / "ours", "hf", model=bundle.model)
    back = Siglip2VisionModel.from_pretrained(tmp_path / "ours").eval()
    assert back.config.num_patches == TABLE * TABLE and back.config.patch_size == PATCH
    assert_valid_tokens_equal(ours, peer_outputs(back, batch), batch["mask"])


def test_the_image_tower_of_a_siglip2_model_folder(tmp_path):
    torch.manual_seed(0)
    config = Siglip2Config(
        vision_config={**TOWER, "patch_size": PATCH, "num_patches": TABLE * TABLE},
        text_config={**TOWER, "vocab_size": 50, "max_position_embeddings": 8},
    )
    peer = perturb_torch(Siglip2Model(config), seed=2, scale=0.05)
    peer.save_pretrained(tmp_path / "two_towers")
    bundle = jaxvit.load_for_inference(tmp_path / "two_towers")
    batch = sequences(GRIDS, LENGTH, seed=5)
    assert_valid_tokens_equal(
        our_outputs(bundle.model, bundle.params, batch), peer_outputs(peer.vision_model, batch), batch["mask"]
    )


def test_a_bare_siglip2_state_dict_is_refused_in_one_line(siglip2, tmp_path):
    from safetensors.numpy import save_file

    peer = siglip2[0]
    save_file({k: v.numpy() for k, v in peer.state_dict().items()}, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="does not say its patch size and channels") as err:
        jaxvit.load_for_inference(tmp_path / "bare.safetensors")
    assert "\n" not in str(err.value)


def test_the_per_example_table_resize_is_torchs_antialiased_bilinear():
    table = np.random.default_rng(0).normal(size=(5 * 7, 3)).astype(np.float32)
    grids = np.array([[2, 3], [5, 7], [9, 4], [1, 11]], np.int32)
    resized = np.asarray(resize_posemb_to_grids(jnp.asarray(table), (5, 7), jnp.asarray(grids), 44))
    for row, (h, w) in zip(resized, grids, strict=True):
        rows, cols = resize_matrix(5, h, "bilinear", True), resize_matrix(7, w, "bilinear", True)
        expected = np.einsum("Hh,hwd,Ww->HWd", rows, table.reshape(5, 7, 3), cols).reshape(h * w, 3)
        np.testing.assert_allclose(row[: h * w], expected, atol=1e-6)
        np.testing.assert_array_equal(row[h * w :], np.broadcast_to(row[:1], row[h * w :].shape))  # padding


@pytest.mark.parametrize("size", [(37, 53), (200, 17), (5, 5), (64, 48)])
@pytest.mark.parametrize("budget", [16, 50])
def test_preprocessing_is_the_image_processors(size, budget):
    """The size rule, the patch order and the pixels of transformers' Siglip2 image processor, on odd sizes."""
    image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8))
    processor = Siglip2ImageProcessorPil(patch_size=PATCH, max_num_patches=budget)
    ref = processor(images=[image], return_tensors="np")
    patches, grid, mask = naflex.prepare(image, PATCH, budget)
    np.testing.assert_array_equal(grid, ref["spatial_shapes"][0])
    np.testing.assert_array_equal(mask, ref["pixel_attention_mask"][0].astype(bool))
    np.testing.assert_allclose(patches, ref["pixel_values"][0], atol=1e-6)


def test_splash_takes_the_padding_mask_forward_and_backward():
    """Pallas's Splash kernel (interpret mode) with a NaFlex mask equals explicit attention with it,
    at 21 tokens of which 13 are valid, values and gradients."""
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.normal(size=(2, 21, 3, 2, 8)).astype(np.float32))
    mask = jnp.asarray(np.arange(21)[None] < np.array([[13], [21]]))
    weights = jnp.asarray(rng.normal(size=(2, 21, 2, 8)).astype(np.float32))

    def loss(impl, interpret=False):
        def f(qkv):
            with ops.attention_impl(impl, interpret):
                out = jaxvit.layers.attention.attend(qkv, mask=mask)
            return jnp.sum(jnp.where(mask[:, :, None, None], out * weights, 0.0))

        return jax.value_and_grad(f)(qkv)

    (value, grad), (ref_value, ref_grad) = loss("splash", True), loss("explicit")
    assert abs(float(value - ref_value)) < 1e-4
    # the gradient reaches the valid tokens only, as the reference's does
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5)
    assert float(jnp.abs(ref_grad[0, 13:]).max()) == 0.0


def big_vision_naflex_npz(peer: Siglip2VisionModel, path, scanned: bool = False):
    """The peer's weights in big_vision's NaFlex layout under ``params/img/`` (plus a text key)."""
    from test_families_clip_siglip import big_vision_two_tower

    class ConvLayout:  # SigLIP's layout, which the SigLIP test writes for big_vision
        def state_dict(self):
            sd = {k.removeprefix("vision_model."): v for k, v in peer.state_dict().items()}
            weight = sd["embeddings.patch_embedding.weight"]
            sd["embeddings.patch_embedding.weight"] = weight.reshape(len(weight), PATCH, PATCH, 3).permute(
                0, 3, 1, 2
            )
            return sd

    arrays = big_vision_two_tower(ConvLayout())
    tower = {k: v for k, v in arrays.items() if k.startswith("params/img/")}
    kernel = tower["params/img/embedding/kernel"]
    tower["params/img/embedding/kernel"] = kernel.reshape(-1, kernel.shape[-1])
    tower["params/img/pos_embedding"] = tower["params/img/pos_embedding"].reshape(TABLE, TABLE, -1)
    if scanned:
        blocks = [k for k in tower if "/encoderblock_0/" in k]
        for key in blocks:
            parts = [tower.pop(key.replace("encoderblock_0", f"encoderblock_{i}")) for i in range(2)]
            tower[key.replace("encoderblock_0", "encoderblock")] = np.stack(parts)
    np.savez(path, **tower, **{"params/txt/Embed_0/embedding": np.zeros((5, 32), np.float32)})
    return path


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_naflex_npz_gives_the_peers_features(siglip2, tmp_path, scanned):
    peer, _, _, batch, ours = siglip2
    path = big_vision_naflex_npz(peer, tmp_path / "naflex.npz", scanned)
    bundle = jaxvit.load_for_inference(path)
    assert (bundle.model.posemb_grid, bundle.model.patch_size, bundle.model.activation) == (
        TABLE,
        PATCH,
        "gelu_tanh",
    )
    assert_valid_tokens_equal(
        our_outputs(bundle.model, bundle.params, batch), peer_outputs(peer, batch), batch["mask"]
    )


def test_dense_features_come_back_at_each_images_grid(siglip2):
    peer, _, bundle, batch, _ = siglip2
    (last,) = jaxvit.intermediate_features(
        bundle.model,
        {"params": bundle.params},
        batch["patches"],
        layers=1,
        grids=batch["grids"],
        mask=batch["mask"],
    )
    reference = peer_outputs(peer, batch)["tokens"]
    assert [g.shape for g in last] == [(h, w, 32) for h, w in GRIDS]
    for j, (h, w) in enumerate(GRIDS):
        assert relative_error(last[j], reference[j, : h * w].reshape(h, w, 32)) < 1e-4


def test_predict_takes_each_image_at_its_aspect_ratio(tmp_path, capsys):
    """A NaFlex classifier predicts a folder of odd-shaped images in one padded batch; each image's
    probabilities equal those of the image alone, prepared by jaxvit.data.naflex."""
    from jaxvit.checkpoints.inference import InferenceBundle
    from jaxvit.predict import main, predict

    model = jaxvit.create_model(
        None,
        num_classes=3,
        width=16,
        depth=1,
        num_heads=2,
        patch_size=PATCH,
        class_token=False,
        pool="map",
        posemb_grid=4,
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape), params)
    bundle = InferenceBundle(model, params, (16, 16), (0.5,) * 3, (0.5,) * 3, None, "test")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(13, 40), (40, 9), (20, 20)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    results = predict(bundle, paths, batch_size=4, k=3, max_patches=20)
    for path, result in zip(paths, results, strict=True):
        patches, grid, mask = naflex.prepare(Image.open(path), PATCH, 20)
        alone = jax.nn.softmax(
            model.apply({"params": params}, patches[None], grids=grid[None], mask=mask[None])
        )[0]
        got = {t["class"]: t["probability"] for t in result["top_k"]}
        np.testing.assert_allclose([got[c] for c in range(3)], alone, atol=1e-6)
    # a model of one image size is told that --max-patches is not for it, in one line
    plain = jaxvit.create_model(None, num_classes=3, width=16, depth=1, num_heads=2, patch_size=PATCH)
    jaxvit.export(
        plain.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"],
        tmp_path / "plain.npz",
        "npz",
        model=plain,
    )
    assert main(["--checkpoint", str(tmp_path / "plain.npz"), "--max-patches", "16", str(paths[0])]) == 2
    assert capsys.readouterr().err.startswith("error: max_patches is for NaFlex models")
