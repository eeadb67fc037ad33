"""Small builders shared by the tests."""

import os

import numpy as np
from PIL import Image


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
