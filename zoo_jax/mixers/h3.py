"""H3, "Hungry Hungry Hippos" (Fu et al. 2023), Zoology's `h3.H3`.

With H = d / head_dim heads of width p = head_dim, channels indexed (head h, i < p):

    q, k, v = x W_q + b_q, x W_k + b_k, x W_v + b_v
    k̃ = s * k + D_k ⊙ k                          # shift SSM: a causal conv whose kernel has N taps
    kv[h, i, j] = k̃[h, i] v[h, j]                 # per-head outer product, H·p² channels
    y[h, i, j] = K_h * kv[h, i, j] + D_h kv[h, i, j]   # diagonal SSM, one per head, by FFT
    out = (Σ_i q[h, i] y[h, i, j]) W_o + b_o

The shift SSM has state matrix = the shift, B (d, N) initialised to e_1 and C (d, N) ~ U(±1/sqrt(N))
(PyTorch's Conv1d init, as state-spaces' `SSKernel(mode='shift')`); both train, and its kernel is
s[j] = Σ_n B[n] C[n+j], j < N. The diagonal SSM (`_filters.DiagonalSSM`) is S4D-Lin with N/2 complex
modes, bilinear discretisation (the `SSKernelDiag` default that Zoology's H3 gets), a trained B and
log dt ~ U[log dt_min, log dt_max]. D_k (d) and D_h (H) ~ N(0, 1).

Hyperparameters (Zoology's defaults): `d_state` = 64 (N; Zoology's Figure 2 sets d_state = L and
`head_dim` = 2), `head_dim` = 1, `dt_min` = 1e-3, `dt_max` = 1e-1 (Zoology's `kernel_args`).

Differences from Zoology's PyTorch `H3`:
- q, k, v come from one fused (d, 3d) projection (same N(0, 0.02) init as the three Linears).
- the output projection is initialised N(0, 0.02/sqrt(2·n_layers)) like every zoo_jax output projection;
  Zoology's name-based rescaling (`out_proj.weight`, `fc2.weight`) misses H3's `output_linear`, which
  stays at N(0, 0.02) there.
- channels of the head sum come out ordered (h, j), not Zoology's (j, h); the output projection is dense
  with i.i.d. init, so this only relabels its rows.
- the SSMs run in float32 whatever the compute dtype (the projections use it). The ZOH/bilinear
  parameters are ordinary parameters (state-spaces' lr/weight-decay hints are ignored, as Zoology's
  trainer ignores them). `use_fast_fftconv` (a CUDA kernel) is replaced by `ops.long_conv` (the
  shift SSM, and the diagonal SSM when head_dim > 1) and, with head_dim = 1, by the gated convolution core
  q ⊙ (K ∗ (k̃ ⊙ v) + D k̃ ⊙ v) = `ops.gated_conv` (the head sum has one term). `conv_implementation`
  (zoo_jax's, default None = the fastest measured on the backend) picks their kernel path ('reference',
  'xla', 'monarch', 'pallas'); the outputs agree to round-off.
- the recurrent state of the shift SSM is stored as the window of its last min(N, L) - 1 inputs (the
  kernel is cut at L, as in Zoology's forward), not as Zoology's N-dimensional shift register; the two
  give the same outputs. Zoology's `state_size` reports d·N and leaves out the diagonal SSM's state.

State: shift window d·(min(N, L) - 1) plus the diagonal SSM's N/2 complex modes (N reals) on each of the
H·p² = d·p channels of kv: d·(min(N, L) - 1) + d·head_dim·N elements per example. Given a state,
`__call__` continues after it (prefill → decode): the shift SSM convolves [window, k] and keeps the last
l outputs; the diagonal SSM adds its modes' free response 2 Re Σ_n C_n dA_n^(i+1) x0_n to K * kv (so the
head_dim = 1 shortcut through `ops.gated_conv` is left for the general path). With `return_state` the
state after x comes back too: the last min(N, L) - 1 inputs of the shift SSM and the modes after kv, as one
contraction over the tokens (`_filters.DiagonalSSM.final_state`), not a scan.
"""

import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax.ops import gated_conv, long_conv
from zoo_jax import layers
from zoo_jax.mixers import _filters, registry


@dataclasses.dataclass(frozen=True)
class H3Config:
  d_state: int = 64
  head_dim: int = 1
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  conv_implementation: str | None = None

  def validate(self, field: str) -> None:
    _filters.validate_ssm_hparams(self, field)
    layers.validate_conv_implementation(self.conv_implementation, field)
    if self.head_dim < 1:
      raise ValueError(f"{field}.head_dim must be >= 1, got {self.head_dim}")

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    if d_model % self.head_dim:
      raise ValueError(f"{field}.head_dim must divide model.d_model ({d_model}), got {self.head_dim}")


@registry.register("h3", hparams=H3Config,
                   state_size_formula="d·(min(N, L)-1) + d·head_dim·N (shift window + diagonal SSM, "
                                      "N = d_state)")
class H3(nnx.Module):

  def __init__(self, cfg: H3Config, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    if d_model % cfg.head_dim:
      raise ValueError(f"model.mixer.head_dim must divide model.d_model ({d_model}), got {cfg.head_dim}")
    self.d_model, self.seq_len, self.dtype = d_model, seq_len, dtype
    self.head_dim, self.d_state = cfg.head_dim, cfg.d_state
    self.implementation = cfg.conv_implementation
    self.heads = d_model // cfg.head_dim
    # Kernel (d, 3, d), logical (embed, None, heads): a `model` shard holds the same channels of q, k and v.
    self.qkv_proj = layers.FusedLinear(d_model, (3, d_model), axes=("embed", None, "heads"), rngs=rngs,
                                       dtype=dtype)
    self.shift_b_dn = nnx.Param(jnp.zeros((d_model, cfg.d_state)).at[:, 0].set(1.0))
    bound = 1 / math.sqrt(cfg.d_state)
    self.shift_c_dn = nnx.Param(jax.random.uniform(rngs.params(), (d_model, cfg.d_state), jnp.float32,
                                                   -bound, bound))
    self.shift_skip_d = nnx.Param(jax.random.normal(rngs.params(), (d_model,)))
    self.ssm = _filters.DiagonalSSM(self.heads, cfg.d_state, discretization="bilinear", learn_b=True,
                                    dt_min=cfg.dt_min, dt_max=cfg.dt_max, rngs=rngs)
    self.ssm_skip_h = nnx.Param(jax.random.normal(rngs.params(), (self.heads,)))
    self.output_linear = layers.linear(d_model, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                                       std=layers.out_proj_std(n_layers))

  @staticmethod
  def state_size(cfg: H3Config, d_model: int, seq_len: int, layer_idx: int) -> int:
    return d_model * (min(cfg.d_state, seq_len) - 1) + d_model * cfg.head_dim * cfg.d_state

  def shift_kernel(self, length: int) -> jax.Array:
    """s (min(N, length), d): s[j] = Σ_n B[n] C[n+j], the shift SSM's impulse response (a correlation,
    by FFT of size 2N as in state-spaces)."""
    n = self.d_state
    b_f = jnp.fft.rfft(self.shift_b_dn[...], n=2 * n, axis=-1)
    c_f = jnp.fft.rfft(self.shift_c_dn[...], n=2 * n, axis=-1)
    return jnp.fft.irfft(jnp.conj(b_f) * c_f, n=2 * n, axis=-1)[:, :min(n, length)].T

  def _qkv(self, x: jax.Array) -> list[jax.Array]:
    qkv = self.qkv_proj(x).astype(jnp.float32)  # (..., 3, d)
    return [qkv[..., i, :] for i in range(3)]

  def _heads(self, a: jax.Array) -> jax.Array:
    return a.reshape(*a.shape[:-1], self.heads, self.head_dim)

  def __call__(self, x_bld: jax.Array, state: dict[str, Any] | None = None,
               return_state: bool = False) -> Any:
    """y (b, l, d), continuing after `state` (like `init_state`'s) if given; `(y, state after x)` with
    `return_state`."""
    b, l, d = x_bld.shape
    p, heads = self.head_dim, self.heads
    q_bld, k_bld, v_bld = self._qkv(x_bld)
    impl = self.implementation
    window = min(self.d_state, self.seq_len) - 1
    if state is None:
      k_shift_bld = long_conv.causal_conv(k_bld, self.shift_kernel(l), self.shift_skip_d[...],
                                          implementation=impl)
    else:  # the shift SSM's kernel over [window, k]: min(N, L) taps, as `step` applies it
      seen_bwd = jnp.concatenate([state["shift"], k_bld], axis=1)
      k_shift_bld = long_conv.causal_conv(seen_bwd, self.shift_kernel(self.seq_len), self.shift_skip_d[...],
                                          implementation=impl)[:, window:]
    if p == 1 and state is None and not return_state:  # q ⊙ (K ∗ (k̃ ⊙ v) + D k̃ ⊙ v): the gated conv core
      out_bld = gated_conv.gated_conv(k_shift_bld, self.ssm.kernel(l), in_gate=v_bld, out_gate=q_bld,
                                      d_c=self.ssm_skip_h[...], implementation=impl)
      return self.output_linear(out_bld.astype(self.dtype))
    kv_blhij = self._heads(k_shift_bld)[..., :, None] * self._heads(v_bld)[..., None, :]
    kv_blc = kv_blhij.reshape(b, l, heads * p * p)
    h_lc = jnp.repeat(self.ssm.kernel(l), p * p, axis=1)
    y_blc = long_conv.causal_conv(kv_blc, h_lc, jnp.repeat(self.ssm_skip_h[...], p * p), implementation=impl)
    if state is not None:  # the diagonal SSM's modes are laid out (b, i, j, h, n): its outputs (b, i, j, l, h)
      free_bijlh = self.ssm.free_response(state["ssm"], l)
      y_blc = y_blc + jnp.transpose(free_bijlh, (0, 3, 4, 1, 2)).reshape(b, l, heads * p * p)
    # Σ_i q[h, i] y[h, i, j] as multiply-and-sum: float32 throughout (an einsum may take TF32 on GPU).
    out_blhj = (self._heads(q_bld)[..., None] * y_blc.reshape(b, l, heads, p, p)).sum(axis=-2)
    y_bld = self.output_linear(out_blhj.reshape(b, l, d).astype(self.dtype))
    if not return_state:
      return y_bld
    state = state or dict(shift=None, ssm=None)
    return y_bld, dict(shift=_filters.last_inputs(state["shift"], k_bld, window),
                       ssm=self.ssm.final_state(state["ssm"], jnp.transpose(kv_blhij, (0, 3, 4, 1, 2))))

  def init_state(self, batch_size: int) -> dict[str, Any]:
    """The shift SSM's last min(N, L) - 1 inputs (b, ·, d) and the diagonal SSM's modes (b, p, p, H, N/2)."""
    window = min(self.d_state, self.seq_len) - 1
    return dict(shift=jnp.zeros((batch_size, window, self.d_model), jnp.float32),
                ssm=self.ssm.init_state((batch_size, self.head_dim, self.head_dim)))

  def step(self, state: dict[str, Any], x_bd: jax.Array) -> tuple[dict[str, Any], jax.Array]:
    b, d = x_bd.shape
    q_bd, k_bd, v_bd = self._qkv(x_bd)
    window_bjd = jnp.concatenate([state["shift"], k_bd[:, None]], axis=1)  # oldest first
    s_jd = self.shift_kernel(self.seq_len)[::-1]  # s[j] multiplies the input j steps back
    k_bd = (window_bjd * s_jd).sum(axis=1) + self.shift_skip_d[...] * k_bd
    kv_bhij = self._heads(k_bd)[..., :, None] * self._heads(v_bd)[..., None, :]
    kv_bijh = jnp.moveaxis(kv_bhij, 1, -1)  # the diagonal SSM's channels (heads) last
    ssm, y_bijh = self.ssm.step(state["ssm"], kv_bijh)
    y_bhij = jnp.moveaxis(y_bijh + self.ssm_skip_h[...] * kv_bijh, -1, 1)
    out_bhj = (self._heads(q_bd)[..., None] * y_bhij).sum(axis=-2)
    y_bd = self.output_linear(out_bhj.reshape(b, d).astype(self.dtype))
    return dict(shift=window_bjd[:, 1:], ssm=ssm), y_bd
