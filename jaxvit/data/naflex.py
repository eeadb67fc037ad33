"""NaFlex inputs: images at their own aspect ratio, resized to a patch budget, as padded patch sequences.

An image of ``H x W`` is resized to the largest size whose sides are
multiples of the patch and whose patch grid ``h x w`` holds at most
``max_patches`` patches, keeping its aspect ratio as nearly as the multiples
allow (``size_for_budget``: big_vision's ``resize_to_sequence`` and
transformers' ``Siglip2ImageProcessor`` search the same scale). Its patches,
in ``(h w)`` order and each flattened ``(p q c)`` (``jaxvit.patchify``), are
padded to ``max_patches`` rows; the grid and a mask of the real rows go with
them. ``VisionTransformer`` takes the three as ``model.apply(v, patches,
grids=grids, mask=mask)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from jaxvit.data.augment import normalize
from jaxvit.data.preprocess import _RESAMPLE, load_image


def size_for_budget(
    height: int, width: int, patch_size: int, max_patches: int, eps: float = 1e-5
) -> tuple[int, int]:
    """``(H', W')``, multiples of ``patch_size``, for an ``height x width`` image: the largest scale
    found by bisection (to ``eps``) whose patch grid holds at most ``max_patches``; each side at
    least one patch."""
    if min(height, width, patch_size, max_patches) < 1:
        raise ValueError(
            f"size_for_budget needs positive sizes, got image {height}x{width}, patch {patch_size},"
            f" max_patches {max_patches}"
        )

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        if (side(scale, height) // patch_size) * (side(scale, width) // patch_size) <= max_patches:
            low = scale
        else:
            high = scale
    return side(low, height), side(low, width)


def patch_sequence(
    pixels: np.ndarray, patch_size: int, max_patches: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(H, W, C)`` pixels (sides multiples of ``patch_size``) -> ``patches`` ``(max_patches,
    p*p*C)`` float32 (the ``h * w`` patches then zeros), ``grid`` ``(2,)`` int32 and ``mask``
    ``(max_patches,)`` bool."""
    height, width, channels = pixels.shape
    h, w = height // patch_size, width // patch_size
    if h * patch_size != height or w * patch_size != width or h * w > max_patches:
        raise ValueError(
            f"an image of {height}x{width} is not a grid of {patch_size}-pixel patches within"
            f" {max_patches} patches"
        )
    rows = pixels.reshape(h, patch_size, w, patch_size, channels).transpose(0, 2, 1, 3, 4)
    patches = np.zeros((max_patches, patch_size * patch_size * channels), np.float32)
    patches[: h * w] = rows.reshape(h * w, -1)
    mask = np.arange(max_patches) < h * w
    return patches, np.asarray([h, w], np.int32), mask


def prepare(
    image: Image.Image,
    patch_size: int,
    max_patches: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    interpolation: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A PIL image -> ``(patches, grid, mask)`` of ``patch_sequence``: resized to ``size_for_budget``
    (``interpolation``, PIL's), scaled to [0, 1] and normalised by ``mean``/``std``, as
    ``Siglip2ImageProcessor`` prepares it (its defaults are these)."""
    if interpolation not in _RESAMPLE:
        raise ValueError(f"unknown interpolation {interpolation!r}: expected one of {sorted(_RESAMPLE)}")
    height, width = size_for_budget(image.height, image.width, patch_size, max_patches)
    pixels = np.asarray(image.resize((width, height), _RESAMPLE[interpolation]))
    pixels = normalize(pixels.reshape(height, width, -1), mean, std)
    return patch_sequence(pixels, patch_size, max_patches)


def stack(examples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """``prepare``'s outputs -> ``{"patches": (N, L, F), "grids": (N, 2), "mask": (N, L)}``."""
    if not examples:
        raise ValueError("stack needs at least one example")
    patches, grids, masks = zip(*examples, strict=True)
    return {"patches": np.stack(patches), "grids": np.stack(grids), "mask": np.stack(masks)}


def budget_of(model: Any, max_patches: int | None) -> int:
    """The patch budget for ``model``: ``max_patches``, else its table's (``posemb_grid``) patch count;
    ``ValueError`` for a model that does not take patch sequences (no ``posemb_grid``)."""
    if not getattr(model, "posemb_grid", None):
        raise ValueError(
            "max_patches is for NaFlex models (posemb_grid: a position table resized to each image's"
            " grid); this one takes images of one size"
        )
    if max_patches is None:
        h, w = (
            (model.posemb_grid, model.posemb_grid)
            if isinstance(model.posemb_grid, int)
            else model.posemb_grid
        )
        return h * w
    if max_patches < 1:
        raise ValueError(f"max_patches must be positive, got {max_patches}")
    return max_patches


def prepare_files(paths: Sequence[str | os.PathLike], bundle: Any, max_patches: int) -> dict[str, np.ndarray]:
    """Image files -> ``stack``'s batch at ``max_patches``, prepared as ``bundle`` (an
    ``InferenceBundle``) asks: its mean, std and interpolation."""
    patch = bundle.model.patch_size
    if not isinstance(patch, int):
        raise ValueError(f"NaFlex patch sequences take square patches, the model's are {patch}")
    examples = []
    for path in paths:
        try:
            examples.append(
                prepare(load_image(path), patch, max_patches, bundle.mean, bundle.std, bundle.interpolation)
            )
        except ValueError as e:
            raise ValueError(f"image {path}: {e}") from None
    return stack(examples)


# ---------------------------------------------------------------------------
# Training and evaluation pipelines: batches filled to a token budget
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenBudget:
    """Which sequence length and how many images each training step takes.

    Step ``s`` draws its length ``L`` from ``seq_lens`` by ``seed`` and ``s`` alone (a resumed run
    draws the same), and takes ``max_tokens // L`` images, rounded down to a multiple of
    ``multiple_of`` (the devices): a step of short sequences holds more images, and the step
    compiles once per length.
    """

    seq_lens: tuple[int, ...]
    max_tokens: int
    seed: int
    multiple_of: int = 1

    def __post_init__(self):
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise ValueError(f"naflex.seq_lens must be positive patch counts, got {list(self.seq_lens)}")
        if self.max_tokens // max(self.seq_lens) < self.multiple_of:
            raise ValueError(
                f"naflex.max_tokens={self.max_tokens} holds fewer than {self.multiple_of} (the batch multiple)"
                f" sequences of {max(self.seq_lens)} patches"
            )

    def length(self, step: int) -> int:
        """The sequence length of ``step``."""
        return self.seq_lens[int(np.random.default_rng([self.seed, 2, step]).integers(len(self.seq_lens)))]

    def batch(self, step: int) -> int:
        """The global batch of ``step``: ``max_tokens // length``, a multiple of ``multiple_of``."""
        return self.max_tokens // self.length(step) // self.multiple_of * self.multiple_of


def budget_from_config(config: Any, num_devices: int) -> TokenBudget | None:
    """The ``TokenBudget`` of ``config.naflex`` (None when ``seq_lens`` is empty: NaFlex is off).
    ``max_tokens`` 0 is ``batch_size`` sequences of the longest length."""
    settings = config.get("naflex") or {}
    seq_lens = tuple(settings.get("seq_lens") or ())
    if not seq_lens:
        return None
    if any(isinstance(n, bool) or not isinstance(n, int) for n in seq_lens):
        raise ValueError(f"naflex.seq_lens must be ints (patches per image), got {list(seq_lens)}")
    max_tokens = settings.get("max_tokens") or config.batch_size * max(seq_lens)
    multiple = settings.get("batch_multiple") or num_devices
    if multiple % num_devices:
        raise ValueError(
            f"naflex.batch_multiple={multiple} must be a multiple of the {num_devices} devices: each step's"
            " batch is split over them"
        )
    return TokenBudget(seq_lens, int(max_tokens), int(config.seed), int(multiple))


def _train_sequence(
    image: np.ndarray, rng: np.random.Generator, patch: int, length: int, flip: bool, mean: Any, std: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training image (uint8 ``(H, W, C)``) -> ``patch_sequence`` at ``length`` patches."""
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
    height, width = size_for_budget(image.shape[0], image.shape[1], patch, length)
    pil = Image.fromarray(np.ascontiguousarray(image.squeeze(-1) if image.shape[-1] == 1 else image))
    pixels = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
    return patch_sequence(normalize(pixels.reshape(height, width, -1), mean, std), patch, length)


class _TrainBatch(grain.transforms.Map):
    """Step -> this process's share of the step's batch (picklable, for worker processes)."""

    def __init__(
        self, source: Any, layout: Any, budget: TokenBudget, patch: int, flip: bool, mean: Any, std: Any
    ):
        self.source, self.layout, self.budget = source, layout, budget
        self.patch, self.flip, self.mean, self.std = patch, flip, mean, std
        self._starts: np.ndarray | None = None
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.budget.seed, epoch]).permutation(
                len(self.source)
            )
        return self._orders[epoch]

    def _start(self, step: int) -> int:
        # where each step's images begin in the stream of examples: the sum of the earlier batches
        if self._starts is None or len(self._starts) <= step:
            count = max(step + 1, 2 * (0 if self._starts is None else len(self._starts)))
            self._starts = np.concatenate([[0], np.cumsum([self.budget.batch(s) for s in range(count)])])
        return int(self._starts[step])

    def map(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        length, size = self.budget.length(step), self.budget.batch(step)
        local = size // self.layout.process_count
        first = self._start(step) + self.layout.process_index * local
        examples, labels = [], []
        for position in range(first, first + local):
            epoch, offset = divmod(position, len(self.source))
            image, label = self.source[int(self._order(epoch)[offset])]
            rng = np.random.default_rng([self.budget.seed, 1, position])
            examples.append(_train_sequence(image, rng, self.patch, length, self.flip, self.mean, self.std))
            labels.append(label)
        batch = stack(examples)
        return {
            "image": batch["patches"],
            "grids": batch["grids"],
            "patch_mask": batch["mask"],
            "label": np.asarray(labels, np.int32),
        }


def train_batches(
    source: Any,
    layout: Any,
    budget: TokenBudget,
    patch: int,
    *,
    flip: bool,
    mean: Any,
    std: Any,
    num_steps: int,
    workers: int = 0,
) -> Any:
    """Iterator of this process's shares of ``num_steps`` NaFlex batches: ``{"image": (B, L, p*p*C),
    "grids": (B, 2), "patch_mask": (B, L), "label": (B,)}``, ``L`` and ``B`` the step's
    (``TokenBudget``). ``get_state()``/``set_state()`` save and restore its position."""
    from jaxvit.data import pipeline

    if len(source) == 0:
        raise ValueError("the training source is empty")
    dataset = grain.MapDataset.range(num_steps).map(
        _TrainBatch(source, layout, budget, patch, flip, mean, std)
    )
    iter_dataset = dataset.to_iter_dataset()
    if workers > 0:
        iter_dataset = pipeline.with_workers(iter_dataset, workers)
    return iter(iter_dataset)


class _EvalExample(grain.transforms.Map):
    def __init__(self, source: Any, layout: Any, patch: int, length: int, mean: Any, std: Any):
        self.source, self.layout, self.patch, self.length, self.mean, self.std = (
            source,
            layout,
            patch,
            length,
            mean,
            std,
        )

    def map(self, local_index: int) -> dict[str, np.ndarray]:
        position = self.layout.global_position(int(local_index))
        valid = position < len(self.source)  # else the padding of the last batch: weight 0
        image, label = self.source[position if valid else 0]
        patches, grid, mask = _train_sequence(
            image, np.random.default_rng(0), self.patch, self.length, False, self.mean, self.std
        )
        return {
            "image": patches,
            "grids": grid,
            "patch_mask": mask,
            "label": np.int32(label if valid else 0),
            "mask": np.float32(valid),
        }


def eval_batches(source: Any, layout: Any, patch: int, length: int, mean: Any, std: Any) -> Any:
    """Every example once, in order, each at its aspect ratio within ``length`` patches, in global
    batches padded at the end (``mask`` 0 marks padding)."""
    num_batches = math.ceil(len(source) / layout.global_batch)
    dataset = grain.MapDataset.range(num_batches * layout.local_batch)
    dataset = dataset.map(_EvalExample(source, layout, patch, length, mean, std))
    return iter(dataset.batch(layout.local_batch, drop_remainder=True))
