"""The run config: its defaults (the schema) and strict validation.

A run config is an `ml_collections.ConfigDict` with sections `data`, `model`, `train`, `mesh` and a
top-level `seed`. `validate` checks every key against `defaults()` and every value against its accepted
range, and raises a one-line `ValueError` naming the key, before any data is generated or any array is
allocated. Mixer hyperparameters are checked by the mixer registry, model options by `ModelConfig`.
"""

from collections.abc import Mapping
import json
from typing import Any

import ml_collections

from zoo_jax.data import mqar
from zoo_jax.model import ModelConfig

SCHEDULES = ("cosine", "constant")


def defaults() -> ml_collections.ConfigDict:
  """Every accepted key with its default. Figure-2 values (Zoology) unless noted."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(
      vocab_size=8192,
      power_a=0.01,
      random_non_queries=False,
      # Each segment: {seq_len, num_kv_pairs, num_examples}; segments of a split are concatenated.
      train_segments=[dict(seq_len=64, num_kv_pairs=4, num_examples=100_000)],
      validation_segments=[dict(seq_len=64, num_kv_pairs=4, num_examples=3_000)],
      test_segments=[dict(seq_len=64, num_kv_pairs=4, num_examples=3_000)],
  )
  c.model = dict(
      d_model=64, n_layers=2, mixer=dict(name="attention"), state_mixer="none", state_mixer_hidden_mult=4,
      block="zoology", learned_positions=False, dtype="float32")
  c.train = dict(
      epochs=64,
      batch_size=512,
      eval_batch_size=512,
      learning_rate=1e-3,
      weight_decay=0.1,
      warmup_steps=0,
      schedule="cosine",  # cosine decay to 0 over the whole run (after warmup)
      grad_clip_norm=0.0,  # 0: no clipping
      early_stop_accuracy=0.99,  # stop once validation accuracy exceeds this; > 1 never stops
      log_every_steps=50,
      checkpoint_every_steps=0,  # 0: a checkpoint at the end of every epoch only
      keep_checkpoints=3,
  )
  c.mesh = dict(data=-1, model=1)  # data=-1: all devices not used by `model`
  return c


def _as_dict(x: Any) -> dict:
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def _check_keys(section: Mapping, allowed: Mapping, prefix: str) -> None:
  for key in section:
    if key not in allowed:
      raise ValueError(f"{prefix}{key} is not a config key; accepted: {sorted(allowed)}")


def _positive_int(value: Any, field: str, minimum: int = 1) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")


def _number_in(value: Any, field: str, lo: float, hi: float, lo_open: bool = False) -> None:
  if (not isinstance(value, (int, float)) or isinstance(value, bool) or value > hi or value < lo
      or (lo_open and value == lo)):
    raise ValueError(f"{field} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")


def max_seq_len(data: Mapping) -> int:
  return max(s["seq_len"] for key in ("train_segments", "validation_segments", "test_segments")
             for s in data[key])


def _deep_merge(base: dict, override: Mapping) -> dict:
  out = dict(base)
  for key, value in override.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "mixer":
      out[key] = _deep_merge(out[key], value)
    else:
      out[key] = value
  return out


def expand_runs(config: Any) -> dict[str, dict]:
  """{run name: single-run config} from a config with an optional `runs` section.

  `runs` maps a run name to a partial config deep-merged into the base config, e.g. `{'attention':
  {'model': {'mixer': {'name': 'attention'}, 'learned_positions': True}}}` (a `mixer` is replaced whole,
  not merged); without `runs` the config is one run named 'run'. Every run is validated here, so a bad
  run fails before any of them trains.
  """
  base = json.loads(json.dumps(_as_dict(config)))
  runs = base.pop("runs", None)
  if not runs:
    validate(base)
    return {"run": base}
  out = {}
  for name, overrides in runs.items():
    overrides = json.loads(json.dumps(_as_dict(overrides)))
    _check_keys(overrides, base, f"runs.{name}.")
    cfg = _deep_merge(base, overrides)
    try:
      validate(cfg)
    except ValueError as e:
      raise ValueError(f"runs.{name}: {e}") from None
    out[name] = cfg
  return out


def resolve(config: Any) -> tuple[ml_collections.ConfigDict, ModelConfig]:
  """Validates `config`, fills missing keys from `defaults()`, and returns (full config, ModelConfig)."""
  model_cfg = validate(config)
  full = _deep_merge(defaults().to_dict(), _as_dict(config))
  return ml_collections.ConfigDict(full), model_cfg


def validate(config: Any) -> ModelConfig:
  """Validates the whole run config (missing keys take their defaults); returns the `ModelConfig`."""
  schema = defaults()
  top = _as_dict(config)
  _check_keys(top, schema, "")
  for section in ("data", "model", "train", "mesh"):
    if section not in top:
      raise ValueError(f"{section} is missing from the config")
    if section != "model":  # model keys are checked by ModelConfig (the mixer is free-form)
      _check_keys(top[section], schema[section], f"{section}.")
  _positive_int(top.get("seed", 0), "seed", minimum=0)

  data = {**schema.data.to_dict(), **top["data"]}
  for key in ("train_segments", "validation_segments", "test_segments"):
    segments = data[key]
    if not segments:
      raise ValueError(f"data.{key} must list at least one segment")
    for i, seg in enumerate(segments):
      seg = _as_dict(seg)
      _check_keys(seg, {"seq_len": 0, "num_kv_pairs": 0, "num_examples": 0}, f"data.{key}[{i}].")
      try:
        mqar.validate_mqar(vocab_size=data["vocab_size"], seq_len=seg.get("seq_len"),
                           num_kv_pairs=seg.get("num_kv_pairs"), num_examples=seg.get("num_examples"),
                           power_a=data["power_a"])
      except ValueError as e:
        raise ValueError(f"data.{key}[{i}]: {e}") from None

  train = {**schema.train.to_dict(), **top["train"]}
  for key in ("epochs", "batch_size", "eval_batch_size", "log_every_steps", "keep_checkpoints"):
    _positive_int(train[key], f"train.{key}")
  for key in ("warmup_steps", "checkpoint_every_steps"):
    _positive_int(train[key], f"train.{key}", minimum=0)
  _number_in(train["learning_rate"], "train.learning_rate", 0.0, 10.0, lo_open=True)
  _number_in(train["weight_decay"], "train.weight_decay", 0.0, 10.0)
  _number_in(train["grad_clip_norm"], "train.grad_clip_norm", 0.0, float("inf"))
  _number_in(train["early_stop_accuracy"], "train.early_stop_accuracy", 0.0, 2.0)
  if train["schedule"] not in SCHEDULES:
    raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {train['schedule']!r}")

  mesh = {**schema.mesh.to_dict(), **top["mesh"]}
  if not isinstance(mesh["data"], int) or (mesh["data"] < 1 and mesh["data"] != -1):
    raise ValueError(f"mesh.data must be -1 or an integer >= 1, got {mesh['data']!r}")
  _positive_int(mesh["model"], "mesh.model")

  model = {**schema.model.to_dict(), **_as_dict(top["model"])}
  return ModelConfig.from_config(model, vocab_size=data["vocab_size"], seq_len=max_seq_len(data))
