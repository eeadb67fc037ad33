"""The pure training pieces: optimizer, schedule, loss, mixing, steps, sharding specs."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxvit
from jaxvit.training import optim, train_lib
from jaxvit.training.configs import base_config, step_config_from_config

MODEL = jaxvit.create_model(None, num_classes=5, width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4)


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(n, 8, 8, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 5, n), jnp.int32),
    }


def config(**optimizer):
    c = base_config()
    c.optimizer.update(optimizer)
    return c


def test_weight_decay_only_on_kernels():
    params = MODEL.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    mask = optim.weight_decay_mask(params)
    decayed = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}
    assert decayed == {
        "['patch_embed']['kernel']",
        "['encoder']['block_0']['attn']['qkv']['kernel']",
        "['encoder']['block_0']['attn']['out']['kernel']",
        "['encoder']['block_0']['mlp']['fc1']['kernel']",
        "['encoder']['block_0']['mlp']['fc2']['kernel']",
        "['head']['classifier']['kernel']",
    }


def test_schedule_warmup_then_cosine_and_linear():
    cosine = optim.learning_rate_schedule(1.0, 110, 10, "cosine")
    np.testing.assert_allclose(
        [cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)], [0, 0.5, 1, 0.5, 0], atol=1e-6
    )
    linear = optim.learning_rate_schedule(2.0, 100, 0, "linear", end_factor=0.5)
    np.testing.assert_allclose([linear(0), linear(50), linear(100)], [2.0, 1.5, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        optim.learning_rate_schedule(1.0, 10, 0, "step")
    with pytest.raises(ValueError, match="warmup"):
        optim.learning_rate_schedule(1.0, 10, 20)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_updates_and_decays_only_kernels(name):
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))}}
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)  # only weight decay moves anything
    tx, _ = optim.make_optimizer(
        config(name=name, lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant"), 10
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.max(jnp.abs(updates["dense"]["kernel"]))) > 0, name
    np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        optim.make_optimizer(config(name="adam"), 10)


def test_gradient_accumulation_equals_one_big_batch():
    b = batch(8)
    halves = [jax.tree_util.tree_map(lambda a, i=i: a[i * 4 : (i + 1) * 4], b) for i in range(2)]
    kwargs = dict(name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0, grad_clip_norm=0.0, warmup_steps=0)

    def run(accum, batches):
        c = config(**kwargs)
        c.grad_accum_steps = accum
        tx, schedule = optim.make_optimizer(c, 10)
        state = train_lib.create_train_state(MODEL, tx, jax.random.key(0), (8, 8, 3), ema=False)
        step = jax.jit(
            functools.partial(
                train_lib.train_step,
                model=MODEL,
                tx=tx,
                schedule=schedule,
                cfg=train_lib.StepConfig(num_classes=5, grad_accum_steps=accum),
            )
        )
        for x in batches:
            state, _ = step(state, x, jax.random.key(1))
        return state.params

    chex.assert_trees_all_close(run(2, halves), run(1, [b]), rtol=1e-5, atol=1e-6)


def test_cross_entropy_with_label_smoothing():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    targets = train_lib.soft_targets(jnp.array([0]), 3, label_smoothing=0.3)
    np.testing.assert_allclose(targets, [[0.8, 0.1, 0.1]], rtol=1e-6)
    logp = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
    np.testing.assert_allclose(
        train_lib.cross_entropy(logits, targets),
        [-(0.8 * logp[0] + 0.1 * logp[1] + 0.1 * logp[2])],
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "mix",
    [
        train_lib.MixConfig(mixup_alpha=0.4),
        train_lib.MixConfig(cutmix_alpha=1.0),
        train_lib.MixConfig(0.4, 1.0),
    ],
)
def test_mixing_keeps_targets_normalised_and_consistent(mix):
    images = jnp.stack([jnp.full((6, 6, 1), float(i)) for i in range(4)])  # example i is constant i
    targets = jax.nn.one_hot(jnp.arange(4), 4)
    for seed in range(5):
        mixed, soft = train_lib.mix_batch(jax.random.key(seed), images, targets, mix)
        np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)
        # each mixed image's mean is the target-weighted mean of the two sources
        np.testing.assert_allclose(mixed.mean(axis=(1, 2, 3)), soft @ jnp.arange(4.0), rtol=1e-5, atol=1e-5)


def test_mixing_is_off_by_default():
    images, targets = jnp.ones((2, 4, 4, 1)), jnp.eye(2)
    out, soft = train_lib.mix_batch(jax.random.key(0), images, targets, train_lib.MixConfig())
    assert out is images and soft is targets


def test_eval_step_counts_top1_top5_and_ignores_padding():
    model = jaxvit.create_model(
        None, num_classes=7, width=8, depth=0, num_heads=1, patch_size=4, pool="gap", class_token=False
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
    params = jax.tree_util.tree_map(lambda a: a + jax.random.normal(jax.random.key(1), a.shape), params)
    images = jax.random.normal(jax.random.key(2), (16, 4, 4, 3))
    labels = jnp.arange(16) % 7
    mask = jnp.array([1.0] * 12 + [0.0] * 4)
    sums = train_lib.eval_step(params, {"image": images, "label": labels, "mask": mask}, model=model)
    logits = np.asarray(model.apply({"params": params}, images))
    order = np.argsort(-logits, axis=-1)
    top1 = (order[:12, 0] == labels[:12]).sum()
    top5 = sum(int(labels[i]) in order[i, :5] for i in range(12))
    assert float(sums["count"]) == 12
    assert (float(sums["top1"]), float(sums["top5"])) == (top1, top5)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(sums["loss"]), -logp[np.arange(12), labels[:12]].sum(), rtol=1e-5)


@pytest.fixture(scope="module")
def compiled_step():
    tx, schedule = optim.make_optimizer(config(), 10)
    step = functools.partial(
        train_lib.train_step,
        model=MODEL.clone(dropout=0.1),
        tx=tx,
        schedule=schedule,
        cfg=train_lib.StepConfig(num_classes=5, mix=train_lib.MixConfig(mixup_alpha=0.2), ema_decay=0.9),
    )

    def fresh_state():  # the step donates its input state
        return train_lib.create_train_state(MODEL, tx, jax.random.key(0), (8, 8, 3), ema=True)

    @chex.assert_max_traces(n=1)
    def traced_once(state, batch, rng):
        return step(state, batch, rng)

    return jax.jit(traced_once, donate_argnums=0), fresh_state


def test_train_step_compiles_once_and_learns(compiled_step):
    step, fresh_state = compiled_step
    state = fresh_state()
    first = None
    for _ in range(6):
        state, metrics = step(state, batch(8, seed=0), jax.random.key(1))
        first = first if first is not None else float(metrics["loss"])
    assert int(state.step) == 6 and float(metrics["finite"]) == 1.0
    assert float(metrics["loss"]) < first
    # EMA trails the parameters
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, state.ema_params)
    assert max(jax.tree_util.tree_leaves(diff)) > 0


def test_non_finite_step_leaves_the_state_untouched(compiled_step):
    step, fresh_state = compiled_step
    state, _ = step(fresh_state(), batch(8), jax.random.key(1))
    before = jax.tree_util.tree_map(np.asarray, state.params)
    bad = batch(8)
    bad["image"] = bad["image"].at[0, 0, 0, 0].set(jnp.nan)
    state, metrics = step(state, bad, jax.random.key(1))
    assert float(metrics["finite"]) == 0.0
    chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, state.params), before)


def test_fsdp_spec_shards_the_largest_divisible_dimension():
    assert train_lib.fsdp_spec((768, 3072), 4) == P(None, "fsdp")
    assert train_lib.fsdp_spec((3072, 768), 4) == P("fsdp", None)
    assert train_lib.fsdp_spec((1000, 30), 4) == P("fsdp", None)
    assert train_lib.fsdp_spec((768,), 4) == P()  # too small to shard
    assert train_lib.fsdp_spec((769, 769), 4) == P()  # nothing divides
    assert train_lib.fsdp_spec((768, 3072), 1) == P()


def test_mesh_errors():
    with pytest.raises(ValueError, match="fsdp=3 does not divide"):
        train_lib.make_mesh(-1, 3, devices=jax.devices() * 4)
    assert train_lib.make_mesh(-1, 1).shape == {"data": len(jax.devices()), "fsdp": 1}


def test_learning_rate_metric_follows_the_schedule():
    c = config(lr=1.0, warmup_steps=4, schedule="linear")
    tx, schedule = optim.make_optimizer(c, 8)
    step = jax.jit(
        functools.partial(
            train_lib.train_step,
            model=MODEL,
            tx=tx,
            schedule=schedule,
            cfg=train_lib.StepConfig(num_classes=5),
        )
    )
    state = train_lib.create_train_state(MODEL, tx, jax.random.key(0), (8, 8, 3), ema=False)
    lrs = []
    for _ in range(3):
        state, metrics = step(state, batch(4), jax.random.key(0))
        lrs.append(float(metrics["learning_rate"]))
    np.testing.assert_allclose(lrs, [0.0, 0.25, 0.5], atol=1e-6)


def test_a_non_finite_update_from_finite_gradients_is_not_applied():
    """Adam with eps=0 divides 0 by 0 where a gradient is exactly 0 (the attention key bias)."""
    tx, schedule = optim.make_optimizer(config(eps=0.0, warmup_steps=0), 10)
    state = train_lib.create_train_state(MODEL, tx, jax.random.key(0), (8, 8, 3), ema=False)
    before = jax.tree_util.tree_map(np.asarray, state.params)
    step = functools.partial(
        train_lib.train_step, model=MODEL, tx=tx, schedule=schedule, cfg=train_lib.StepConfig(num_classes=5)
    )
    state, metrics = jax.jit(step)(state, batch(4), jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["finite"]) == 0.0
    chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, state.params), before)


def test_eval_step_breaks_ties_like_argmax_and_never_credits_nan():
    model = jaxvit.create_model(
        None, num_classes=4, width=8, depth=0, num_heads=1, patch_size=4, pool="gap", class_token=False
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]  # zero head: all logits tie
    batch = {"image": jnp.zeros((4, 4, 4, 3)), "label": jnp.arange(4), "mask": jnp.ones(4)}
    sums = train_lib.eval_step(params, batch, model=model)
    assert float(sums["top1"]) == 1.0  # only label 0 wins the tie, as argmax picks it
    nan_params = jax.tree_util.tree_map(lambda a: a * jnp.nan, params)
    sums = train_lib.eval_step(nan_params, batch, model=model)
    assert (float(sums["top1"]), float(sums["top5"])) == (0.0, 0.0)


def test_step_config_from_config_reads_every_field_into_its_place():
    c = base_config()
    c.num_classes = 7
    c.label_smoothing = 0.1
    c.augment.update(mixup_alpha=0.2, cutmix_alpha=0.3, switch_prob=0.4, mix_prob=0.6)
    c.ema_decay = 0.99
    c.grad_accum_steps = 3
    assert step_config_from_config(c) == train_lib.StepConfig(
        num_classes=7,
        label_smoothing=0.1,
        mix=train_lib.MixConfig(mixup_alpha=0.2, cutmix_alpha=0.3, switch_prob=0.4, prob=0.6),
        ema_decay=0.99,
        grad_accum_steps=3,
    )
