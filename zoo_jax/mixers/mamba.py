"""Mamba (Gu & Dao 2023): a selective state-space model, the S6 layer of the paper's Algorithm 2.

    x, z = split(u W_in)                              in-projection d -> 2e, e = expand·d
    x = SiLU(causal depthwise conv_{d_conv}(x))
    δ, B, C = split(x W_x)                            widths r = dt_rank, n = d_state, n
    Δ = softplus(δ W_dt + b_dt)                       (b, l, e): one step size per channel and token
    A = -exp(A_log)                                   (e, n), diagonal
    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t ⊙ x_t) B_tᵀ     (e, n) per example: the zero-order-hold of eq. 2
    y_t = h_t C_t + D ⊙ x_t
    out = (y ⊙ SiLU(z)) W_out

Dimension legend: b batch, l length, d model width, e inner width (expand·d), n SSM state (d_state),
r rank of the Δ projection (dt_rank), k conv width (d_conv).

Hyperparameters (Zoology's `Mamba` = mamba_ssm's defaults; its Figure-2 config sets none of them):
`d_state` = 16, `d_conv` = 4, `expand` = 2, `dt_rank` = 'auto' (ceil(d/16)), `dt_min` = 1e-3,
`dt_max` = 0.1, `dt_init` = 'random', `dt_scale` = 1, `dt_init_floor` = 1e-4, `bias` = False (in/out
projections). `scan` picks the parallel form's algorithm (both the exact recurrence, in float32):
'sequential' (default), a `lax.scan` over tokens that computes y_t inside the loop and never holds the
(b, l, e, n) states, or 'associative', `lax.associative_scan` over time on the pairs
(exp(Δ_t A), Δ_t x_t B_t), log-depth but materialising several (b, l, e, n) arrays. Measured on XLA:CPU
(2 shared cores) for the whole mixer at L = 1024, d = 64, batch 4, best of 10 in 3 rounds: forward
22-53 ms sequential vs 305-518 ms associative, forward + backward 267-424 ms vs 780-981 ms; so
'sequential' is the default. 'associative' is the log-depth alternative for accelerators (not measured
there).

Initialisation: A_log = log(1..n) in every channel (S4D-real), D = 1, the Δ bias b_dt =
softplus⁻¹(Δ₀) with Δ₀ log-uniform in [dt_min, dt_max] (floored at dt_init_floor), W_dt ~
U(±dt_scale/sqrt(r)) ('random') or the constant dt_scale/sqrt(r) ('constant'), as in mamba_ssm. The conv
keeps PyTorch's Conv1d init (`layers.ShortConvolution`); in_proj and x_proj ~ N(0, 0.02) and out_proj ~
N(0, 0.02/sqrt(2·n_layers)), as Zoology's `_init_weights` leaves them.

Differences from Zoology's PyTorch code (which wraps mamba_ssm's CUDA kernels):
- Zoology's `_init_weights` runs over every `nn.Linear` after the mixer is built, so it also overwrites
  Mamba's Δ projection: W_dt ~ N(0, 0.02) and b_dt = 0, i.e. Δ = softplus(0) ≈ 0.69 in every channel at
  init (mamba_ssm's `_no_reinit` flag is honoured only by its own `MambaInit`, which Zoology does not
  call). Here W_dt and b_dt keep Mamba's intended init above.
- The selective scan is `lax.scan` / `lax.associative_scan` in float32 instead of the fused CUDA
  `selective_scan_fn` / `mamba_inner_fn`; Δ = softplus(δ W_dt + b_dt) is computed in float32 (W_dt and b_dt
  applied in float32, as the kernel adds its `delta_bias` in float32), whatever the compute dtype.
- `conv_bias` (always True in Zoology's configs) and `use_fast_path` (a kernel switch) are not options.
- State size: Zoology's `Mamba.state_size` reports 2·d·d_state, the SSM state only (= e·n at expand 2);
  here the conv window, which the recurrent form must also keep, is counted too.

Zoology trains Mamba in its `MambaBlock` (`block_type='MambaBlock'`, state mixer Identity): per layer
x = x + mixer(RMSNorm(x)), one residual branch, no second norm or MLP, residual in float32, a final
LayerNorm. In zoo_jax that is `model.block = 'prenorm'` with `model.state_mixer = 'none'`, except that
`model.py` normalises with LayerNorm where `MambaBlock` uses RMSNorm (weight only, eps 1e-5), and keeps
the residual stream in the compute dtype.

State: the last k-1 conv inputs and the SSM state, e·(k-1) + e·n elements per example per layer.
Given a state, `__call__` continues after it (prefill → decode): the conv runs over [window, x] and keeps
the last l outputs, and the selective scan starts from h (either scan); with `return_state` it returns
the last k-1 conv inputs and the scan's final h as well.
"""

import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers
from zoo_jax.mixers import _filters, registry

SCANS = ("sequential", "associative")
DT_INITS = ("random", "constant")
# Tokens per iteration of the sequential scan's loop (same arithmetic, fewer loop trips). On CPU at
# L = 1024, d = 64, unroll 8 ran forward + backward in 267-424 ms against 421-444 ms for unroll 1; forward
# alone was within the noise of a shared machine.
SCAN_UNROLL = 8


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | str = "auto"
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init: str = "random"
  dt_scale: float = 1.0
  dt_init_floor: float = 1e-4
  bias: bool = False
  scan: str = "sequential"

  def validate(self, field: str) -> None:
    for name in ("d_state", "d_conv", "expand"):
      if getattr(self, name) < 1:
        raise ValueError(f"{field}.{name} must be >= 1, got {getattr(self, name)}")
    if isinstance(self.dt_rank, str) and self.dt_rank != "auto":
      raise ValueError(f"{field}.dt_rank must be 'auto' or an integer >= 1, got {self.dt_rank!r}")
    if isinstance(self.dt_rank, int) and self.dt_rank < 1:
      raise ValueError(f"{field}.dt_rank must be 'auto' or an integer >= 1, got {self.dt_rank}")
    if self.dt_max <= 0:
      raise ValueError(f"{field}.dt_max must be > 0, got {self.dt_max}")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"{field}.dt_min must be in (0, dt_max = {self.dt_max}], got {self.dt_min}")
    if self.dt_init not in DT_INITS:
      raise ValueError(f"{field}.dt_init must be one of {DT_INITS}, got {self.dt_init!r}")
    if self.dt_scale <= 0:
      raise ValueError(f"{field}.dt_scale must be > 0, got {self.dt_scale}")
    if self.dt_init_floor < 0:
      raise ValueError(f"{field}.dt_init_floor must be >= 0, got {self.dt_init_floor}")
    if self.scan not in SCANS:
      raise ValueError(f"{field}.scan must be one of {SCANS}, got {self.scan!r}")

  def inner_width(self, d_model: int) -> int:
    return self.expand * d_model

  def rank(self, d_model: int) -> int:
    return math.ceil(d_model / 16) if self.dt_rank == "auto" else self.dt_rank


# ------------------------------------------------------------------------------------ selective scan


def ssm_update(h_ben, x_be, dt_be, a_en, b_bn):
  """One token of the recurrence, h = exp(Δ A) ⊙ h + (Δ ⊙ x) Bᵀ (all float32)."""
  return jnp.exp(dt_be[..., None] * a_en) * h_ben + (dt_be * x_be)[..., None] * b_bn[:, None, :]


def ssm_readout(h_ben, c_bn):
  """y = h C, as an elementwise product and sum: an f32 matmul may run at reduced precision on GPU/TPU."""
  return (h_ben * c_bn[:, None, :]).sum(-1)


def selective_scan(x_ble, dt_ble, a_en, b_bln, c_bln, d_e, *, scan: str = "sequential", h0_ben=None,
                   return_state: bool = False) -> Any:
  """y (b, l, e) of h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t, y_t = h_t C_t + D x_t, in float32, from
  h = `h0_ben` (b, e, n) (None: zeros); `(y, h_l)` with `return_state`. The sequential scan starts its
  carry at h0 and ends with h_l; the associative scan adds (Π_{s<=t} exp(Δ_s A)) ⊙ h0, the cumulative
  decay it computes anyway, to every h_t."""
  x_ble, dt_ble, b_bln, c_bln = (v.astype(jnp.float32) for v in (x_ble, dt_ble, b_bln, c_bln))
  if scan == "associative":
    decay_blen = jnp.exp(dt_ble[..., None] * a_en)
    input_blen = (dt_ble * x_ble)[..., None] * b_bln[:, :, None, :]
    combine = lambda early, late: (early[0] * late[0], late[0] * early[1] + late[1])
    decay_blen, h_blen = jax.lax.associative_scan(combine, (decay_blen, input_blen), axis=1)
    if h0_ben is not None:
      h_blen = h_blen + decay_blen * h0_ben[:, None]
    y_ble = (h_blen * c_bln[:, :, None, :]).sum(-1)
    h_ben = h_blen[:, -1]
  else:
    def token(h_ben, inputs):
      x_be, dt_be, b_bn, c_bn = inputs
      h_ben = ssm_update(h_ben, x_be, dt_be, a_en, b_bn)
      return h_ben, ssm_readout(h_ben, c_bn)

    if h0_ben is None:
      h0_ben = jnp.zeros((x_ble.shape[0], *a_en.shape), jnp.float32)
    time_major = [jnp.swapaxes(v, 0, 1) for v in (x_ble, dt_ble, b_bln, c_bln)]
    h_ben, y_lbe = jax.lax.scan(token, h0_ben, time_major, unroll=SCAN_UNROLL)
    y_ble = jnp.swapaxes(y_lbe, 0, 1)
  y_ble = y_ble + d_e * x_ble
  return (y_ble, h_ben) if return_state else y_ble


# ------------------------------------------------------------------------------------------- mixer


def _dt_bias_init(cfg: MambaConfig):
  """b_dt = softplus⁻¹(Δ₀), Δ₀ log-uniform in [dt_min, dt_max] and >= dt_init_floor (mamba_ssm)."""

  def init(key, shape, dtype=jnp.float32):
    log_min, log_max = math.log(cfg.dt_min), math.log(cfg.dt_max)
    dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (log_max - log_min) + log_min)
    dt = jnp.maximum(dt, cfg.dt_init_floor)
    return dt + jnp.log(-jnp.expm1(-dt))  # softplus⁻¹, stable for small dt

  return init


def _dt_weight_init(cfg: MambaConfig, rank: int):
  std = cfg.dt_scale / math.sqrt(rank)
  if cfg.dt_init == "constant":
    return jax.nn.initializers.constant(std)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -std, std)


@registry.register("mamba", hparams=MambaConfig,
                   state_size_formula="e·(d_conv-1) + e·d_state, e = expand·d (conv window + SSM state)")
class Mamba(nnx.Module):

  def __init__(self, cfg: MambaConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    e, r, n = cfg.inner_width(d_model), cfg.rank(d_model), cfg.d_state
    self.rank, self.d_state, self.scan, self.dtype = r, n, cfg.scan, dtype
    # x, z: kernel (d, 2, e), logical (embed, None, mlp): a `model` shard holds the same channels of both.
    self.in_proj = layers.FusedLinear(d_model, (2, e), axes=("embed", None, "mlp"), rngs=rngs, dtype=dtype,
                                      use_bias=cfg.bias)
    self.conv = layers.ShortConvolution(e, cfg.d_conv, rngs=rngs, dtype=dtype)
    self.x_proj = layers.linear(e, r + 2 * n, axes=("mlp", None), rngs=rngs, dtype=dtype, use_bias=False)
    # Δ's projection runs in float32: its bias softplus⁻¹(1e-3..0.1) ≈ -6.9..-2.3 would lose ~1% of Δ
    # to bfloat16 rounding.
    self.dt_proj = nnx.Linear(
        r, e, dtype=jnp.float32, rngs=rngs,
        kernel_init=layers.logical(_dt_weight_init(cfg, r), (None, "mlp")),
        bias_init=layers.logical(_dt_bias_init(cfg), ("mlp",)))
    a_log_init = lambda key, shape, dtype=jnp.float32: jnp.log(
        jnp.broadcast_to(jnp.arange(1, shape[1] + 1, dtype=dtype), shape))
    self.A_log = nnx.Param(layers.logical(a_log_init, ("mlp", None))(rngs.params(), (e, n)))
    self.D = nnx.Param(layers.logical(jax.nn.initializers.ones, ("mlp",))(rngs.params(), (e,)))
    self.out_proj = layers.linear(e, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype,
                                  std=layers.out_proj_std(n_layers), use_bias=cfg.bias)

  @staticmethod
  def state_size(cfg: MambaConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    return cfg.inner_width(d_model) * (cfg.d_conv - 1 + cfg.d_state)

  def _ssm_inputs(self, x_conv):
    """(x, Δ, B, C) in float32 from the conv's output (..., e), and A (e, n)."""
    x = jax.nn.silu(x_conv)
    delta, b, c = jnp.split(self.x_proj(x), [self.rank, self.rank + self.d_state], axis=-1)
    dt = jax.nn.softplus(self.dt_proj(delta.astype(jnp.float32)))
    a_en = -jnp.exp(self.A_log[...])
    return x.astype(jnp.float32), dt, b.astype(jnp.float32), c.astype(jnp.float32), a_en

  def _gate_and_project(self, y, z):
    return self.out_proj((y * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype))

  def __call__(self, u_bld: jax.Array, state: dict[str, Any] | None = None,
               return_state: bool = False) -> Any:
    """y (b, l, d), continuing after `state` (like `init_state`'s) if given; `(y, state after u)` with
    `return_state`: the conv runs over [window, x] and the scan starts from h (see the module docstring)."""
    x_ble, z_ble = (self.in_proj(u_bld)[..., i, :] for i in range(2))
    if state is None and not return_state:
      x_ble, dt_ble, b_bln, c_bln, a_en = self._ssm_inputs(self.conv(x_ble))
      y_ble = selective_scan(x_ble, dt_ble, a_en, b_bln, c_bln, self.D[...], scan=self.scan)
      return self._gate_and_project(y_ble, z_ble)
    x_conv, conv_state = _filters.short_conv_continued(self.conv, None if state is None else state["conv"],
                                                       x_ble)
    x_ble, dt_ble, b_bln, c_bln, a_en = self._ssm_inputs(x_conv)
    y_ble, h_ben = selective_scan(x_ble, dt_ble, a_en, b_bln, c_bln, self.D[...], scan=self.scan,
                                  h0_ben=None if state is None else state["ssm"], return_state=True)
    y_bld = self._gate_and_project(y_ble, z_ble)
    return (y_bld, dict(conv=conv_state, ssm=h_ben)) if return_state else y_bld

  def init_state(self, batch_size: int) -> dict[str, Any]:
    """The conv window (b, d_conv-1, e) and the SSM state h (b, e, n), zeros before the sequence."""
    e, n = self.A_log.shape
    return dict(conv=self.conv.init_state(batch_size), ssm=jnp.zeros((batch_size, e, n), jnp.float32))

  def step(self, state: dict[str, Any], u_bd: jax.Array) -> tuple[dict[str, Any], jax.Array]:
    """One token: shift the conv window, advance h by one step of the recurrence, read it out."""
    x_be, z_be = (self.in_proj(u_bd)[..., i, :] for i in range(2))
    conv_state, x_conv = self.conv.step(state["conv"], x_be)
    x_be, dt_be, b_bn, c_bn, a_en = self._ssm_inputs(x_conv)
    h_ben = ssm_update(state["ssm"], x_be, dt_be, a_en, b_bn)
    y_be = ssm_readout(h_ben, c_bn) + self.D[...] * x_be
    return dict(conv=conv_state, ssm=h_ben), self._gate_and_project(y_be, z_be)
