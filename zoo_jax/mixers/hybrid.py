"""A hybrid: a list of mixers cycled over the layers, e.g. `[base_conv(k=3), attention]` puts BaseConv in
even layers and attention in odd ones (the paper's Section 5 hybrids; Zoology's `Hybrid` configs).

Hyperparameters: `mixers`, a list of mixer configs (each `{'name': ..., **hparams}`); layer i gets
`mixers[i % len(mixers)]`. The default is Based's front end pairing, `[base_conv k=3, attention]`.

State: that of the mixer used at the layer; `state` and `return_state` (prefill → decode) are passed on to
it, so the parallel form continues from a state as that mixer's does. Token ids (`tokens_bl`) are passed on
to a layer mixer that reads them (`uses_tokens`, e.g. sparse_attention's programmatic selection).
"""

import dataclasses
from typing import Any

from flax import nnx
import jax

from zoo_jax.mixers import registry


@dataclasses.dataclass(frozen=True)
class HybridConfig:
  mixers: tuple[dict, ...] = ({"name": "base_conv", "kernel_size": 3}, {"name": "attention"})

  def validate(self, field: str) -> None:
    if not self.mixers:
      raise ValueError(f"{field}.mixers must name at least one mixer")
    for i, sub in enumerate(self.mixers):
      registry.parse(sub, f"{field}.mixers[{i}]")

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    registry.check_shapes(self.layer_mixer(layer_idx), d_model=d_model, seq_len=seq_len, layer_idx=layer_idx,
                          field=f"{field}.mixers[{layer_idx % len(self.mixers)}]")

  def check_dtype(self, field: str, dtype: Any) -> None:
    for i, sub in enumerate(self.mixers):
      registry.check_dtype(sub, dtype, f"{field}.mixers[{i}]")

  def layer_mixer(self, layer_idx: int) -> dict:
    return self.mixers[layer_idx % len(self.mixers)]


@registry.register("hybrid", hparams=HybridConfig, state_size_formula="that of mixers[layer % len(mixers)]")
class Hybrid(nnx.Module):

  def __init__(self, cfg: HybridConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    self.mixer = registry.build(cfg.layer_mixer(layer_idx), d_model=d_model, seq_len=seq_len,
                                layer_idx=layer_idx, n_layers=n_layers, rngs=rngs, dtype=dtype,
                                field=f"model.mixer.mixers[{layer_idx % len(cfg.mixers)}]")
    self.uses_tokens = getattr(self.mixer, "uses_tokens", False)
    self.dropout_rate = getattr(self.mixer, "dropout_rate", 0.0)  # this layer's mixer's (attention dropout)

  @staticmethod
  def state_size(cfg: HybridConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    return registry.state_size(cfg.layer_mixer(layer_idx), d_model=d_model, seq_len=seq_len,
                               layer_idx=layer_idx)

  def __call__(self, x_bld: jax.Array, tokens_bl: jax.Array | None = None, state: Any = None,
               return_state: bool = False, dropout_key: jax.Array | None = None) -> Any:
    return registry.apply(self.mixer, x_bld, tokens_bl, state=state, return_state=return_state,
                          dropout_key=dropout_key)

  def init_state(self, batch_size: int) -> Any:
    return self.mixer.init_state(batch_size)

  def step(self, state: Any, x_bd: jax.Array) -> tuple[Any, jax.Array]:
    return self.mixer.step(state, x_bd)
