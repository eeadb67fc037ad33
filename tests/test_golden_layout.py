"""Parameter paths, shapes and sow keys of six configurations, frozen before the restructure.

Checkpoints, workdirs and user code depend on these names. ``tests/data/golden_layout.json``
was written by ``python tests/test_golden_layout.py --write`` on the code before the
package was split into subpackages; nothing may change it.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxvit

GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "golden_layout.json"
SMALL = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, num_classes=5)
CONFIGS = {
    "plain": dict(SMALL, representation_size=16, pre_norm=True, patch_bias=False),
    "scanned": dict(SMALL, scan=True),
    "map_head": dict(SMALL, pool="map", class_token=False, posemb="sincos2d"),
    "registers_swiglu_layerscale": dict(SMALL, num_registers=2, mlp_type="swiglu", layer_scale_init=1e-5),
    "distill_token": dict(SMALL, distill_token=True),
    "rope": dict(SMALL, posemb="rope", num_registers=1, qkv_bias=False),
}


def layout(name: str) -> dict[str, dict[str, list[int]]]:
    """``{collection: {"a/b/c": shape}}`` of ``params`` and the sown collections at 32x32 px."""
    model = jaxvit.create_model(None, **CONFIGS[name])
    images = jax.ShapeDtypeStruct((2, 32, 24, 3), jnp.float32)

    def run(x):
        variables = model.init(jax.random.key(0), x)
        _, state = model.apply(variables, x, mutable=["intermediates", "attention"])
        return variables["params"], state

    params, state = jax.eval_shape(run, images)
    out = {"params": params, **state}
    return {
        collection: {
            "/".join(_key(k) for k in path): list(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        }
        for collection, tree in out.items()
    }


def _key(entry: object) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", entry)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layout_is_frozen(name: str) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert layout(name) == golden[name]


def test_golden_file_covers_every_config() -> None:
    assert sorted(json.loads(GOLDEN.read_text())) == sorted(CONFIGS)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_text(json.dumps({name: layout(name) for name in sorted(CONFIGS)}, indent=1) + "\n")
