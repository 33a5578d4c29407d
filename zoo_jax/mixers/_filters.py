"""Filters shared by the convolution and SSM mixers (BaseConv, Hyena, H3, S4D, Mamba).

- `HyenaFilter`: Hyena's implicit filter (Poli et al. 2023, Section 3.3), an MLP with sine activations of
  positional features, times an exponentially decaying window.
- `DiagonalSSM`: a complex diagonal state-space model (S4D, Gu et al. 2022) with its two views, the
  convolution kernel K[l] = 2 Re Σ_n C_n dB_n dA_n^l (a Vandermonde product) and the recurrence
  x[t] = dA x[t-1] + dB u[t], y[t] = 2 Re(C x[t]). H3's diagonal SSM (bilinear) and S4D (ZOH) use it.
- State passing (prefill → decode, `zoo_jax/mixers/registry.py`): `short_conv_continued` runs a
  `layers.ShortConvolution` after its window of the last k-1 inputs; `long_conv_continued` runs a long
  convolution after its stored input history; `DiagonalSSM.free_response` / `final_state` continue the
  diagonal SSM from its modes. Each returns the state after the new inputs, computed in parallel form.

Dimension legend: b batch, l length, L the model's sequence length (a long conv's history), k a short
conv's width, c channels, n complex modes (d_state / 2; the conjugate modes are implicit in the 2 Re(·)),
o the filter MLP's width, e positional-feature width, 2 a (real, imaginary) pair.
"""

import math
from typing import Any, Literal

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers
from zoo_jax.ops import long_conv


class HyenaFilter(nnx.Module):
  """h[t, c] = MLP(z[t])[c] · (exp(-t̂ |δ_c|) + shift), t̂ = t / (L-1), Zoology's `hyena.Filter`.

  z[t] = `layers.positional_features` (time and `(emb_dim-1)/2` complex exponentials). The MLP is
  Linear(e, o), Sin, [Linear(o, o), Sin] × num_inner_mlps, Linear(o, c, no bias), where every Sin is the
  *same* module, sin(f ⊙ x) with one learnable frequency vector f (o,) initialised to `w`, as in Zoology
  (one `act` instance appears in the Sequential several times). Linear weights ~ N(0, 0.02), biases 0:
  Zoology's `_init_weights` reaches these Linears too. The decay rates δ_c are spaced linearly from
  log(target)/slow_decay_pct to log(target)/fast_decay_pct over the channels and are not trained
  (Zoology registers them as a buffer, `modulation_lr = 0`).
  """

  def __init__(self, channels: int, seq_len: int, *, emb_dim: int, order: int, num_inner_mlps: int,
               w: float, fast_decay_pct: float, slow_decay_pct: float, target: float, shift: float,
               rngs: nnx.Rngs):
    self.seq_len = seq_len
    self.emb_dim = emb_dim
    widths = [emb_dim] + [order] * (num_inner_mlps + 1)
    self.hidden = nnx.List([layers.linear(a, b, axes=(None, None), rngs=rngs)
                            for a, b in zip(widths[:-1], widths[1:])])
    self.last = layers.linear(order, channels, axes=(None, None), rngs=rngs, use_bias=False)
    self.freq_o = nnx.Param(jnp.full((order,), w, jnp.float32))
    self.channels = channels
    self.decay_range = (math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct)
    self.shift = shift

  def __call__(self, length: int) -> jax.Array:
    """The filter's first `length` taps, (length, c) float32."""
    h_lo = layers.positional_features(self.seq_len, self.emb_dim)[:length]
    for linear in self.hidden:
      h_lo = jnp.sin(self.freq_o[...] * linear(h_lo))
    t_l1 = jnp.linspace(0.0, 1.0, self.seq_len)[:length, None]
    deltas_c = jnp.linspace(*self.decay_range, self.channels)
    return self.last(h_lo) * (jnp.exp(-t_l1 * jnp.abs(deltas_c)) + self.shift)


def _expm1(z: jax.Array) -> jax.Array:
  """e^z - 1 for complex z without float32 cancellation near 0 (dt·A is ~5e-4 for S4D-Lin's slowest mode
  at dt = 1e-3, where e^z - 1 in float32 keeps only ~4 digits)."""
  x, y = jnp.real(z), jnp.imag(z)
  return (jnp.expm1(x) * jnp.cos(y) - 2 * jnp.sin(y / 2) ** 2) + 1j * (jnp.exp(x) * jnp.sin(y))


def _powers(log_da_cn: jax.Array, length: int) -> jax.Array:
  """dA^l (length, c, n) for l < length: the Vandermonde factor of the kernel and of the state updates."""
  return jnp.exp(jnp.arange(length, dtype=jnp.float32)[:, None, None] * log_da_cn)


def _complex(pair: jax.Array) -> jax.Array:
  return jax.lax.complex(pair[..., 0], pair[..., 1])


def validate_ssm_hparams(cfg: Any, field: str) -> None:
  """`d_state` (even, >= 2), `dt_min`, `dt_max` (finite, 0 < dt_min <= dt_max) of a mixer built on
  `DiagonalSSM`; one-line errors naming the key."""
  if cfg.d_state < 2 or cfg.d_state % 2:
    raise ValueError(f"{field}.d_state must be even and >= 2 (N/2 complex modes), got {cfg.d_state}")
  if not (math.isfinite(cfg.dt_min) and cfg.dt_min > 0):
    raise ValueError(f"{field}.dt_min must be a positive number, got {cfg.dt_min}")
  if not (math.isfinite(cfg.dt_max) and cfg.dt_max >= cfg.dt_min):
    raise ValueError(f"{field}.dt_max must be a number >= dt_min ({cfg.dt_min}), got {cfg.dt_max}")


class DiagonalSSM(nnx.Module):
  """One complex diagonal SSM per channel with d_state/2 modes, S4D-Lin initialisation.

  A_n = -exp(log_a_real) + i·a_imag = -1/2 + iπn; dt = exp(log_dt), log_dt ~ U[log dt_min, log dt_max];
  C ~ complex N(0, 1) (real and imaginary parts N(0, 1/2), PyTorch's complex `randn`). Discretisation:
    zoh:      dA = exp(dt A),                 dB = (exp(dt A) - 1) / A · B
    bilinear: dA = (1 + dt A/2) / (1 - dt A/2), dB = dt / (1 - dt A/2) · B
  B = 1 (S4D's standalone layer, no B parameter) or, with `learn_b`, a trained complex B initialised to 1
  (state-spaces' `SSKernelDiag`, which H3 uses; B and C are redundant there, as in the original). Every
  parameter is trained as an ordinary parameter: state-spaces' per-parameter optimizer hints (no weight
  decay, lr 1e-3 on A, B, dt) are ignored by Zoology's trainer, and zoo_jax has no parameter groups.
  """

  def __init__(self, channels: int, d_state: int, *, discretization: Literal["zoh", "bilinear"],
               learn_b: bool, dt_min: float, dt_max: float, rngs: nnx.Rngs):
    modes = d_state // 2
    self.discretization = discretization
    self.log_dt_c = nnx.Param(jax.random.uniform(rngs.params(), (channels,), jnp.float32,
                                                 math.log(dt_min), math.log(dt_max)))
    self.log_a_real_cn = nnx.Param(jnp.full((channels, modes), math.log(0.5), jnp.float32))
    self.a_imag_cn = nnx.Param(jnp.tile(math.pi * jnp.arange(modes, dtype=jnp.float32), (channels, 1)))
    self.c_cn2 = nnx.Param(math.sqrt(0.5) * jax.random.normal(rngs.params(), (channels, modes, 2)))
    self.b_cn2 = (nnx.Param(jnp.zeros((channels, modes, 2)).at[..., 0].set(1.0)) if learn_b else None)

  def discrete(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log dA, dB, C), each (c, n) complex64."""
    dt_c1 = jnp.exp(self.log_dt_c[...])[:, None]
    a_cn = jax.lax.complex(-jnp.exp(self.log_a_real_cn[...]), self.a_imag_cn[...])
    dta_cn = a_cn * dt_c1
    if self.discretization == "zoh":
      log_da_cn, db_cn = dta_cn, _expm1(dta_cn) / a_cn
    else:
      log_da_cn, db_cn = jnp.log((1 + dta_cn / 2) / (1 - dta_cn / 2)), dt_c1 / (1 - dta_cn / 2)
    if self.b_cn2 is not None:
      db_cn = db_cn * _complex(self.b_cn2[...])
    return log_da_cn, db_cn, _complex(self.c_cn2[...])

  def kernel(self, length: int) -> jax.Array:
    """K (length, c) float32: K[l] = 2 Re Σ_n C_n dB_n exp(l log dA_n)."""
    log_da_cn, db_cn, c_cn = self.discrete()
    return 2 * jnp.real(jnp.sum(c_cn * db_cn * _powers(log_da_cn, length), axis=-1))

  def init_state(self, batch_shape: tuple[int, ...]) -> dict[str, jax.Array]:
    """x (*batch_shape, c, n) as real and imaginary float32 leaves: d_state reals per channel."""
    shape = (*batch_shape, *self.c_cn2.shape[:2])
    return dict(re=jnp.zeros(shape, jnp.float32), im=jnp.zeros(shape, jnp.float32))

  def step(self, state: dict[str, jax.Array], u_c: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """One step on u (..., c) float32: x = dA x + dB u, y = 2 Re(C x) (..., c)."""
    log_da_cn, db_cn, c_cn = self.discrete()
    x_cn = (jax.lax.complex(state["re"], state["im"]) * jnp.exp(log_da_cn)
            + db_cn * u_c[..., None].astype(jnp.float32))
    y_c = 2 * jnp.real(jnp.sum(c_cn * x_cn, axis=-1))
    return dict(re=jnp.real(x_cn), im=jnp.imag(x_cn)), y_c

  def free_response(self, state: dict[str, jax.Array], length: int) -> jax.Array:
    """What the modes x0 (..., c, n) add to the next `length` outputs, (..., length, c) float32:
    y[i] = 2 Re Σ_n C_n dA_n^(i+1) x0_n (the input's part is the kernel's convolution, `kernel`)."""
    log_da_cn, _, c_cn = self.discrete()
    readout_lcn = c_cn * jnp.exp(log_da_cn) * _powers(log_da_cn, length)
    x0_cn = jax.lax.complex(state["re"], state["im"])
    return 2 * jnp.real(jnp.einsum("lcn,...cn->...lc", readout_lcn, x0_cn, precision="highest"))

  def final_state(self, state: dict[str, jax.Array] | None, u_lc: jax.Array) -> dict[str, jax.Array]:
    """The modes after the inputs u (..., l, c), from `state` (None: zeros), in parallel form:
    x[l] = dA^l x0 + Σ_s dA^(l-1-s) dB u[s], one contraction over s (no loop over tokens)."""
    log_da_cn, db_cn, _ = self.discrete()
    length = u_lc.shape[-2]
    # Token s gets dA^(l-1-s): the inputs newest first meet the powers `kernel` computes (shared under jit).
    weight_lcn = db_cn * _powers(log_da_cn, length)
    newest_first_lc = jnp.flip(u_lc.astype(jnp.float32), axis=-2)
    # Two real contractions: u is real, and an f32 matmul may take TF32 on GPU without "highest".
    re_cn, im_cn = (jnp.einsum("...lc,lcn->...cn", newest_first_lc, part, precision="highest")
                    for part in (jnp.real(weight_lcn), jnp.imag(weight_lcn)))
    x_cn = jax.lax.complex(re_cn, im_cn)
    if state is not None:
      x_cn = x_cn + jnp.exp(length * log_da_cn) * jax.lax.complex(state["re"], state["im"])
    return dict(re=jnp.real(x_cn), im=jnp.imag(x_cn))


# ------------------------------------------------------------------------------------ state passing


def last_inputs(window_bwc: jax.Array | None, u_blc: jax.Array, count: int) -> jax.Array:
  """The last `count` inputs (b, count, c) float32 after the window (None: zeros) and then u: the state
  of a short conv (count = k-1) or of H3's shift SSM."""
  if window_bwc is None:
    window_bwc = jnp.zeros((u_blc.shape[0], count, u_blc.shape[2]), jnp.float32)
  seen_bwc = jnp.concatenate([window_bwc, u_blc.astype(jnp.float32)], axis=1)
  return seen_bwc[:, seen_bwc.shape[1] - count:]


def short_conv_continued(conv: layers.ShortConvolution, state: dict[str, jax.Array] | None,
                         u_blc: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`conv(u)` continuing after `state` (its `init_state` window of the last k-1 inputs; None: the sequence
  starts here), and the window after u. The conv runs over [window, u] and keeps the last l outputs."""
  kept = conv.kernel_size - 1
  if state is None:
    y_blc = conv(u_blc)
  else:
    y_blc = conv(jnp.concatenate([state["window"].astype(u_blc.dtype), u_blc], axis=1))[:, kept:]
  return y_blc, dict(window=last_inputs(None if state is None else state["window"], u_blc, kept))


def append_history(state: dict[str, jax.Array], u_blc: jax.Array) -> dict[str, jax.Array]:
  """A long conv's state (`layers.long_conv_init_state`: history (b, L, c), position t (b,)) after u,
  written at [t, t+l) of each row; t + l must not exceed L, the history's capacity."""
  history_blc = jax.vmap(lambda h, u, t: jax.lax.dynamic_update_slice_in_dim(h, u, t, axis=0))(
      state["history"], u_blc.astype(jnp.float32), state["t"])
  return dict(history=history_blc, t=state["t"] + u_blc.shape[1])


def long_conv_continued(state: dict[str, jax.Array], u_blc: jax.Array, h_lc: jax.Array, *,
                        implementation: str | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Σ_{s<=t+i} h[t+i-s] u[s] (b, l, c) float32 at the positions t+i of u, continuing the stored history,
  and the state after u. One causal convolution (`ops.long_conv`, the parallel form's kernel) over the
  whole history (L) with u written at [t, t+l): the positions past t+l hold zeros and, the convolution
  being causal, change nothing; the l outputs at [t, t+l) are kept."""
  state = append_history(state, u_blc)
  y_blc = long_conv.causal_conv(state["history"], h_lc, implementation=implementation)
  start_b = state["t"] - u_blc.shape[1]
  y_blc = jax.vmap(lambda y, t: jax.lax.dynamic_slice_in_dim(y, t, u_blc.shape[1], axis=0))(y_blc, start_b)
  return y_blc, state

