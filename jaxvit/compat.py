"""Old spellings, in one place: what earlier versions of jaxvit (or users' habits) call by other names.

- ``gelu_approximate=True`` is ``activation="gelu_tanh"`` (until jaxvit 0.3);
- ``bf16``, ``fp32``, ... are dtype names;
- modules that moved when the package was split into subpackages
  (``jaxvit.configs`` is ``jaxvit.training.configs``, ...) still import, with a
  ``DeprecationWarning``;
- renamed functions and attributes warn through ``renamed``.

Stored files (workdir ``config.json``, export metadata) keep being read in
their old spelling; jaxvit writes only today's.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Mapping
from types import ModuleType
from typing import Any

DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16"}

# The activations of the encoder MLP (jaxvit.ops.ACTIVATIONS), checked where they are used.
_GELU_FORMS = ("gelu", "gelu_tanh")


def renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warns that ``old`` is deprecated in favour of ``new`` (until jaxvit 0.3)."""
    warnings.warn(
        f"{old} is deprecated (until jaxvit 0.3): use {new}", DeprecationWarning, stacklevel=stacklevel
    )


def current_spelling(fields: Mapping[str, Any], warn: bool = False) -> dict[str, Any]:
    """Model fields with old spellings replaced: ``gelu_approximate`` folded into ``activation``.

    ``warn``: the old spelling came from code (not from a stored file), so say it is deprecated.
    """
    out = dict(fields)
    if out.get("gelu_approximate"):
        if warn:
            renamed("gelu_approximate", "activation='gelu_tanh'", stacklevel=5)
        if out.get("activation", "gelu") not in _GELU_FORMS:
            raise ValueError(f"gelu_approximate=True contradicts activation={out['activation']!r}")
        out["activation"] = "gelu_tanh"
    if "gelu_approximate" in out:
        out["gelu_approximate"] = False
    return out


# Modules that moved when jaxvit was split into subpackages: old name -> new name.
MOVED_MODULES = {
    "jaxvit.architecture": "jaxvit.checkpoints.architecture",
    "jaxvit.augment": "jaxvit.data.augment",
    "jaxvit.checkpointing": "jaxvit.training.checkpointing",
    "jaxvit.configs": "jaxvit.training.configs",
    "jaxvit.exporting": "jaxvit.checkpoints.exporting",
    "jaxvit.fitting": "jaxvit.checkpoints.fitting",
    "jaxvit.inference": "jaxvit.checkpoints.inference",
    "jaxvit.optim": "jaxvit.training.optim",
    "jaxvit.packed": "jaxvit.data.packed",
    "jaxvit.preprocess": "jaxvit.data.preprocess",
    "jaxvit.pretrained": "jaxvit.checkpoints.pretrained",
    "jaxvit.train_lib": "jaxvit.training.train_lib",
    "jaxvit.trainer": "jaxvit.training.trainer",
    "jaxvit.convert.validate": "jaxvit.safety.validate",
    "jaxvit.convert.files": "jaxvit.safety.files",
    "jaxvit.convert.scan": "jaxvit.layers.scan",
    "jaxvit.convert.checkpoint": "jaxvit.checkpoints.checkpoint",
    "jaxvit.convert.layouts": "jaxvit.checkpoints.layouts",
    "jaxvit.convert.registry": "jaxvit.checkpoints.registry",
}


# Names jaxvit.model held before its layers moved to jaxvit/layers/: name -> its module now.
MOVED_NAMES = {
    # jaxvit 0.1 kept all of the interop code in the module now called jaxvit.checkpoints.pretrained
    "jaxvit.checkpoints.pretrained": {
        "export": "jaxvit.checkpoints.exporting",
        "FORMATS": "jaxvit.checkpoints.exporting",
        "model_from_checkpoint": "jaxvit.checkpoints.architecture",
        "InferenceBundle": "jaxvit.checkpoints.inference",
        "load_for_inference": "jaxvit.checkpoints.inference",
        "read_labels": "jaxvit.checkpoints.inference",
        "PREPROCESSING": "jaxvit.checkpoints.inference",
        "ORIGINS": "jaxvit.checkpoints.inference",
    },
    "jaxvit.training.checkpointing": {"model_from_config": "jaxvit.checkpoints.workdir"},
    "jaxvit.model": {
        "BLOCK_LOOPS": "jaxvit.schema",
        "ClassToken": "jaxvit.layers.tokens",
        "Dense": "jaxvit.layers.patch",
        "Encoder": "jaxvit.layers.encoder",
        "EncoderBlock": "jaxvit.layers.encoder",
        "FAMILY_VARIANTS": "jaxvit.variants",
        "Head": "jaxvit.layers.head",
        "LayerScale": "jaxvit.layers.mlp",
        "MAPHead": "jaxvit.layers.head",
        "MLP_TYPES": "jaxvit.schema",
        "MlpBlock": "jaxvit.layers.mlp",
        "POOLINGS": "jaxvit.schema",
        "POSEMBS": "jaxvit.schema",
        "PatchEmbed": "jaxvit.layers.patch",
        "PositionEmbedding": "jaxvit.layers.posemb",
        "REMAT_POLICIES": "jaxvit.schema",
        "RESAMPLE_METHODS": "jaxvit.layers.posemb",
        "RegisterTokens": "jaxvit.layers.tokens",
        "SelfAttention": "jaxvit.layers.attention",
        "SwiGLUMlp": "jaxvit.layers.mlp",
        "VARIANTS": "jaxvit.variants",
        "apply_rope": "jaxvit.layers.posemb",
        "check_choice": "jaxvit.layers.common",
        "check_distill_pool": "jaxvit.layers.common",
        "check_heads": "jaxvit.layers.common",
        "check_pool_has_token": "jaxvit.layers.common",
        "check_sincos_width": "jaxvit.layers.common",
        "decode_variant": "jaxvit.variants",
        "drop_path": "jaxvit.layers.encoder",
        "explicit_attention": "jaxvit.ops",
        "patchify": "jaxvit.layers.patch",
        "posemb_sincos_2d": "jaxvit.layers.posemb",
        "resample_posemb": "jaxvit.layers.posemb",
        "resize_matrix": "jaxvit.layers.posemb",
        "rope_2d_tables": "jaxvit.layers.posemb",
        "scan_to_unrolled": "jaxvit.layers.scan",
        "square_grid": "jaxvit.sizes",
        "swiglu_hidden_size": "jaxvit.layers.mlp",
        "to_pair": "jaxvit.sizes",
        "unpatchify": "jaxvit.layers.patch",
        "unrolled_to_scan": "jaxvit.layers.scan",
        "use_explicit_attention": "jaxvit.ops",
    },
}


def moved_name(module: str, name: str) -> Any:
    """``module.name`` for a name that moved elsewhere (with a warning); ``AttributeError`` otherwise."""
    home = MOVED_NAMES.get(module, {}).get(name)
    if home is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    renamed(f"{module}.{name}", f"{home}.{name}")
    return getattr(importlib.import_module(home), name)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a moved module under its old name: the new module itself, with a warning."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name in MOVED_MODULES or name == "jaxvit.convert":
            return importlib.util.spec_from_loader(name, self, is_package=name == "jaxvit.convert")
        return None

    def create_module(self, spec: Any) -> ModuleType:
        if spec.name == "jaxvit.convert":
            module = ModuleType("jaxvit.convert")
            module.__path__ = []  # a namespace for the moved submodules above
            return module
        renamed(spec.name, MOVED_MODULES[spec.name], stacklevel=2)
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass


def install_moved_modules() -> None:
    """Lets ``import jaxvit.configs`` (and the other moved modules) keep working."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
