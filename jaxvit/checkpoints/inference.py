"""Everything needed to classify images with a checkpoint: ``load_for_inference(path)``.

The model is built from the checkpoint alone (``jaxvit.checkpoints.architecture``), the
params are fitted to it (``jaxvit.checkpoints.fitting``), and the bundle says how the
checkpoint's origin prepared its images (``PREPROCESSING``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import flax

from jaxvit.checkpoints import hub, registry
from jaxvit.checkpoints.architecture import model_from_checkpoint
from jaxvit.checkpoints.checkpoint import INCEPTION, Preprocessing, log
from jaxvit.checkpoints.fitting import fit_to_model, with_checkpoint_grid
from jaxvit.checkpoints.pretrained import read_checkpoint
from jaxvit.layers.posemb import resample_posemb
from jaxvit.layers.scan import scan_to_unrolled, unrolled_to_scan
from jaxvit.model import MODEL_FIELDS, VisionTransformer
from jaxvit.safety import validate
from jaxvit.sizes import to_pair

ImageSize = int | tuple[int, int]

# How each origin prepared its images; a training workdir's own data config overrides its entry.
PREPROCESSING: dict[str, Preprocessing] = {
    **{fmt.NAME: fmt.PREPROCESSING for fmt in registry.FORMATS},
    "workdir": INCEPTION,
}
ORIGINS = tuple(PREPROCESSING)


@dataclasses.dataclass(frozen=True, eq=False)
class InferenceBundle:
    """Everything needed to classify images with a checkpoint.

    ``image_size`` is ``(h, w)``; images are scaled to [0, 1] then
    normalised with ``mean``/``std`` (per RGB channel). ``crop_pct`` < 1 means
    resize the shorter side to ``size / crop_pct`` and center-crop (timm);
    1.0 means resize the whole image to ``image_size``, unless
    ``center_crop`` (CLIP: the shorter side to the size, then center-crop). ``origin`` is one of
    ``ORIGINS``; ``labels`` the class names, when the checkpoint has them.
    """

    model: VisionTransformer
    params: Any
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...] | None
    origin: str
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    center_crop: bool = False


def read_labels(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names from a text file, one per line in class-index order (blank lines skipped)."""
    text = validate.read_text(path, "labels file")
    return tuple(line.rstrip("\r") for line in text.split("\n") if line.strip())


def _resize_posemb_tree(
    params: Any, model: VisionTransformer, old: tuple[int, int], new: tuple[int, int]
) -> Any:
    if model.posemb != "learn":
        return params
    p, q = to_pair(model.patch_size)
    params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
    posemb = params["pos_embed"]["embedding"]
    log.info("resampling the position embedding from %s to %s pixels", old, new)
    resized = resample_posemb(
        posemb, (new[0] // p, new[1] // q), (old[0] // p, old[1] // q), model.num_posemb_prefix_tokens
    )
    return {**params, "pos_embed": {**params["pos_embed"], "embedding": resized}}


def _with_overrides(model: VisionTransformer, params: Any, overrides: dict[str, Any]) -> tuple[Any, Any]:
    unknown = sorted(set(overrides) - set(MODEL_FIELDS))
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}: valid fields are {sorted(MODEL_FIELDS)}")
    new = model.clone(**overrides)
    new.check_config()
    if new.scan != model.scan:
        params = unrolled_to_scan(params) if new.scan else scan_to_unrolled(params)
    return new, params


def _workdir_bundle(
    workdir: Path, image_size: ImageSize | None, overrides: dict[str, Any]
) -> InferenceBundle:
    from jaxvit.checkpoints.workdir import restore_params  # orbax; loaded only for workdirs

    model, params, config = restore_params(str(workdir))
    model, params = _with_overrides(model, params, overrides)
    where = f"{workdir / 'config.json'}"
    size = to_pair(validate.size_field(config, "image_size", where, default=224))
    if image_size is not None and to_pair(image_size) != size:
        params = _resize_posemb_tree(params, model, size, to_pair(image_size))
        size = to_pair(image_size)
    labels_path = workdir / "labels.txt"
    # as the run's own evaluation prepared its inputs
    data = config.get("data", {})
    if not isinstance(data, dict):
        raise ValueError(f"{where}: data must be a JSON object, got {type(data).__name__}")
    mean, std = validate.channel_stats(
        data.get("mean", (0.5,)), data.get("std", (0.5,)), model.num_channels, f"{where}: data"
    )
    labels = None
    if labels_path.exists():
        labels = read_labels(validate.member_path(workdir, labels_path.name, "labels file"))
    return InferenceBundle(
        model=model,
        params=params,
        image_size=size,
        mean=mean,
        std=std,
        labels=labels,
        origin="workdir",
        crop_pct=validate.float_field(
            data,
            "crop_fraction",
            f"{where}: data",
            default=PREPROCESSING["workdir"].crop_pct,
            lo=0.0,
            hi=1.0,
            lo_open=True,
        ),
        interpolation=PREPROCESSING["workdir"].interpolation,
    )


def load_for_inference(
    path: str | os.PathLike,
    image_size: ImageSize | None = None,
    *,
    checkpoint_grid: tuple[int, int] | None = None,
    **model_overrides: Any,
) -> InferenceBundle:
    """A checkpoint file, folder, hub id (``hf-hub:ORG/NAME[@REV]``) or training workdir -> an
    ``InferenceBundle``.

    The model is built from the checkpoint itself (``model_from_checkpoint``;
    ``model_overrides`` set fields the weights cannot tell, e.g.
    ``num_heads`` of a foreign timm file, or ``dtype``). ``image_size``
    defaults to the checkpoint's; another size resamples the position embedding.
    ``checkpoint_grid`` states the patch grid of a file that cannot tell it
    (see ``load_pretrained``).
    """
    path = hub.resolve(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir() and (path / "checkpoints").is_dir():
        return _workdir_bundle(path, image_size, model_overrides)
    if image_size is not None:
        image_size = validate.size_field({"image_size": image_size}, "image_size", "load_for_inference")
    ckpt = read_checkpoint(path)
    if checkpoint_grid is not None:
        ckpt = with_checkpoint_grid(ckpt, checkpoint_grid)
    model, native = model_from_checkpoint(ckpt, **model_overrides)
    size = to_pair(image_size) if image_size is not None else native
    params = fit_to_model(ckpt, model, size)
    fmt = registry.by_origin(ckpt.origin)
    labels_of = registry.hook(fmt, "labels")
    labels = labels_of(ckpt) if labels_of else None
    if labels is None and ckpt.config.get("labels"):
        labels = validate.str_list(ckpt.config["labels"], "labels", ckpt.path)
    if labels is not None and model.num_classes and len(labels) != model.num_classes:
        raise ValueError(f"{ckpt.path}: {len(labels)} labels for a classifier of {model.num_classes} classes")
    # A format that tells its families apart (timm's CLIP and SigLIP towers) says per checkpoint.
    preprocessing_of = registry.hook(fmt, "preprocessing")
    pre = preprocessing_of(ckpt) if preprocessing_of else PREPROCESSING[ckpt.origin]
    # RGB statistics serve a 1-channel model through their average (a grayscale image).
    mean, std = validate.channel_stats(pre.mean, pre.std, model.num_channels, f"{ckpt.origin} preprocessing")
    return InferenceBundle(
        model=model,
        params=params,
        image_size=size,
        mean=mean,
        std=std,
        labels=labels,
        origin=ckpt.origin,
        crop_pct=pre.crop_pct,
        interpolation=pre.interpolation,
        center_crop=pre.center_crop,
    )
