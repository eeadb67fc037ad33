"""jaxvit.host: glibc malloc keeps freed memory, so repeated large allocations stop page-faulting.

The settings are per process and cannot be undone, so each case runs in a
fresh interpreter and reports the minor page faults of each of 16 calls of an
XLA:CPU computation whose temporary buffer is well above glibc's 32 MiB mmap
threshold. With the settings the heap needs a few calls to reach a layout in
which the freed blocks fit the next call's (glibc places aligned blocks with
some slack); after that no call faults.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from jaxvit import host

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or host._glibc() is None, reason="glibc only"
)

_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    from jaxvit import host
    applied = host.keep_freed_memory() if sys.argv[1] == "on" else False
    import jax, jax.numpy as jnp

    def faults(fn):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


    x = jnp.ones((8192, 1024), jnp.float32)  # 32 MiB; tanh(x) is a 32 MiB temporary
    f = jax.jit(lambda x: jnp.tanh(x).T @ jnp.tanh(x + 1.0))
    compiled = f.lower(x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    xla_faults = [faults(lambda: compiled(x).block_until_ready()) for _ in range(16)]
    print(json.dumps(dict(applied=applied, xla=xla_faults, temp=temp)))
    """
)


def _probe(mode: str) -> dict:
    env_cmd = [sys.executable, "-c", _PROBE, mode]
    done = subprocess.run(env_cmd, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes() -> dict[str, dict]:
    return {mode: _probe(mode) for mode in ("off", "on")}


def test_xla_temporary_is_above_the_mmap_threshold(probes):
    # the XLA case only tests something if its buffers are ones glibc would mmap
    assert probes["on"]["temp"] >= 48 * 2**20


def test_without_it_every_large_allocation_faults_its_pages_in(probes):
    off = probes["off"]
    assert not off["applied"]
    # a fresh mmap each call: about one fault per 4 KiB page of the 64 MiB temporary
    assert min(off["xla"][-4:]) > 0.5 * off["temp"] / 4096


def test_with_it_freed_memory_is_reused_without_faults(probes):
    on = probes["on"]
    assert on["applied"]
    assert sum(on["xla"][-4:]) < 0.02 * on["temp"] / 4096


def test_mode_checks(monkeypatch):
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        host.configure_for_cpu_training("yes")
    assert host.configure_for_cpu_training("off") is False
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert host.accelerator_plugins_installed()
    assert host.configure_for_cpu_training("auto") is False  # leaves GPU hosts alone
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not host.accelerator_plugins_installed()
