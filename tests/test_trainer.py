"""The training loop's small pieces, without training."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxvit import checkpointing


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
