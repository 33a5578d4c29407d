"""Sequence mixers, registered by name. Importing this package registers every mixer module below."""

from zoo_jax.mixers import attention, base_conv, hybrid  # noqa: F401  (registration side effects)
from zoo_jax.mixers.registry import build, get, names, parse, register, state_size

__all__ = ["build", "get", "names", "parse", "register", "state_size"]
