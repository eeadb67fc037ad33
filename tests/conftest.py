"""The suite runs on the CPU: with libtpu installed (the test extra brings it for tests/test_plan.py)
jax would otherwise look for a TPU in every process, and log that it found none."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
