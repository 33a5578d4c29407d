"""Sequence mixers, registered by name.

Importing this package imports every public module in it (each registers its mixer), so adding a mixer
is adding one file; modules whose name starts with `_` hold shared pieces and register nothing.
"""

import importlib
import pkgutil

from zoo_jax.mixers.registry import apply, build, check_dtype, check_shapes, get, names, parse, register, state_size

for _module in pkgutil.iter_modules(__path__):
  if not _module.name.startswith("_") and _module.name != "registry":
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["apply", "build", "check_shapes", "get", "names", "parse", "register", "state_size"]
