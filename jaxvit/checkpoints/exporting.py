"""Writing jaxvit params in the peers' own layouts (``jaxvit.export``).

The format modules in ``jaxvit.checkpoints.formats`` write the files; this
module puts the params in their common form first (flat, unrolled, float32),
checks them against the model, and refuses a model with an architecture field
that the chosen writer does not carry (``registry.carries``), before anything
is written: a field left out would make the peer compute other numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np

from jaxvit import schema
from jaxvit.checkpoints import registry, timm_hub
from jaxvit.checkpoints.checkpoint import INCEPTION, Flat, Preprocessing
from jaxvit.checkpoints.fitting import check_keys, sincos_table, target_shapes
from jaxvit.layers.scan import scan_to_unrolled
from jaxvit.model import VisionTransformer
from jaxvit.sizes import square_grid, to_pair

ImageSize = int | tuple[int, int]
FORMATS = tuple(registry.EXPORTS)


def flat_params(params: Mapping[str, Any]) -> Flat:
    """Params (or variables with a ``params`` entry), scanned or not -> flat, unrolled float32 arrays."""
    params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else dict(params)
    if set(params) == {"params"}:
        params = dict(params["params"])
    if "blocks" in params.get("encoder", {}):
        params = scan_to_unrolled(params)
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in flat.items()}


def _image_size(flat: Flat, model: VisionTransformer, image_size: ImageSize | None) -> tuple[int, int]:
    if image_size is not None:
        return to_pair(image_size)
    p, q = to_pair(model.patch_size)
    posemb = flat.get("pos_embed/embedding")
    if posemb is None:
        return (224, 224)
    grid = square_grid(posemb.shape[1] - model.num_posemb_prefix_tokens)
    if grid is None:
        raise ValueError(
            f"the position embedding {posemb.shape} is not a square grid: pass image_size=(h, w)"
        )
    return (grid[0] * p, grid[1] * q)


def check_carried(format: str, writer: ModuleType, model: VisionTransformer) -> None:
    """Raises ``ValueError`` naming each architecture field of ``model`` that ``writer`` does not carry."""
    fields = schema.differs_from_default(model)
    left_out = {n: v for n, v in fields.items() if n not in registry.carries(writer)}
    if not left_out:
        return
    others = [
        f
        for f in registry.EXPORTS
        if f != format and set(fields) <= registry.carries(registry.exporter(f, model))
    ]
    hint = f"; format={others[0]!r} carries all of the model's fields" if others else ""
    raise ValueError(
        f"format={format!r} writes {writer.TARGET}, which cannot express "
        + ", ".join(f"{n}={v!r}" for n, v in left_out.items())
        + f" (it carries {', '.join(sorted(writer.CARRIES))} besides the sizes){hint}"
    )


def export(
    params: Mapping[str, Any],
    path: str | os.PathLike,
    format: str = "npz",
    *,
    model: VisionTransformer,
    image_size: ImageSize | None = None,
    labels: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
) -> Path:
    """Writes ``params`` of ``model`` for a peer's own loader; returns the path written.

    ``format="npz"``: the google-research/vision_transformer layout (what
    timm's ``_load_weights`` reads). ``"timm"``: a timm ``VisionTransformer``
    state dict as safetensors; its metadata holds the matching timm kwargs
    (``timm_kwargs``) and the jaxvit model fields. ``"hf"``: a folder with
    ``config.json`` + ``model.safetensors`` for the model's family in
    transformers: ``DeiTForImageClassificationWithTeacher`` / ``DeiTModel``
    with a distillation token, ``Dinov2Model`` / ``Dinov2WithRegistersModel``
    with LayerScale, registers or SwiGLU, else ``ViTForImageClassification``
    (``labels`` name the classes). ``image_size`` defaults to the position
    embedding's square grid. Scanned or unrolled params both work. A
    ``"timm"`` path without the ``.safetensors`` suffix is a timm hub folder:
    ``model.safetensors`` and a ``config.json`` (architecture, ``model_args``,
    and ``pretrained_cfg`` from ``preprocessing``, by default jaxvit's
    training one) that ``timm.create_model("local-dir:PATH", pretrained=True)`` builds.

    Before anything is written, a model with an architecture field that the
    chosen layout cannot express (see ``check_carried``), or a value of one
    that it cannot, is refused with a ``ValueError`` naming the field and value.
    """
    if format not in registry.EXPORTS:
        raise ValueError(f"unknown export format {format!r}: expected one of {FORMATS}")
    writer = registry.exporter(format, model)
    check_carried(format, writer, model)
    path = Path(path)
    flat = flat_params(params)
    size = _image_size(flat, model, image_size)
    check_keys(flat, {}, target_shapes(model, size), "the params to export")
    if model.posemb in schema.SINCOS_POSEMBS and not writer.HAS_SINCOS:
        # The peer has no fixed sin-cos option; a learned table with these values computes the same.
        p, q = to_pair(model.patch_size)
        flat["pos_embed/embedding"] = sincos_table(model, (size[0] // p, size[1] // q))
    if format == "timm" and path.suffix != ".safetensors":
        return _write_timm_folder(writer, flat, model, size, path, labels, preprocessing or INCEPTION)
    return writer.write(flat, model, size, path, labels)


def _write_timm_folder(
    writer: ModuleType,
    flat: Flat,
    model: VisionTransformer,
    size: tuple[int, int],
    folder: Path,
    labels: Sequence[str] | None,
    pre: Preprocessing,
) -> Path:
    """A timm hub folder: the writer's safetensors, and a ``config.json`` from its metadata."""
    from safetensors import safe_open

    folder.mkdir(parents=True, exist_ok=True)
    weights = writer.write(flat, model, size, folder / "model.safetensors", labels)
    with safe_open(str(weights), framework="numpy") as f:
        metadata = f.metadata()
    model_args = json.loads(metadata["timm_kwargs"])
    config = timm_hub.folder_config(metadata["timm_model"], model_args, model, size, labels, pre)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    return folder
