"""Host-process settings that make XLA:CPU training fast: glibc malloc keeps its freed memory.

Why: XLA:CPU allocates one temporary buffer per call of a compiled function
(4.4 GiB for a ViT-S/16 training step at batch 32) with ``malloc``. glibc
serves blocks that large with a fresh ``mmap`` and gives them back with
``munmap`` on ``free``, so every step page-faults its whole working memory in
again: 1.2 million minor faults and about 2 s of kernel time per S/16 step on
2 cores. ``keep_freed_memory`` makes glibc take large blocks from its heap
and keep them there when they are freed, so the next step reuses the same,
already mapped pages (0 faults; the step goes from 4.3 s to 2.9 s, see
benchmarks/README.md).

The price: memory freed by the process is not returned to the OS until it
exits (the resident size stays at its peak), and all threads share one malloc
arena. That suits a training or benchmark process; it is why this is a
function ``train.py`` calls, not something importing jaxvit does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # musl and other C libraries have no mallopt (or one that ignores these parameters)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def accelerator_plugins_installed() -> bool:
    """Whether JAX may pick a GPU or TPU backend: ``JAX_PLATFORMS`` names one, or a plugin is installed.

    Decided without starting a JAX backend, because ``keep_freed_memory`` must
    run before the CPU client creates its threads.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    if importlib.util.find_spec("libtpu") is not None:
        return True
    return any(True for _ in importlib.metadata.entry_points(group="jax_plugins"))


def keep_freed_memory() -> bool:
    """Makes glibc malloc reuse freed memory instead of unmapping it; returns whether it applied.

    Sets ``M_ARENA_MAX=1`` (one arena: other threads' large blocks would
    otherwise fall back to ``mmap``), ``M_MMAP_MAX=0`` (large blocks come from
    the heap) and disables heap trimming. Call it before JAX runs anything, so
    that XLA's threads start on the shared arena. Returns False, changing
    nothing, where the C library is not glibc (macOS, musl).
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = True
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)):
        # mallopt takes an int; -1 becomes SIZE_MAX for the trim threshold: never trim
        ok &= bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    return ok


def configure_for_cpu_training(mode: str = "auto") -> bool:
    """``train.py``'s choice: ``"on"`` always, ``"off"`` never, ``"auto"`` when JAX will run on the CPU.

    Returns whether ``keep_freed_memory`` was applied.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"host malloc mode must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off" or (mode == "auto" and accelerator_plugins_installed()):
        return False
    return keep_freed_memory()
