"""Generated from the registry: every family's variants build, and every writer's files come back
through exactly one reader of the same family, with the same parameters.

A new family (a folder in ``jaxvit/families/``) is tested here without editing this file: its
``VARIANTS`` and each writer's ``EXAMPLE`` are read from the registry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvit
from jaxvit import families
from jaxvit.checkpoints import registry
from jaxvit.checkpoints.exporting import flat_params
from jaxvit.checkpoints.pretrained import read_checkpoint
from jaxvit.variants import FAMILY_VARIANTS

TINY = dict(width=32, depth=2, num_heads=2, patch_size=8, mlp_dim=64)
WRITERS = [writer for writers in registry.EXPORTERS.values() for writer in writers]


def test_every_format_lives_in_a_family_home():
    assert set(registry.FAMILY_OF.values()) <= set(families.NAMES)
    assert {f.__name__.split(".")[2] for f in registry.FORMATS} == set(registry.FAMILY_OF.values())
    for name in families.NAMES:
        assert families.family(name).__doc__, name  # says which checkpoints it holds


@pytest.mark.parametrize("variant", sorted(FAMILY_VARIANTS))
def test_every_family_variant_builds(variant: str):
    sizes, options = FAMILY_VARIANTS[variant]
    for size in sizes:
        model = jaxvit.create_model(f"{variant}:{size}")
        model.check_config()
        assert model.width == sizes[size]["width"] and model.depth == sizes[size]["depth"]
        assert {k: getattr(model, k) for k in options} == options


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.NAME)
def test_every_writer_round_trips_through_one_reader_of_its_family(writer, tmp_path):
    model = jaxvit.create_model(None, **{**TINY, **writer.EXAMPLE})
    assert registry.exporter(writer.EXPORT_FORMAT, model) is writer
    size = 16
    params = model.init(jax.random.key(0), jnp.zeros((1, size, size, model.num_channels)))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    # A key bias adds the same to every logit of a query, so it changes nothing; some layouts
    # (timm's DINOv3) fix it at zero.
    params = jax.tree_util.tree_map_with_path(_zero_key_bias, params)
    name = "ckpt.npz" if writer.EXPORT_FORMAT == "npz" else "ckpt.safetensors"
    path = jaxvit.export(params, tmp_path / name, writer.EXPORT_FORMAT, model=model, image_size=size)
    ckpt = read_checkpoint(path)  # the registry refuses a file two readers claim
    reader = registry.by_origin(ckpt.origin)
    assert registry.FAMILY_OF[reader] == registry.FAMILY_OF[writer], (reader.NAME, writer.NAME)
    loaded = flat_params(jaxvit.load_pretrained(path, model, size))
    expected = flat_params(params)
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(loaded[key], value, rtol=1e-6, atol=1e-6, err_msg=key)


def _zero_key_bias(path, x):
    if "/".join(str(getattr(p, "key", p)) for p in path).endswith("attn/qkv/bias"):
        return x.at[x.shape[0] // 3 : 2 * x.shape[0] // 3].set(0.0)
    return x


def test_two_readers_claiming_one_file_is_refused(monkeypatch):
    vt, big_vision = registry.by_origin("vt"), registry.by_origin("big_vision")
    monkeypatch.setattr(vt, "CLAIMS", "specific")
    arrays = {"params/embedding/kernel": np.zeros((1,))}
    with pytest.raises(ValueError, match="claimed by big_vision and vt: refused as ambiguous"):
        registry.format_for("npz", arrays)
    assert big_vision.claims("npz", arrays)
