"""Helpers shared by the benchmarks: thread pinning, interleaved timing, tables, machine info.

Timing rule used everywhere: competitors are measured in the same process,
interleaved (A B A B ...) after warm-up, so that load from other work on a
shared machine hits both sides alike; we report medians and per-pair ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def pin_threads(threads: int | None) -> int:
    """Restricts this process to ``threads`` CPUs; returns the count in use.

    Must run before jax (or torch) is imported: XLA:CPU sizes its intra-op
    thread pool from the CPUs the process may run on (its scheduling
    affinity), so the affinity is how we set XLA's thread count. PyTorch gets
    the same number through ``torch.set_num_threads`` (see ``torch_threads``).
    """
    available = sorted(os.sched_getaffinity(0))
    if threads is None:
        return len(available)
    if not 1 <= threads <= len(available):
        raise ValueError(f"--threads must be between 1 and {len(available)} (CPUs available), got {threads}")
    os.sched_setaffinity(0, available[:threads])
    return threads


def torch_threads(threads: int) -> None:
    """Gives PyTorch ``threads`` intra-op threads (and one inter-op thread)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def time_call(fn: Callable[[], Any], iters: int = 1) -> float:
    """Seconds per call of ``fn`` (which must block until its result is ready), over ``iters`` calls."""
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1, iters: int = 1
) -> dict[str, list[float]]:
    """Times each of ``fns`` ``repeats`` times, alternating A B A B ..., after ``warmup`` calls each.

    Returns ``{name: [seconds per call, one per repeat]}``; entry ``i`` of every
    list comes from the same round, so ratios can be taken pairwise.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, iters))
    return times


def pair_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios ``numerator[i] / denominator[i]``."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts -> a GitHub markdown table; floats get 3 significant digits."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU model name as ``lscpu`` reports it (or ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# The instruction sets that decide which matmul kernels the frameworks can use.
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """The matmul-relevant instruction sets this CPU reports in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in _ISA_FLAGS if flag in flags]


def xla_dot_library() -> str:
    """Which library XLA:CPU hands a plain fp32 matmul to: the fusion kind in the compiled HLO."""
    import re

    import jax
    import jax.numpy as jnp

    a = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    text = jax.jit(jnp.matmul).lower(a, a).compile().as_text()
    kinds = sorted(set(re.findall(r'kind":"__([a-z]+)_fusion"', text)))
    return "+".join(kinds) or "xla (eigen/own kernels)"


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers were measured on, including the load average at the start."""
    import jax

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": " ".join(cpu_flags()),
        "xla_dots": xla_dot_library(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "threads": threads,
        "load_average_1m": os.getloadavg()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # glibc.malloc.hugetlb=1 changes step times on CPU a lot (see README.md)
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def rss_bytes() -> int:
    """The current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS in a background thread; ``peak`` is the largest seen.

    Used as ``with PeakRSS() as m: ...; m.peak - baseline``. The interval is
    short next to a training step, so the step's peak is caught.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def describe_machine(machine: dict) -> str:
    """The part of a table's caption that says where it ran."""
    return (
        f"{machine['threads']} threads, {machine['cpu']} ({machine.get('cpu_flags', '')}),"
        f" XLA dots in {machine.get('xla_dots', '?')}, load {machine['load_average_1m']:.2f} at start,"
        f" GLIBC_TUNABLES={machine['glibc_tunables'] or '(unset)'}"
    )


def print_report(result: Mapping[str, Any], setting: str, as_json: bool) -> None:
    """Prints ``result`` (``machine``, ``matmul_peak_gflops``, ``rows``) as JSON, or as a caption
    (``setting`` and the machine), the matmul peaks of the run and a markdown table."""
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"{setting}, {describe_machine(result['machine'])}")
    peak = result["matmul_peak_gflops"]
    print(f"fp32 2048^3 matmul peak in this run (GFLOP/s): jax {peak['jax']:.0f}, torch {peak['torch']:.0f}")
    print(markdown_table(result["rows"]))


def matmul_peaks() -> dict[str, float]:
    """Best of 10 fp32 2048^3 matmuls, in GFLOP/s, for JAX and PyTorch."""
    import jax
    import jax.numpy as jnp
    import torch

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    ta = torch.randn(n, n)
    times = interleaved(
        {"jax": lambda: mm(a).block_until_ready(), "torch": lambda: torch.mm(ta, ta)}, repeats=10
    )
    return {k: 2 * n**3 / min(v) / 1e9 for k, v in times.items()}


# jaxvit's size names -> timm's, for vit_<size>_patch<p>_224
TIMM_NAMES = {"Ti": "tiny", "S": "small", "M": "medium", "B": "base", "L": "large", "H": "huge"}


def timm_name(variant: str) -> str:
    """``"Ti/16"`` -> ``"vit_tiny_patch16_224"``."""
    size, _, patch = variant.partition("/")
    if size not in TIMM_NAMES or not patch.isdigit():
        raise ValueError(f"no timm model for variant {variant!r}: expected one of {list(TIMM_NAMES)}/<patch>")
    return f"vit_{TIMM_NAMES[size]}_patch{patch}_224"
