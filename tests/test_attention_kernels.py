"""The accelerators' attention kernels behind ``ops.set_attention_impl``: Pallas's Splash attention
(run here in interpret mode) against ``explicit_attention``, forward and backward, at the model's
odd sequence lengths; what a step traced for a TPU contains; and why a kernel is not taken."""

from __future__ import annotations

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvit
from jaxvit import ops


def _qkv(t: int, seed: int = 0, heads: int = 2, head_dim: int = 16):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((2, heads, t, head_dim)), jnp.float32) for _ in range(3)]


# 197: 1 + 14x14 (224/16); 257: 1 + 16x16 (224/14); 21: 1 + 4 registers + 4x4
@pytest.mark.parametrize("t", [197, 257, 21])
def test_splash_attention_equals_explicit_attention_forward_and_backward(t):
    q, k, v = _qkv(t)
    cotangent = _qkv(t, seed=1)[0]
    splash = lambda q, k, v: ops.splash_attention(q, k, v, interpret=True)  # noqa: E731
    values, grads = [], []
    for attention in (splash, ops.explicit_attention):
        out, vjp = jax.vjp(attention, q, k, v)
        values.append(out)
        grads.append(vjp(cotangent))
    chex.assert_trees_all_close(values[0], values[1], atol=2e-6, rtol=1e-5)
    chex.assert_trees_all_close(grads[0], grads[1], atol=2e-5, rtol=1e-4)


def _model(**overrides):
    sizes = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4)
    return jaxvit.create_model(None, num_classes=10, **{**sizes, **overrides})


def _images(n: int = 2):
    return jnp.asarray(np.random.default_rng(0).random((n, 16, 16, 3)), jnp.float32)


def test_a_model_on_splash_computes_what_it_does_on_the_cpu_path():
    """With registers the sequence is 1 + 4 + 16 = 21 tokens, padded to 128 for the kernel."""
    model, x = _model(num_registers=4), _images()
    params = model.init(jax.random.key(0), x)["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.05 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), params)

    def loss_and_grads():
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)

    with ops.attention_impl("splash", interpret=True):
        splash = loss_and_grads()
    chex.assert_trees_all_close(splash, loss_and_grads(), atol=1e-5, rtol=1e-4)


def _lowered(model, platform: str, impl: str) -> str:
    x = _images()
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    with ops.attention_impl(impl):
        traced = jax.jit(lambda p: model.apply({"params": p}, x)).trace(params)
        return traced.lower(lowering_platforms=(platform,)).as_text()


def test_a_step_compiled_for_a_tpu_holds_the_splash_kernel_where_it_is_chosen():
    model = _model()
    assert "tpu_custom_call" in _lowered(model, "tpu", "splash")
    # "auto" keeps XLA's attention on a TPU: at ViT-S/16 Splash costs more (README)
    assert "tpu_custom_call" not in _lowered(model, "tpu", "auto")
    assert "tpu_custom_call" not in _lowered(model, "cpu", "splash")


@pytest.mark.parametrize(
    "impl, platform, overrides, reason",
    [
        ("splash", "tpu", {"rel_pos_bias": "block"}, "Splash takes masks only"),
        ("cudnn", "cuda", {}, "cuDNN attention computes in bfloat16 or float16, the model in float32"),
        ("cudnn", "cuda", {"dtype": jnp.bfloat16, "width": 512, "num_heads": 2}, "head size 256"),
        ("cudnn", "cuda", {"dtype": jnp.bfloat16}, "this process cannot trace it"),
    ],
)
def test_a_kernel_not_taken_says_why_and_xla_computes(impl, platform, overrides, reason, caplog):
    ops._fallbacks_logged.clear()
    with caplog.at_level(logging.INFO, logger="jaxvit"):
        text = _lowered(_model(**overrides), platform, impl)
    assert any(reason in r.getMessage() and "XLA's instead" in r.getMessage() for r in caplog.records)
    assert "tpu_custom_call" not in text and "cudnn" not in text.lower()


def test_interpret_mode_is_for_splash_only():
    with pytest.raises(ValueError, match="interpret=True is for the Pallas kernel"):
        ops.set_attention_impl("fused", interpret=True)
    assert ops.get_attention_impl() == "auto" and not ops.splash_interpreted()
