"""Train a Vision Transformer: ``python train.py [--config configs/<name>.py] [--config.<key>=<value>] [--workdir DIR]``.

Rerunning the same command on the same workdir resumes from its newest
checkpoint. The logic lives in ``jaxvit.training.trainer``; this file parses flags.
"""

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxvit.training import configs

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
if __name__ == "__main__":
    # config_flags parses --config.<key> while defining the flag; check the keys first so
    # that a typo fails with the list of valid keys instead of a traceback.
    try:
        configs.check_overrides(sys.argv[1:], _DEFAULT_CONFIG)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Training config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "workdirs/default", "Directory for checkpoints, metrics and config."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Index of this process in a multi-process run.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax and JAX log every save step at INFO through absl; keep the console to warnings
    # and jaxvit's own messages.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jaxvit").setLevel(logging.INFO)
    import jax

    if _COORDINATOR.value:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from jaxvit.training import trainer

    try:
        metrics = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        # Config, data and workdir errors name what is wrong: the message is the whole story.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if "preempted_at_step" in metrics:
        print(f"preempted: saved at step {int(metrics['preempted_at_step'])}")
        return
    print(
        f"final test accuracy: {metrics['eval/top1']:.4f} (top-5 {metrics['eval/top5']:.4f}, loss {metrics['eval/loss']:.4f})"
    )


if __name__ == "__main__":
    app.run(main)
