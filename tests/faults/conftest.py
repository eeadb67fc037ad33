"""Fixtures of the fault tests (defined in ``faultkit``): the compile cache, the
``train.py`` launcher and the uninterrupted reference run, once per session."""

from faultkit import compile_cache, reference, trainer  # noqa: F401
