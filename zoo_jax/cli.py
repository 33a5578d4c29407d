"""Helpers shared by the absl binaries in experiments/ (and the configs and tests that load them)."""

import importlib.util
import os
import sys
import types

from ml_collections import config_flags


def define_config_flag(default_path: str, help_text: str = "Run config.", name: str = "config"):
  """`--config` (a config file) with `--config.<key>=value` overrides; a bad override exits in one line.

  ml_collections applies the overrides while the flag is defined, raising a multi-line KeyError for an
  unknown key; it is turned into one line naming the override.
  """
  try:
    return config_flags.DEFINE_config_file(name, default_path, help_text, lock_config=True)
  except (KeyError, AttributeError, ValueError, TypeError) as e:
    bad = [a.split("=")[0] for a in sys.argv[1:] if a.startswith(f"--{name}.")]
    detail = " ".join(str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "").strip("'\"").split())
    sys.exit(f"error: bad config override among {bad}: {detail}")


def load_module(path: str) -> types.ModuleType:
  """The Python file at `path` as a module (configs and binaries in experiments/, which is not a package)."""
  name = "_zoo_jax_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
