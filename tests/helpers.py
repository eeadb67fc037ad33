"""Small builders shared by the tests."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_folder(root, classes=("cat", "dog"), per_class=3, size=(12, 10), split="train"):
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.{ext}"))
    return root


def relative_error(a, b) -> float:
    """The largest absolute difference of two arrays of one shape, over the largest magnitude of ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(x: np.ndarray):
    """NHWC images -> the NCHW torch tensor the peers take."""
    import torch

    return torch.from_numpy(x).permute(0, 3, 1, 2)


def perturb_torch(module, seed: int, scale: float = 0.02):
    """``module`` in eval mode with every parameter moved by ``scale * N(0, 1)``, so that no zero
    init hides a weight a converter leaves out."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module.eval()


def train_command(config: str, workdir, *args) -> list[str]:
    """``python train.py --config CONFIG --workdir WORKDIR ARGS...`` from the repository root."""
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        f"--config={config}",
        f"--workdir={workdir}",
        *args,
    ]


def run_train(config: str, workdir, *args, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``train.py`` in a subprocess (``env`` added to this one's), its output captured."""
    return subprocess.run(
        train_command(config, workdir, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def params_of(workdir):
    """The parameters of a training workdir's newest checkpoint."""
    from jaxvit.training import checkpointing

    return checkpointing.restore_params(str(workdir))[1]


def run_two_processes(config: str, workdir, *args, timeout: int = 300) -> None:
    """``train.py`` as two processes of one run on this machine (loopback, gloo); asserts both end well."""
    import portpicker

    port = portpicker.pick_unused_port()
    cmd = [
        *train_command(config, workdir, *args),
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, f"--process_id={i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]


def max_abs_diff(a, b) -> float:
    """The largest absolute difference between two trees of arrays."""
    import jax

    diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))
