"""BaseConv (Zoology, Section 4 / Arora et al. 2023): a gated convolution, y = conv(u) ⊙ (u W + b) + u.

The convolution is either a short depthwise causal convolution of width k, or a long convolution over the
whole sequence computed by FFT, with an explicit free filter or an implicit filter (a small MLP of
positional features). Zoology's Figure-2 model uses `kernel_size = [3, -1]`: layer 0 a width-3 short conv,
layer 1 a long implicit conv.

Hyperparameters (Zoology defaults): `kernel_size` = 3 (an int, or one entry per layer; -1 means "long",
the whole sequence); `implicit_long_conv` = True in Zoology's MQAR configs (False: explicit filter);
`implicit_d_emb` = 3, `implicit_d_hidden` = 16; `use_act` = False (True: SiLU on both branches).

`conv_implementation` = None (zoo_jax's, not Zoology's) picks the kernel path: None (the fastest measured
on the backend), 'reference', 'xla', 'monarch' or 'pallas' (`zoo_jax/ops/`); the outputs agree to round-off.

Differences from Zoology's PyTorch `BaseConv`: a per-layer `kernel_size` list shorter than n_layers is an
error at start-up (Zoology raises at construction). A long conv without `use_act` runs as one gated
convolution core, y = proj(u) ⊙ (h ∗ u + u) + u = `ops.gated_conv(u, h, out_gate=proj(u), d=1)` + u
(float32 inside, one rounding to the compute dtype at the end, where Zoology rounds after each op); with
`use_act` the SiLUs sit between the convolution and the gate, so it is `ops.long_conv` then the gate.

State: a short conv keeps its last k-1 inputs, d·(k-1); a long conv needs the whole history, d·L (and
the position t). Given a state, `__call__` continues after it (prefill → decode): a short conv runs over
[window, u] and keeps the last l outputs; a long conv writes u into the history at [t, t+l) and convolves
the whole history once by FFT, keeping the outputs at [t, t+l) (`_filters.long_conv_continued`). With
`return_state` the state after u comes back too: the last k-1 inputs, or the history with u written in.
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax.ops import gated_conv
from zoo_jax import layers
from zoo_jax.mixers import _filters, registry

LONG = -1


@dataclasses.dataclass(frozen=True)
class BaseConvConfig:
  kernel_size: int | tuple[int, ...] = 3
  implicit_long_conv: bool = True
  implicit_d_emb: int = 3
  implicit_d_hidden: int = 16
  use_act: bool = False
  conv_implementation: str | None = None

  def validate(self, field: str) -> None:
    layers.validate_conv_implementation(self.conv_implementation, field)
    sizes = self.kernel_size if isinstance(self.kernel_size, tuple) else (self.kernel_size,)
    if not sizes:
      raise ValueError(f"{field}.kernel_size must not be empty")
    for k in sizes:
      if k != LONG and k < 1:
        raise ValueError(f"{field}.kernel_size entries must be >= 1 or -1 (long), got {k}")
    if self.implicit_d_emb < 3 or self.implicit_d_emb % 2 == 0:
      raise ValueError(f"{field}.implicit_d_emb must be odd and >= 3, got {self.implicit_d_emb}")
    if self.implicit_d_hidden < 1:
      raise ValueError(f"{field}.implicit_d_hidden must be >= 1, got {self.implicit_d_hidden}")

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    self.layer_kernel_size(layer_idx, seq_len)  # a per-layer list must cover every layer
    per_layer = isinstance(self.kernel_size, tuple)
    k = self.kernel_size[layer_idx] if per_layer else self.kernel_size
    if k > seq_len:  # it would silently become a long (implicit, with implicit_long_conv) convolution
      raise ValueError(f"{field}.kernel_size{f'[{layer_idx}]' if per_layer else ''} must be <= the sequence "
                       f"length L ({seq_len}), or -1 for a long convolution, got {k}")

  def layer_kernel_size(self, layer_idx: int, seq_len: int) -> int:
    if isinstance(self.kernel_size, tuple):
      if layer_idx >= len(self.kernel_size):
        raise ValueError(f"model.mixer.kernel_size has {len(self.kernel_size)} entries, "
                         f"fewer than the layers (needs one for layer {layer_idx})")
      k = self.kernel_size[layer_idx]
    else:
      k = self.kernel_size
    return seq_len if k == LONG or k >= seq_len else k


@registry.register("base_conv", hparams=BaseConvConfig,
                   state_size_formula="d·(k-1) with a short conv of width k; d·L with a long conv")
class BaseConv(nnx.Module):

  def __init__(self, cfg: BaseConvConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    kernel_size = cfg.layer_kernel_size(layer_idx, seq_len)
    self.use_act, self.seq_len = cfg.use_act, seq_len
    self.implementation = impl = cfg.conv_implementation
    self.projection = layers.linear(d_model, d_model, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
    if kernel_size < seq_len:
      self.conv = layers.ShortConvolution(d_model, kernel_size, rngs=rngs, dtype=dtype, implementation=impl)
    elif cfg.implicit_long_conv:
      self.conv = layers.ImplicitLongConvolution(d_model, seq_len, d_emb=cfg.implicit_d_emb,
                                                 d_hidden=cfg.implicit_d_hidden, rngs=rngs, dtype=dtype,
                                                 implementation=impl)
    else:
      self.conv = layers.LongConvolution(d_model, seq_len, rngs=rngs, dtype=dtype, implementation=impl)

  @staticmethod
  def state_size(cfg: BaseConvConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    k = cfg.layer_kernel_size(layer_idx, seq_len)
    return d_model * (seq_len if k >= seq_len else k - 1)

  def __call__(self, u_bld: jax.Array, state: Any = None, return_state: bool = False) -> Any:
    """y (b, l, d), continuing after `state` (like `init_state`'s) if given; `(y, state after u)` with
    `return_state`."""
    if state is None and not return_state:
      return self._parallel(u_bld)
    if isinstance(self.conv, layers.ShortConvolution):
      u_conv, state = _filters.short_conv_continued(self.conv, state, u_bld)
      y_bld = self._gate(u_conv, u_bld)
    elif state is None:
      y_bld = self._parallel(u_bld)
      state = _filters.append_history(self.init_state(u_bld.shape[0]), u_bld)
    else:
      hu_bld, state = _filters.long_conv_continued(state, u_bld, self.conv.filter(self.seq_len),
                                                   implementation=self.implementation)
      y_bld = self._gate((hu_bld + u_bld).astype(self.conv.dtype), u_bld)
    return (y_bld, state) if return_state else y_bld

  def _parallel(self, u_bld: jax.Array) -> jax.Array:
    if isinstance(self.conv, layers.ShortConvolution) or self.use_act:
      return self._gate(self.conv(u_bld), u_bld)
    # proj ⊙ (h ∗ u + u) + u as one gated convolution core (D = 1 is the `+ u` inside the gate).
    length, d = u_bld.shape[1:]
    y_bld = gated_conv.gated_conv(u_bld, self.conv.filter(length), out_gate=self.projection(u_bld),
                                  d_c=jnp.ones((d,), jnp.float32), implementation=self.implementation)
    return y_bld + u_bld

  def _gate(self, u_conv: jax.Array, u: jax.Array) -> jax.Array:
    u_proj = self.projection(u)
    if self.use_act:
      u_conv, u_proj = jax.nn.silu(u_conv), jax.nn.silu(u_proj)
    return u_conv * u_proj + u

  def init_state(self, batch_size: int) -> Any:
    return self.conv.init_state(batch_size)

  def step(self, state: Any, u_bd: jax.Array) -> tuple[Any, jax.Array]:
    """One token of the recurrent form: the conv's state (last k-1 inputs, or the whole history)."""
    state, u_conv = self.conv.step(state, u_bd)
    return state, self._gate(u_conv, u_bd)
