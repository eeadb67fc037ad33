"""The checkpoint formats jaxvit reads and writes, found in the family homes (``jaxvit/families/``).

Nothing here is listed by hand: every module inside a family's folder is a
format of that family. A format module has ``NAME`` (the origin it reports), ``PREPROCESSING`` (how
its images were prepared), ``claims(kind, arrays)`` (whether a file of
``kind`` "npz" or "state_dict" with these keys is its own) and
``read(path, arrays, metadata) -> Checkpoint``. ``CLAIMS`` says how wide its
claim is: ``"specific"`` (the default: keys only its family has),
``"family"`` (the rest of one library's files, e.g. transformers' plain ViT)
or ``"fallback"`` (any file of its kind that nothing narrower claims).
Exactly one format may claim a file at the narrowest level that claims it;
two are an ambiguity, and the file is refused naming both.

A writer has ``EXPORT_FORMAT``, ``TARGET`` (what the peer calls it),
``CARRIES`` (the architecture fields it expresses besides the sizes),
``HAS_SINCOS`` and ``write(flat, model, size, path, labels)``, and
``exports(model)`` when it writes one family's models in a format that
another writer covers generically (the generic writer has none: it takes
what no family writer takes). ``HF_MODEL_TYPES`` names the ``config.json``
``model_type``s of the Hugging Face folders a format reads. The optional
hooks (``HOOKS``) are asked for through ``hook(fmt, name)`` only.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from jaxvit import families
from jaxvit.checkpoints import timm_hub
from jaxvit.checkpoints.checkpoint import Preprocessing
from jaxvit.safety import files, validate

CLAIM_LEVELS = ("specific", "family", "fallback")
# Optional functions of a format module: the model its file states (build_model), model fields
# the shapes cannot tell (guess_fields), class names (labels), preprocessing per file
# (preprocessing), and for a family writer, whether it takes a model (exports).
HOOKS = ("build_model", "guess_fields", "labels", "preprocessing", "exports")


def _discover() -> dict[ModuleType, str]:
    found = {}
    for name in families.NAMES:
        package = families.family(name)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            found[importlib.import_module(f"{package.__name__}.{info.name}")] = name
    return found


# format module -> the family whose home holds it
FAMILY_OF: dict[ModuleType, str] = _discover()
FORMATS: tuple[ModuleType, ...] = tuple(FAMILY_OF)
for _fmt in FORMATS:
    if getattr(_fmt, "CLAIMS", "specific") not in CLAIM_LEVELS:
        raise ImportError(f"{_fmt.__name__}.CLAIMS must be one of {CLAIM_LEVELS}")


def hook(fmt: ModuleType, name: str) -> Callable[..., Any] | None:
    """The optional function ``name`` (one of ``HOOKS``) of format ``fmt``, or None."""
    if name not in HOOKS:
        raise ValueError(f"unknown format hook {name!r}: expected one of {HOOKS}")
    return getattr(fmt, name, None)


# Each export format's writers: its family writers (with ``exports``), then its one generic writer.
EXPORTERS: dict[str, tuple[ModuleType, ...]] = {}
for _fmt in sorted(
    (f for f in FORMATS if hasattr(f, "EXPORT_FORMAT")), key=lambda f: (hook(f, "exports") is None, f.NAME)
):
    EXPORTERS[_fmt.EXPORT_FORMAT] = (*EXPORTERS.get(_fmt.EXPORT_FORMAT, ()), _fmt)
for _name, _writers in EXPORTERS.items():
    if [hook(w, "exports") is None for w in _writers].count(True) != 1:
        raise ImportError(f"export format {_name!r} needs exactly one generic writer (one without exports)")
# the generic writer of each export format (it names what it cannot write)
EXPORTS: dict[str, ModuleType] = {name: mods[-1] for name, mods in EXPORTERS.items()}

# The sizes every layout states, in its shapes or its config: carried by every writer.
ALWAYS_CARRIED = ("num_classes", "patch_size", "width", "depth", "mlp_dim", "num_heads", "num_channels")


def carries(writer: ModuleType) -> frozenset[str]:
    """The architecture fields ``writer`` expresses: ``ALWAYS_CARRIED`` and its ``CARRIES``."""
    return frozenset(ALWAYS_CARRIED) | frozenset(writer.CARRIES)


# config.json's model_type -> the one format that reads the folder.
HF_MODEL_TYPES: dict[str, ModuleType] = {}
for _fmt in FORMATS:
    for _type in getattr(_fmt, "HF_MODEL_TYPES", ()):
        if _type in HF_MODEL_TYPES:
            raise ImportError(f"model_type {_type!r} is read by {HF_MODEL_TYPES[_type].NAME} and {_fmt.NAME}")
        HF_MODEL_TYPES[_type] = _fmt


def _only_one(
    candidates: list[ModuleType], what: str, asked: Callable[[ModuleType], bool]
) -> ModuleType | None:
    chosen = [f for f in candidates if asked(f)]
    if len(chosen) > 1:
        raise ValueError(f"{what} is claimed by {' and '.join(f.NAME for f in chosen)}: refused as ambiguous")
    return chosen[0] if chosen else None


def format_for(kind: str, arrays: Mapping[str, np.ndarray]) -> ModuleType:
    """The one format module that reads a file of ``kind`` with these arrays.

    The narrowest claim wins; two claims at that level are refused as ambiguous.
    """
    what = f"a {kind} with keys {sorted(arrays)[:3]}"
    for level in CLAIM_LEVELS:
        at_level = [f for f in FORMATS if getattr(f, "CLAIMS", "specific") == level]
        chosen = _only_one(at_level, what, lambda f: f.claims(kind, arrays))
        if chosen is not None:
            return chosen
    raise ValueError(f"no checkpoint format reads a {kind} with keys {sorted(arrays)[:5]}")


def hf_format(config: Mapping[str, Any], path: str | Path = "the folder") -> ModuleType:
    """The format module of a Hugging Face folder, by its ``config.json``'s ``model_type``.

    Raises ``ValueError`` listing the supported model types for any other.
    """
    model_type = config.get("model_type", "vit")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"{path}: config.json has model_type={model_type!r}, which jaxvit does not read;"
            f" supported model types: {sorted(HF_MODEL_TYPES)}"
        )
    return HF_MODEL_TYPES[model_type]


# Folders without a config.json, by the config file that names their layout (a format
# module's FOLDER_CONFIG, e.g. open_clip_config.json).
FOLDER_FORMATS: tuple[ModuleType, ...] = tuple(f for f in FORMATS if hasattr(f, "FOLDER_CONFIG"))


class HFFolder:
    """A Hugging Face ``save_pretrained`` folder, read by the format its ``model_type`` names."""

    NAME = "hf"

    @staticmethod
    def read_folder(folder: Path) -> Any:
        arrays, config = files.read_hf_folder(folder)
        return hf_format(config, folder).read(folder, arrays, config)


class TimmFolder:
    """A timm hub folder (``config.json`` with an ``architecture``), read by the timm format that
    claims its weights; the config is passed as the file's metadata (``timm_hub.read_folder``)."""

    NAME = "timm folder"

    @staticmethod
    def read_folder(folder: Path) -> Any:
        weights, arrays, metadata = timm_hub.read_folder(folder)
        # the architecture a format names as its own comes first: PE's weights have the keys of a
        # timm VisionTransformer, its config.json names an Eva
        named = str(metadata.get("timm_model", "")).split(".", 1)[0]
        by_name = [f for f in FORMATS if named in getattr(f, "TIMM_MODELS_READ", ())]
        fmt = by_name[0] if len(by_name) == 1 else format_for("state_dict", arrays)
        if not getattr(fmt, "READS_TIMM_FOLDERS", False):
            raise ValueError(
                f"{folder}: config.json names the timm model {metadata['timm_model']!r} but its weights"
                f" have the layout of {fmt.NAME}"
            )
        return fmt.read(weights, arrays, metadata)


def folder_format(folder: Path) -> Any:
    """What reads ``folder``: by its ``config.json`` a timm hub folder (``TimmFolder``) or a
    Hugging Face one (``HFFolder``); without one, the format whose ``FOLDER_CONFIG`` file is
    there and whose ``claims_folder(config)`` takes it (open_clip).

    ``config.json`` comes first: a timm hub folder that also holds open_clip's
    files is read as the timm model its ``config.json`` names.
    """
    if (folder / "config.json").exists():
        config = files.read_json(validate.member_path(folder, "config.json", "config file"))
        return TimmFolder if timm_hub.is_timm_config(config) else HFFolder
    for fmt in FOLDER_FORMATS:
        if (folder / fmt.FOLDER_CONFIG).exists():
            config = files.read_json(validate.member_path(folder, fmt.FOLDER_CONFIG, "config file"))
            chosen = _only_one(
                [f for f in FOLDER_FORMATS if f.FOLDER_CONFIG == fmt.FOLDER_CONFIG],
                str(folder / fmt.FOLDER_CONFIG),
                lambda f, config=config: f.claims_folder(config),
            )
            if chosen is not None:
                return chosen
    return HFFolder  # which names what a folder needs


def exporter(format: str, model: Any) -> ModuleType:
    """The module that writes ``model`` in ``format``: the one family writer that takes it, else
    the format's generic writer."""
    candidates = EXPORTERS[format]
    family = _only_one(list(candidates[:-1]), f"format={format!r} for this model", lambda f: f.exports(model))
    return family or candidates[-1]


def by_origin(origin: str) -> ModuleType:
    """The format module whose ``NAME`` is ``origin``."""
    for fmt in FORMATS:
        if fmt.NAME == origin:
            return fmt
    raise ValueError(f"unknown origin {origin!r}: expected one of {[f.NAME for f in FORMATS]}")


def preprocessing(origin: str) -> Preprocessing:
    """How images are prepared for checkpoints of ``origin``."""
    return by_origin(origin).PREPROCESSING
