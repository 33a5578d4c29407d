"""Hyena of order 2 (Poli et al. 2023, "Hyena Hierarchy"), Zoology's `hyena.Hyena`.

    x1, x2, v = split(shortconv_k(x W_in + b_in))          # 3·d channels, depthwise causal conv of width k
    y = x2 ⊙ (h * (x1 ⊙ v) + D ⊙ (x1 ⊙ v))                  # * = causal long convolution, by FFT
    out = y W_out + b_out

h (L, d) is an implicit filter (`_filters.HyenaFilter`): an MLP with sine activations of positional
features, times an exponentially decaying window; D (d) is the filter's bias, ~ N(0, 1) as in Zoology.

Hyperparameters (Zoology's defaults; its Figure-2 configs set only `l_max`): `filter_order` = 64 (the
filter MLP's width), `short_filter_order` = 3 (k), `emb_dim` = 3 (positional features: time and one
complex exponential), `num_inner_mlps` = 2, `w` = 1.0 (initial sine frequency), `fast_decay_pct` = 0.3,
`slow_decay_pct` = 1.5, `target` = 1e-2, `shift` = 0.0 (the modulation window
exp(-t|δ|) + shift, δ spaced linearly over channels from log(target)/slow to log(target)/fast).

Differences from Zoology's PyTorch `Hyena`:
- the positional features z are a constant. Zoology registers them as a parameter with a "learning rate"
  of 1e-5 (`lr_pos_emb`), a hint its trainer ignores, so there they train at the full learning rate;
  the hint's intent (frozen in practice) is kept. Likewise the filter's lr 1e-3 / weight decay 0 hints
  are ignored by both trainers: every parameter is in one optimizer group.
- the short conv, the gating and the long convolution run in float32 whatever the compute dtype (the
  projections use it); x2 ⊙ (h ∗ (x1 ⊙ v) + D x1 ⊙ v) is one call of the gated convolution core
  `ops.gated_conv` (its `xla` path is the same zero-padded FFT, n = 2L, as Zoology's `fftconv_ref`).
  `conv_implementation` (zoo_jax's, default None = the fastest measured on the backend) picks the kernel
  path ('reference', 'xla', 'monarch', 'pallas') of both convolutions; the outputs agree to round-off.
- not exposed, because Zoology's defaults are the only values its code handles or its MQAR configs use:
  `num_heads` = 1 and `num_blocks` = 1 (its split into x1, x2, v fails for `num_heads` > 1),
  `bidirectional` = False, `modulate` = True, `bias` = True, `normalized` = False, and `dropout` = 0.0
  (on x1 ⊙ v) and `filter_dropout` = 0.0 (its filter's forward never applies it; `zoology/mixers/hyena.py`
  at 0a76ef2), which its Figure-2 configs leave at 0: no dropout inside this mixer (the model's
  `embed_dropout` / `resid_dropout`, `zoo_jax.model`, apply around it).
- the recurrent form (`init_state` / `step`) is new: Zoology's Hyena has none.

State: the short conv's last k-1 inputs on 3·d channels and the long conv's whole input history (of
x1 ⊙ v), 3·d·(k-1) + d·L elements per example (plus an integer position t). Given a state, `__call__`
continues after it (prefill → decode): the short conv runs over [window, x W_in] and keeps the last l
outputs; x1 ⊙ v is written into the history at [t, t+l) and the whole history is convolved once by FFT,
keeping the outputs at [t, t+l) (`_filters.long_conv_continued`). With `return_state` the state after x
comes back too (the last k-1 inputs, the history with x1 ⊙ v written in, t + l).
"""

import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax.ops import gated_conv
from zoo_jax import layers
from zoo_jax.mixers import _filters, registry


@dataclasses.dataclass(frozen=True)
class HyenaConfig:
  filter_order: int = 64
  short_filter_order: int = 3
  emb_dim: int = 3
  num_inner_mlps: int = 2
  w: float = 1.0
  fast_decay_pct: float = 0.3
  slow_decay_pct: float = 1.5
  target: float = 1e-2
  shift: float = 0.0
  conv_implementation: str | None = None

  def validate(self, field: str) -> None:
    layers.validate_conv_implementation(self.conv_implementation, field)
    for key in ("filter_order", "short_filter_order"):
      if getattr(self, key) < 1:
        raise ValueError(f"{field}.{key} must be >= 1, got {getattr(self, key)}")
    if self.emb_dim < 3 or self.emb_dim % 2 == 0:
      raise ValueError(f"{field}.emb_dim must be odd and >= 3, got {self.emb_dim}")
    if self.num_inner_mlps < 0:
      raise ValueError(f"{field}.num_inner_mlps must be >= 0, got {self.num_inner_mlps}")
    for key in ("w", "fast_decay_pct", "slow_decay_pct"):
      value = getattr(self, key)
      if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{field}.{key} must be a positive number, got {value}")
    if not 0 < self.target < 1:
      raise ValueError(f"{field}.target must be in (0, 1), got {self.target}")
    if not (math.isfinite(self.shift) and self.shift >= 0):
      raise ValueError(f"{field}.shift must be a number >= 0, got {self.shift}")


@registry.register("hyena", hparams=HyenaConfig,
                   state_size_formula="3·d·(k-1) + d·L (short conv of width k = short_filter_order, "
                                      "long conv history)")
class Hyena(nnx.Module):

  def __init__(self, cfg: HyenaConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    self.d_model, self.seq_len, self.dtype = d_model, seq_len, dtype
    # Replicated over `model` (logical None): the short conv runs over the fused 3·d channels before the
    # split, so a column split would put x1, x2 and v on different shards.
    self.in_proj = layers.linear(d_model, 3 * d_model, axes=("embed", None), rngs=rngs, dtype=dtype)
    self.implementation = cfg.conv_implementation
    self.short_filter = layers.ShortConvolution(3 * d_model, cfg.short_filter_order, rngs=rngs,
                                                implementation=cfg.conv_implementation)
    self.long_filter = _filters.HyenaFilter(
        d_model, seq_len, emb_dim=cfg.emb_dim, order=cfg.filter_order, num_inner_mlps=cfg.num_inner_mlps,
        w=cfg.w, fast_decay_pct=cfg.fast_decay_pct, slow_decay_pct=cfg.slow_decay_pct, target=cfg.target,
        shift=cfg.shift, rngs=rngs)
    self.filter_bias_d = nnx.Param(jax.random.normal(rngs.params(), (d_model,)))
    self.out_proj = layers.linear(d_model, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                                  std=layers.out_proj_std(n_layers))

  @staticmethod
  def state_size(cfg: HyenaConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    return 3 * d_model * (cfg.short_filter_order - 1) + d_model * seq_len

  def __call__(self, x_bld: jax.Array, state: dict[str, Any] | None = None,
               return_state: bool = False) -> Any:
    """y (b, l, d), continuing after `state` (like `init_state`'s) if given; `(y, state after x)` with
    `return_state`."""
    u_blc = self.in_proj(x_bld).astype(jnp.float32)
    if state is None and not return_state:
      return self._gated_long_conv(*jnp.split(self.short_filter(u_blc), 3, axis=-1))
    u_blc, short = _filters.short_conv_continued(self.short_filter, None if state is None else state["short"],
                                                 u_blc)
    x1_bld, x2_bld, v_bld = jnp.split(u_blc, 3, axis=-1)
    if state is None:
      y_bld = self._gated_long_conv(x1_bld, x2_bld, v_bld)
      long = _filters.append_history(
          layers.long_conv_init_state(x_bld.shape[0], self.seq_len, self.d_model), x1_bld * v_bld)
    else:
      v_bld = x1_bld * v_bld
      hv_bld, long = _filters.long_conv_continued(state["long"], v_bld, self.long_filter(self.seq_len),
                                                  implementation=self.implementation)
      y_bld = self.out_proj((x2_bld * (hv_bld + self.filter_bias_d[...] * v_bld)).astype(self.dtype))
    return (y_bld, dict(short=short, long=long)) if return_state else y_bld

  def _gated_long_conv(self, x1_bld: jax.Array, x2_bld: jax.Array, v_bld: jax.Array) -> jax.Array:
    """out_proj(x2 ⊙ (h ∗ (x1 ⊙ v) + D ⊙ x1 ⊙ v)), the sequence starting at x1[0]."""
    y_bld = gated_conv.gated_conv(v_bld, self.long_filter(x1_bld.shape[1]), in_gate=x1_bld, out_gate=x2_bld,
                                  d_c=self.filter_bias_d[...], implementation=self.implementation)
    return self.out_proj(y_bld.astype(self.dtype))

  def init_state(self, batch_size: int) -> dict[str, Any]:
    return dict(short=self.short_filter.init_state(batch_size),
                long=layers.long_conv_init_state(batch_size, self.seq_len, self.d_model))

  def step(self, state: dict[str, Any], x_bd: jax.Array) -> tuple[dict[str, Any], jax.Array]:
    """One token: the short conv's window, then the long conv over the stored history of x1 ⊙ v."""
    short, u_bc = self.short_filter.step(state["short"], self.in_proj(x_bd).astype(jnp.float32))
    x1_bd, x2_bd, v_bd = jnp.split(u_bc, 3, axis=-1)
    v_bd = x1_bd * v_bd
    long, y_bd = layers.long_conv_step(state["long"], v_bd, self.long_filter(self.seq_len))
    y_bd = y_bd + (self.filter_bias_d[...] - 1) * v_bd  # long_conv_step adds v itself; D replaces it
    return dict(short=short, long=long), self.out_proj((x2_bd * y_bd).astype(self.dtype))
