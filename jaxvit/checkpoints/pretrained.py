"""Pretrained weights in: the peers' checkpoints -> jaxvit params.

Reading goes in three steps:

1. ``read_checkpoint(path)`` reads the file(s) safely (``jaxvit.safety.files``)
   and lets the first format of ``jaxvit.checkpoints.registry`` that claims them
   rename the keys into jaxvit's names: google-research/vision_transformer /
   AugReg ``.npz``, big_vision ``.npz`` (also scanned), a timm state dict
   (safetensors or ``.pth``), or a Hugging Face folder (ViT, DeiT, DINOv2,
   DINOv2 with registers; told apart by ``config.json``'s ``model_type``).
2. ``fit_to_model(checkpoint, model, image_size)`` (``jaxvit.checkpoints.fitting``)
   checks it against the model's parameter shapes, fuses attention, adapts
   the position embedding (class slot, grid) and the head.
3. ``load_pretrained(path, model)`` does both.

The other directions live beside: ``jaxvit.checkpoints.exporting.export`` writes the
peers' layouts, ``jaxvit.checkpoints.architecture.model_from_checkpoint`` tells the model
from a checkpoint, ``jaxvit.checkpoints.inference.load_for_inference`` does all of it for
classifying images. Their names stay importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxvit import compat
from jaxvit.checkpoints import hub, registry
from jaxvit.checkpoints.checkpoint import Checkpoint
from jaxvit.checkpoints.fitting import fit_to_model
from jaxvit.families.vit import hf as hf_vit
from jaxvit.model import VisionTransformer
from jaxvit.safety import files

ImageSize = int | tuple[int, int]


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a checkpoint file, folder or hub id (``hf-hub:ORG/NAME[@REV]``, see
    ``jaxvit.checkpoints.hub``) into jaxvit's names (no model needed)."""
    path = hub.resolve(path)
    if path.is_dir():
        if (path / "checkpoints").is_dir():
            raise ValueError(
                f"{path} is a training workdir, not a pretrained checkpoint: use jaxvit.load_for_inference"
                " (or jaxvit.checkpoints.workdir.restore_params) to read it"
            )
        return registry.folder_format(path).read_folder(path)
    kind, arrays, metadata = files.read_weights(path)
    kind = "npz" if kind == "npz" else "state_dict"
    return registry.format_for(kind, arrays).read(path, arrays, metadata)


def load_pretrained(
    path: str | os.PathLike,
    model: VisionTransformer,
    image_size: ImageSize = 224,
    *,
    checkpoint_grid: tuple[int, int] | None = None,
    patch_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """A checkpoint file or folder -> ``params`` for ``model`` (``variables["params"]``).

    The format is told from the content: VT/AugReg or big_vision ``.npz``
    (unrolled or scanned), a timm state dict (``.safetensors``, or
    ``.pth``/``.bin`` when PyTorch is installed), a Hugging Face ViT folder.
    ``image_size`` (int or ``(h, w)``) fixes the model's patch grid; a
    position embedding of another grid is resampled bilinearly (its grid is
    taken as square unless the checkpoint says otherwise or
    ``checkpoint_grid`` is given). A classifier of another class count is
    replaced by a zero-initialised one; ``pre_logits`` is dropped when the
    model has no ``representation_size``. Any other mismatch raises
    ``ValueError`` naming the keys and shapes. ``patch_size`` (the model's)
    resamples a patch embedding of another size as FlexiViT does
    (``jaxvit.resample_patch_embed``).
    """
    return fit_to_model(
        read_checkpoint(path), model, image_size, checkpoint_grid=checkpoint_grid, patch_size=patch_size
    )


def model_from_hf_config(
    folder_or_config: str | os.PathLike | Mapping[str, Any], **overrides: Any
) -> VisionTransformer:
    """A Hugging Face ViT ``config.json`` (its folder, path or dict) -> the matching ``VisionTransformer``."""
    if isinstance(folder_or_config, Mapping):
        config = dict(folder_or_config)
    else:
        path = Path(folder_or_config)
        config = files.read_json(path / "config.json" if path.is_dir() else path)
    return hf_vit.model_from_config(config, **overrides)


def __getattr__(name: str) -> Any:
    # Names of jaxvit 0.1, when all of the interop code lived in this module (see jaxvit.compat).
    return compat.moved_name(__name__, name)
