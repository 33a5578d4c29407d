"""Helpers shared by the absl binaries in experiments/ (and the configs and tests that load them).

A binary defines its config with `define_config_flag` and starts with `run(main)` (a drop-in for
`absl.app.run(main)`); then every bad flag ends the process, before `main` runs, with one line on stderr,
`error: ...`, naming the flag and what it accepts, and exit status 1:

- an override of a key the config does not have, at any depth (`--config.train.lr=1`,
  `--config.runs.attention.model.mixer.foo=1`), an index past a list (`--config.data.train_segments[5].seq_len=3`),
  or a key ml_collections cannot override (a list, a section inside a list, a None): checked by
  `check_overrides` when the flag is defined, against the config file the command line names;
- a value of the wrong type (`--config.train.epochs=abc`) and any other flag error absl raises while it
  parses argv (an unknown flag, a missing required flag): turned into one line by `parse_flags`.

Values of the right type but outside their range (`--config.train.learning_rate=nan`) pass the flags and
fail in the binary's `main`, at `zoo_jax.config.expand_runs` / `resolve`, also in one line.
"""

import importlib.util
import os
import re
import sys
import types
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

_TOKEN = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def _override_names(argv: list[str], name: str) -> list[str]:
  """The keys overridden on the command line (`--config.a.b=1`, `--config.a.b 1`, `--noconfig.a.b` -> a.b),
  as ml_collections finds them."""
  pattern = re.compile(rf"-{{1,2}}(no)?{re.escape(name)}\.")
  return [arg.split("=", 1)[0].split(".", 1)[1] for arg in argv if pattern.match(arg)]


def _config_path(argv: list[str], name: str, default: str) -> tuple[str, bool]:
  """(the config file argument, whether the command line gave it)."""
  for i, arg in enumerate(argv):
    if re.match(rf"^-{{1,2}}{re.escape(name)}=", arg):
      return arg.split("=", 1)[1], True
    if re.match(rf"^-{{1,2}}{re.escape(name)}$", arg) and i + 1 < len(argv):
      return argv[i + 1], True
  return default, False


def load_config(path: str) -> Any:
  """`get_config(arg)` of the config file `path` ('file.py' or 'file.py:arg'), as ml_collections calls it;
  a one-line ValueError when the file is missing or `get_config` raises."""
  file, *arg = path.split(":", 1)
  if not os.path.isfile(file):
    raise ValueError(f"no such config file: {file}")
  try:
    return load_module(file).get_config(*arg)
  except Exception as e:  # pylint: disable=broad-except  # whatever the config file raises, in one line
    raise ValueError(_one_line(e)) from None


def _kind(value: Any) -> str:
  if isinstance(value, config_dict.ConfigDict):
    return "a section"
  return {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a tuple",
          list: "a list", dict: "a section", type(None): "None"}.get(type(value), type(value).__name__)


def check_overrides(config: Any, overrides: list[str], name: str = "config") -> None:
  """A one-line ValueError for the first override that names no key of `config`, an index past a list, or
  a value ml_collections cannot override; says what the config has there."""
  for override in overrides:
    flag = f"--{name}.{override}"
    tokens = _TOKEN.findall(override)
    if "".join(f"[{i}]" if i else f".{k}" for k, i in tokens).lstrip(".") != override:
      raise ValueError(f"{flag}: not a dotted key path (keys and [index]es, e.g. data.train_segments[0].seq_len)")
    value, where = config, name
    for key, index in tokens:
      if index:
        if not isinstance(value, (list, tuple)):
          raise ValueError(f"{flag}: {where} is {_kind(value)}, not a list, so it has no [{index}]")
        if not -len(value) <= int(index) < len(value):
          raise ValueError(f"{flag}: index {index} is out of range: {where} has {len(value)} "
                           f"entr{'y' if len(value) == 1 else 'ies'} (indices 0 to {len(value) - 1})")
        value, where = value[int(index)], f"{where}[{index}]"
      else:
        if not isinstance(value, (dict, config_dict.ConfigDict)):
          raise ValueError(f"{flag}: {where} is {_kind(value)}, not a section, so it has no key {key!r}")
        if key not in value:
          hint = (" (a mixer key the config file leaves out is set with the whole mixer, e.g. "
                  f"--{name}.{override.rsplit('.', 1)[0]}=\"{{'name': ..., '{key}': ...}}\")"
                  if where.endswith(".mixer") else "")
          raise ValueError(f"{flag}: {where} has no key {key!r}; its keys: {sorted(value)}{hint}")
        value, where = value[key], f"{where}.{key}"
    if isinstance(value, list):
      raise ValueError(f"{flag}: {where} is a list, which ml_collections cannot override as a whole; set its "
                       f"entries ({flag}[0]=...) or change the config file")
    if isinstance(value, dict):  # a mapping inside a list: not a ConfigDict
      raise ValueError(f"{flag}: {where} is a section inside a list; set its keys ({flag}.{sorted(value)[0]}=...)")
    if value is None:
      raise ValueError(f"{flag}: {where} is None in the config file, which ml_collections cannot override; "
                       "give it a value in the config file")


def define_config_flag(default_path: str, help_text: str = "Run config.", name: str = "config",
                       flag_values: flags.FlagValues = flags.FLAGS, sys_argv: list[str] | None = None):
  """`--config` (a config file) with `--config.<key>=value` overrides; a bad override exits in one line.

  The overrides are checked here, against the config file the command line names (or `default_path`),
  because ml_collections applies them while argv is parsed and raises a KeyError or AttributeError that
  absl does not catch (a traceback). `sys_argv` (default sys.argv) is the command line, as ml_collections'.
  """
  argv = flags.FLAGS.read_flags_from_files(sys.argv if sys_argv is None else sys_argv, force_gnu=False)
  path, given = _config_path(argv, name, default_path)
  overrides = _override_names(argv, name)
  if given or overrides:
    try:
      config = load_config(path)
    except ValueError as e:
      sys.exit(f"error: --{name}={path}: {e}")
    try:
      check_overrides(config, overrides, name)
    except ValueError as e:
      sys.exit(f"error: {e}")
  return config_flags.DEFINE_config_file(name, default_path, help_text, flag_values=flag_values,
                                         lock_config=True, sys_argv=sys_argv)


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return text if isinstance(error, (ValueError, flags.Error)) else f"{type(error).__name__}: {text}"


_ACCEPTS = ((flags.BooleanParser, "true or false"), (flags.IntegerParser, "an integer"),
            (flags.FloatParser, "a number"))


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """`flag_values(argv)` (absl's parse), with every flag error turned into one line and exit status 1."""
  try:
    return flag_values(argv)
  except flags.IllegalFlagValueError as e:
    match = re.match(r"flag --([^=\s]+)=(.*?): (.*)", _one_line(e))
    if match and match.group(1) in flag_values and "." in match.group(1):  # a --config.<key> override
      flag, value, detail = flag_values[match.group(1)], match.group(2), match.group(3)
      accepts = next((words for kind, words in _ACCEPTS if isinstance(flag.parser, kind)), None)
      has = f" (the config file has {flag.default!r})" if flag.default is not None else ""
      sys.exit(f"error: --{flag.name}={value}: {flag.name.split('.', 1)[1]} takes {accepts}{has}, got {value!r}"
               if accepts else f"error: --{flag.name}={value}: {detail}")
    sys.exit(f"error: {_one_line(e)}")
  except Exception as e:  # pylint: disable=broad-except  # no flag error may end in a traceback
    sys.exit(f"error: {_one_line(e)}")


def run(main, argv: list[str] | None = None) -> None:
  """`absl.app.run(main)` whose flag errors are one `error: ...` line on stderr (see `parse_flags`), as are
  the errors a run reports about its input or its workdir: a ValueError (bad config or data, raised before
  anything is written), a `checkpoint.CheckpointError` (workdir locked, config.json of another run, every
  checkpoint damaged) and a `trainer.NonFiniteLossError` (it names the last good checkpoint)."""
  from zoo_jax import checkpoint, trainer  # pylint: disable=g-import-not-at-top

  def guarded(argv_):
    try:
      return main(argv_)
    except (ValueError, checkpoint.CheckpointError, trainer.NonFiniteLossError) as e:
      sys.exit(f"error: {' '.join(str(e).split())}")

  app.run(guarded, argv=argv, flags_parser=parse_flags)


def load_module(path: str) -> types.ModuleType:
  """The Python file at `path` as a module (configs and binaries in experiments/, which is not a package)."""
  name = "_zoo_jax_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
