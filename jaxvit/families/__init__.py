"""One home per checkpoint family: ``jaxvit/families/<family>/``.

A family's ``__init__.py`` is data only (its sizes and the options every size
of it has), so that ``decode_variant("dinov2:g/14")`` can read it without
importing any reader. Its other modules are its checkpoint formats: each reads
(and most write) one layout of that family's files, with the preprocessing
its origin used (see ``jaxvit.checkpoints.registry`` for what a format
module provides). ``jaxvit.checkpoints.registry`` finds them all; nothing
lists them by hand.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

NAMES: tuple[str, ...] = tuple(sorted(i.name for i in pkgutil.iter_modules(__path__) if i.ispkg))


def family(name: str) -> ModuleType:
    """The data of family ``name`` (its ``__init__``)."""
    return importlib.import_module(f"{__name__}.{name}")
