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
