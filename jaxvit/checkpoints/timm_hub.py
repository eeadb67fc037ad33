"""timm's hub folders: ``config.json`` + ``model.safetensors``, as every ``timm/*`` repository holds them.

``config.json`` names the ``architecture`` (a registered timm model, with a
``.tag`` after it), ``num_classes``, ``global_pool``, optional ``model_args``
(the ``create_model`` keyword arguments the model was made with) and the
``pretrained_cfg``: input size, mean, std, crop, interpolation. timm builds
the model as ``create_model(architecture, **model_args)`` with
``pretrained_cfg``'s class count; jaxvit reads the same facts, so nothing
the config states is guessed (the readers: ``jaxvit.families.vit.timm``,
``jaxvit.families.dinov3.timm``, ``jaxvit.families.beit.timm``). ``folder_config`` writes such a config,
so that ``timm.create_model("local-dir:FOLDER", pretrained=True)`` builds
jaxvit's export with its preprocessing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxvit import schema
from jaxvit.checkpoints.checkpoint import Flat, Preprocessing
from jaxvit.safety import files, validate
from jaxvit.sizes import to_pair

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# the resize filters jaxvit's preprocessing has (timm also names nearest, lanczos, ...)
INTERPOLATIONS = ("bilinear", "bicubic")


def is_timm_config(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` is timm's (an ``architecture``) rather than transformers' (``model_type``)."""
    return "architecture" in config and "model_type" not in config


def architecture(config: Mapping[str, Any]) -> str:
    """The registered timm model the config names, without its pretrained tag (``.augreg_in21k``)."""
    return str(config["architecture"]).split(".", 1)[0]


def _check_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = dict(config)
    out["architecture"] = validate.str_field(config, "architecture", where)
    if "num_classes" in config:
        out["num_classes"] = validate.int_field(config, "num_classes", where, lo=0, hi=1_000_000)
    if "global_pool" in config:
        out["global_pool"] = validate.str_field(config, "global_pool", where)
    for key in ("model_args", "pretrained_cfg"):
        value = config.get(key, {})
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: {key} must be a JSON object, got {type(value).__name__}")
        out[key] = dict(value)
    if config.get("label_names") is not None:
        out["label_names"] = list(validate.str_list(config["label_names"], "label_names", where))
    return out


def read_folder(folder: Path) -> tuple[Path, Flat, dict[str, Any]]:
    """``(weights file, arrays, metadata)`` of a timm hub folder.

    ``metadata`` holds the weights file's own metadata, ``timm_model`` (the
    architecture) and ``timm_config`` (the checked ``config.json``).
    """
    where = str(folder / "config.json")
    config = _check_config(files.read_json(validate.member_path(folder, "config.json", "config file")), where)
    found = files.read_folder_weights(folder, WEIGHTS)
    if found is None:
        raise FileNotFoundError(f"{folder} is a timm folder (config.json) without {' or '.join(WEIGHTS)}")
    weights, arrays, metadata = found  # a jaxvit export's fields are in the safetensors metadata
    return weights, arrays, {**metadata, "timm_model": config["architecture"], "timm_config": config}


def known_model_args(
    config: Mapping[str, Any], where: str, known: Mapping[str, Any], model_args: frozenset[str], family: str
) -> tuple[str, dict[str, Any]]:
    """``(architecture, model_args)`` of a timm folder's config, refused unless the architecture is
    one of ``known`` and every argument one of ``model_args`` (what a reader of ``family`` reads)."""
    name = architecture(config)
    if name not in known:
        raise ValueError(f"{where}: timm model {name!r} is not supported (jaxvit reads {sorted(known)})")
    args = dict(config.get("model_args", {}))
    unknown = sorted(set(args) - model_args)
    if unknown:
        raise ValueError(f"{where}: timm {family} with model_args {unknown}: not supported")
    return name, args


def check_num_classes(
    config: Mapping[str, Any], params: Flat, where: str, default: int | None = None
) -> None:
    """Raises unless the config's ``num_classes`` (else ``pretrained_cfg``'s, else ``default``; None:
    not checked) is the class count of the weights' classifier (0 without one)."""
    classes = config.get("num_classes", config.get("pretrained_cfg", {}).get("num_classes", default))
    classifier = params.get("head/classifier/kernel")
    if classes is not None and (classifier.shape[-1] if classifier is not None else 0) != classes:
        raise ValueError(
            f"{where}: num_classes={classes} but the weights have"
            f" {'no classifier' if classifier is None else f'a classifier of {classifier.shape[-1]}'}"
        )


def checkpoint_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a reader keeps of the folder's config in ``Checkpoint.config``: the config itself
    (``timm_config``, for the preprocessing) and its ``label_names`` as ``labels``."""
    labels = config.get("label_names")
    return {"timm_config": dict(config), **({"labels": labels} if labels else {})}


def input_size(config: Mapping[str, Any], where: str) -> tuple[int, int] | None:
    """``(h, w)`` the model was made for: ``model_args``' ``img_size``, else ``pretrained_cfg``'s ``input_size``."""
    args, cfg = config.get("model_args", {}), config.get("pretrained_cfg", {})
    if "img_size" in args:
        return to_pair(validate.size_field(args, "img_size", f"{where}: model_args"))
    if "input_size" in cfg:
        size = cfg["input_size"]
        if not (isinstance(size, Sequence) and len(size) == 3 and all(isinstance(s, int) for s in size)):
            raise ValueError(
                f"{where}: pretrained_cfg.input_size must be [channels, height, width], got {size!r}"
            )
        return (int(size[1]), int(size[2]))
    return None


def preprocessing(config: Mapping[str, Any], where: str, default: Preprocessing) -> Preprocessing:
    """How timm prepares images for this model at test time, from ``pretrained_cfg``.

    timm resizes by ``crop_mode``: ``"center"`` (the shorter side to
    ``size / crop_pct``, then a center crop) or ``"squash"`` (both sides to
    ``size / crop_pct``, then a crop). jaxvit does ``center`` and a ``squash``
    with ``crop_pct=1``; the others are refused rather than approximated.
    """
    cfg = config.get("pretrained_cfg", {})
    if not cfg:
        return default
    where = f"{where}: pretrained_cfg"
    mean = tuple(float(v) for v in cfg.get("mean", default.mean))
    std = tuple(float(v) for v in cfg.get("std", default.std))
    crop_pct = validate.float_field(cfg, "crop_pct", where, default=0.875, lo=0.0, hi=1.0, lo_open=True)
    interpolation = validate.str_field(cfg, "interpolation", where, default="bicubic")
    crop_mode = validate.str_field(cfg, "crop_mode", where, default="center")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"{where}: interpolation={interpolation!r} is not supported (jaxvit has {INTERPOLATIONS})"
        )
    if crop_mode == "center":
        return Preprocessing(mean, std, crop_pct, interpolation, center_crop=crop_pct == 1.0)
    if crop_mode == "squash" and crop_pct == 1.0:
        return Preprocessing(mean, std, 1.0, interpolation)
    raise ValueError(f"{where}: crop_mode={crop_mode!r} with crop_pct={crop_pct} is not supported")


def folder_config(
    timm_model: str,
    model_args: Mapping[str, Any],
    model: Any,
    size: tuple[int, int],
    labels: Sequence[str] | None,
    pre: Preprocessing,
) -> dict[str, Any]:
    """The ``config.json`` of a timm hub folder for a jaxvit export (see the module docstring)."""
    pretrained_cfg = {
        "input_size": [model.num_channels, *size],
        "fixed_input_size": False,
        "interpolation": pre.interpolation,
        "crop_pct": pre.crop_pct,
        # jaxvit resizes the whole image when crop_pct is 1 (and not center_crop)
        "crop_mode": "center" if pre.crop_pct < 1.0 or pre.center_crop else "squash",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "num_classes": model.num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    config = {
        "architecture": timm_model,
        "num_classes": model.num_classes,
        "num_features": model.width,
        "global_pool": model_args.get("global_pool", "token"),
        "model_args": dict(model_args),
        "pretrained_cfg": pretrained_cfg,
    }
    if labels:
        config["label_names"] = list(labels)
    return config


def folder_preprocessing(ckpt: Any, default: Preprocessing) -> Preprocessing:
    """The ``pretrained_cfg`` of the timm folder a read checkpoint came in, else ``default``."""
    timm_config = ckpt.config.get("timm_config")
    return preprocessing(timm_config, ckpt.path, default) if timm_config else default


def size_kwargs(model: Any, size: tuple[int, int]) -> dict[str, Any]:
    """The ``timm.create_model`` arguments every timm layout states alike: input and patch size,
    channels, classes, width, depth, heads and the MLP ratio."""
    mlp_dim = model.mlp_dim or 4 * model.width
    return dict(
        img_size=list(size),
        patch_size=model.patch_size,
        in_chans=model.num_channels,
        num_classes=model.num_classes,
        embed_dim=model.width,
        depth=model.depth,
        num_heads=model.num_heads,
        mlp_ratio=(mlp_dim + 0.5) / model.width,  # the half step keeps int() from rounding down
    )


def write_state_dict(
    arrays: Flat,
    path: Path,
    model: Any,
    size: tuple[int, int],
    labels: Sequence[str] | None,
    *,
    timm_model: str,
    timm_class: str,
    timm_kwargs: Mapping[str, Any],
) -> Path:
    """A timm state dict as safetensors at ``path``, its metadata saying how to build the model
    (``timm.create_model(timm_model, **timm_kwargs)``, of class ``timm_class``) and jaxvit's model
    fields, image size and labels."""
    saved = {"model": schema.json_fields(model), "image_size": list(size), "labels": list(labels or [])}
    metadata = {
        "jaxvit_model": json.dumps(saved),
        "timm_kwargs": json.dumps(dict(timm_kwargs)),
        "timm_class": timm_class,
        "timm_model": timm_model,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_safetensors(arrays, path, metadata)
    return path
