"""The sequence-mixer registry: every mixer is registered by name with its hyperparameters.

A mixer is an `nnx.Module` mapping `(b, l, d) -> (b, l, d)`, constructed as

    Mixer(hparams, d_model=..., seq_len=..., layer_idx=..., n_layers=..., dtype=..., rngs=...)

where `hparams` is an instance of the frozen dataclass the mixer registered. Hyperparameters come from
config dicts (`{'name': 'base_conv', 'kernel_size': 3}`) and are parsed strictly: an unknown key or a value
out of range fails before any compute, naming the key (`model.mixer.kernel_size ...`).

Every mixer also states the size of its recurrent state, in elements per example for one layer, as a
formula (printed by `python -m zoo_jax.mixers`) and as a function of `(hparams, d_model, seq_len,
layer_idx)`.

A mixer with a recurrent form also defines

    init_state(batch_size) -> state          # a pytree; float32 leaves (b, ...) plus integer counters
    step(state, x_bd) -> (state, y_bd)       # one token

and the tests check, for every registered mixer that has them, that scanning `step` over a sequence
gives the parallel output and that `state_size` equals the floating-point elements of `init_state(1)`.

State passing (prefill → decode). The parallel (or chunked) form takes and returns that same state:

    __call__(x_bld, [tokens_bl,] state=None, return_state=False) -> y_bld | (y_bld, state)

`state=None` starts from `init_state(b)`; given a state, the l positions of x continue after the ones it
has seen (attention: its KV cache, of capacity L, and position; local attention: its window;
convolutions: their input history; SSMs and linear recurrences: their state). With `return_state` the
result is `(y_bld, state after x)`, a pytree of the structure, shapes and dtypes of `init_state(b)`. So
`y, s = m(x[:, :t], return_state=True)` then `step` from `s` over x[:, t:] reproduces `m(x)`, and
`m(x[:, t:], state=s_t)` reproduces `m(x)[:, t:]` (tests/test_mixers.py, for every registered mixer).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  name: str
  module: type[nnx.Module]
  hparams: type  # a frozen dataclass; its `validate(field)` raises ValueError for bad values
  state_size_formula: str
  # (hparams, d_model, seq_len, layer_idx) -> elements of recurrent state per example, one layer.
  state_size: Callable[[Any, int, int, int], int]


_REGISTRY: dict[str, MixerSpec] = {}

# A mixer may add a term to the training loss by sowing it: `self.sow(nnx.Intermediate, AUX_LOSS, value)`.
# `zoo_jax.trainer.loss_and_metrics` adds every sown value to the task loss and logs their sum as 'aux_loss'.
AUX_LOSS = "aux_loss"


def register(name: str, *, hparams: type, state_size_formula: str):
  """Class decorator: `@register('attention', hparams=AttentionConfig, state_size_formula='2·d·L')`.

  The class must define `state_size(hparams, d_model, seq_len, layer_idx)` as a staticmethod.
  """

  def wrap(cls):
    if name in _REGISTRY:
      raise ValueError(f"mixer {name!r} is registered twice")
    _REGISTRY[name] = MixerSpec(name, cls, hparams, state_size_formula, cls.state_size)
    cls.mixer_name = name
    return cls

  return wrap


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str, field: str = "model.mixer.name") -> MixerSpec:
  if name not in _REGISTRY:
    raise ValueError(f"{field} must be one of {names()}, got {name!r}")
  return _REGISTRY[name]


def _as_dict(cfg: Any) -> dict[str, Any]:
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  if isinstance(cfg, Mapping):
    return dict(cfg)
  raise ValueError(f"a mixer config must be a mapping with a 'name' key, got {cfg!r}")


def _check_type(value: Any, annotation: Any, field: str) -> Any:
  """Light type check of one config value against its dataclass annotation; lists become tuples."""
  origin = typing.get_origin(annotation)
  if annotation is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    for option in typing.get_args(annotation):
      try:
        return _check_type(value, option, field)
      except ValueError:
        pass
    raise ValueError(f"{field} has the wrong type: got {value!r}, expected {annotation}")
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"{field} must be a list, got {value!r}")
    (elem, *_) = typing.get_args(annotation) or (Any,)
    return tuple(_check_type(v, elem, f"{field}[{i}]") for i, v in enumerate(value))
  if annotation is type(None):
    if value is not None:
      raise ValueError(f"{field} must be None, got {value!r}")
    return value
  if annotation is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if annotation is float and isinstance(value, float) and not math.isfinite(value):
    raise ValueError(f"{field} must be a finite number, got {value!r}")
  if annotation in (int, float, str, bool):
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
      raise ValueError(f"{field} must be {annotation.__name__}, got {value!r}")
    return value
  if annotation is dict or origin is dict:
    return _as_dict(value)
  return value


def parse(cfg: Any, field: str = "model.mixer") -> tuple[MixerSpec, Any]:
  """Turns a mixer config dict into (spec, hparams), strictly, naming the offending key on error."""
  cfg = _as_dict(cfg)
  if "name" not in cfg:
    raise ValueError(f"{field}.name is missing; registered mixers: {names()}")
  spec = get(cfg.pop("name"), f"{field}.name")
  fields = typing.get_type_hints(spec.hparams)
  kwargs = {}
  for key, value in cfg.items():
    if key not in fields:
      raise ValueError(
          f"{field}.{key} is not a hyperparameter of mixer {spec.name!r}; accepted: {sorted(fields)}")
    kwargs[key] = _check_type(value, fields[key], f"{field}.{key}")
  hparams = spec.hparams(**kwargs)
  if hasattr(hparams, "validate"):
    hparams.validate(field)
  return spec, hparams


def build(cfg: Any, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
          rngs: nnx.Rngs, dtype: Any = jnp.float32, field: str = "model.mixer") -> nnx.Module:
  spec, hparams = parse(cfg, field)
  return spec.module(hparams, d_model=d_model, seq_len=seq_len, layer_idx=layer_idx,
                     n_layers=n_layers, dtype=dtype, rngs=rngs)


def check_shapes(cfg: Any, *, d_model: int, seq_len: int, layer_idx: int, field: str = "model.mixer") -> None:
  """A one-line ValueError if the mixer at layer `layer_idx` does not fit width `d_model` or length `seq_len`
  (e.g. heads that do not divide d_model), from its hparams' `check_shapes(field, d_model=..., seq_len=...,
  layer_idx=...)` where it has one: called for every layer at start-up, before anything is built."""
  _, hparams = parse(cfg, field)
  if hasattr(hparams, "check_shapes"):
    hparams.check_shapes(field, d_model=d_model, seq_len=seq_len, layer_idx=layer_idx)


def check_dtype(cfg: Any, dtype: Any, field: str = "model.mixer") -> None:
  """A one-line ValueError if the mixer cannot run with activations of `dtype` (model.dtype; e.g. attention's
  'cudnn' in float32), from its hparams' `check_dtype(field, dtype)` where it has one: called at start-up,
  before anything is built."""
  _, hparams = parse(cfg, field)
  if hasattr(hparams, "check_dtype"):
    hparams.check_dtype(field, dtype)


def check_heads(field: str, num_heads: int, d_model: int, *, even: bool = False, width: str = "model.d_model",
                name: str = "num_heads") -> None:
  """`num_heads` must split `d_model` into equal heads (of even width with `even`: rotary positions)."""
  if d_model % num_heads or (even and (d_model // num_heads) % 2):
    raise ValueError(f"{field}.{name} must divide {width} ({d_model}) into heads"
                     f"{' of even width (rotary positions)' if even else ''}, got {num_heads}")


def apply(mixer: nnx.Module, x_bld: Any, tokens_bl: Any = None, *, state: Any = None,
          return_state: bool = False, dropout_key: Any = None) -> Any:
  """`mixer(x_bld)`, or `mixer(x_bld, tokens_bl)` for a mixer that reads token ids (`uses_tokens`, e.g.
  sparse_attention's programmatic and random selections); every other mixer maps hidden states only.

  With `state` (a pytree like `init_state(b)`'s) the parallel form continues from it; with `return_state`
  the result is `(y_bld, final_state)` (the module docstring's state-passing contract). `dropout_key`
  (training forward only) reaches a mixer with a `dropout_rate` > 0 (the attentions' `dropout`)."""
  args = (x_bld, tokens_bl) if getattr(mixer, "uses_tokens", False) else (x_bld,)
  if state is None and not return_state:
    if dropout_key is not None and getattr(mixer, "dropout_rate", 0.0) > 0:
      return mixer(*args, dropout_key=dropout_key)
    return mixer(*args)
  return mixer(*args, state=state, return_state=return_state)


def state_size(cfg: Any, *, d_model: int, seq_len: int, layer_idx: int) -> int:
  spec, hparams = parse(cfg)
  return int(spec.state_size(hparams, d_model, seq_len, layer_idx))
