"""The training loop's small pieces, without training: the train metrics accumulator
and saving a step only once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvit.training import checkpointing
from jaxvit.training.trainer import NonFiniteLossError, TrainMetricsAccumulator


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def step_metrics(loss, accuracy=0.5, grad_norm=1.0, learning_rate=0.1, finite=1.0):
    values = dict(
        loss=loss, accuracy=accuracy, grad_norm=grad_norm, learning_rate=learning_rate, finite=finite
    )
    return {k: np.float32(v) for k, v in values.items()}


def test_summary_averages_the_steps_and_takes_the_last_learning_rate():
    clock = FakeClock()
    meter = TrainMetricsAccumulator(batch_size=8, start_step=0, clock=clock)
    for step, (loss, acc, norm, lr) in enumerate([(1, 0.25, 2, 0.1), (2, 0.5, 4, 0.2), (6, 0.75, 9, 0.3)], 1):
        meter.add(step, step_metrics(loss, acc, norm, lr))
    clock.now += 2.0
    summary = meter.summarize(3)
    assert summary["train/loss"] == pytest.approx(3.0)
    assert summary["train/accuracy"] == pytest.approx(0.5)
    assert summary["train/grad_norm"] == pytest.approx(5.0)
    assert summary["learning_rate"] == pytest.approx(0.3)
    assert summary["images_per_sec"] == pytest.approx(3 * 8 / 2.0)


def test_images_per_sec_and_data_wait_cover_only_the_time_since_the_last_summary():
    clock = FakeClock()
    meter = TrainMetricsAccumulator(batch_size=4, start_step=10, clock=clock)  # resumed at step 10
    for step in (11, 12):
        with meter.waiting_for_data():
            clock.now += 0.5
        clock.now += 1.5  # the step itself
        meter.add(step, step_metrics(1.0))
    first = meter.summarize(12)
    assert first["images_per_sec"] == pytest.approx(2 * 4 / 4.0)
    assert first["train/data_wait"] == pytest.approx(1.0 / 4.0)

    clock.now += 6.0  # e.g. an evaluation: counts towards the next window
    assert meter.summarize(12) is None  # nothing new: the window goes on
    for step in (13, 14, 15):
        with meter.waiting_for_data():
            clock.now += 1.0
        meter.add(step, step_metrics(1.0))
    second = meter.summarize(15)
    assert second["images_per_sec"] == pytest.approx(3 * 4 / 9.0)
    assert second["train/data_wait"] == pytest.approx(3.0 / 9.0)


def test_a_non_finite_step_raises_naming_the_first_such_step():
    meter = TrainMetricsAccumulator(batch_size=2, start_step=0, clock=FakeClock())
    meter.add(1, step_metrics(1.0))
    meter.add(2, step_metrics(float("nan"), finite=0.0))
    meter.add(3, step_metrics(float("inf"), finite=0.0))
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \(loss=nan"):
        meter.summarize(3)


def test_saving_the_step_last_saved_or_restored_does_nothing(tmp_path):
    state = {"w": jnp.arange(3.0)}
    rng = jax.random.key(0)
    with checkpointing.Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, state, rng, {"position": 1})
        checkpointer.save(1, {"w": jnp.zeros(3)}, rng, {"position": 99})  # orbax would refuse this
        assert checkpointer.latest.all_steps() == [1]
    with checkpointing.Checkpointer(tmp_path, async_save=False) as checkpointer:
        restored_state, _, data_state, step = checkpointer.restore_latest(state, rng)
        np.testing.assert_array_equal(restored_state["w"], [0.0, 1.0, 2.0])
        assert (step, data_state) == (1, {"position": 1})
        checkpointer.save(1, state, rng, {"position": 1})  # a rerun of a finished run
        assert checkpointer.latest.all_steps() == [1]
