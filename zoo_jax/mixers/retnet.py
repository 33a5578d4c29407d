"""Multi-scale retention (Sun et al. 2023, "Retentive Network", Section 2), RetNet's sequence mixer.

Dimension legend: b batch, l sequence length, h heads, k key width per head (d/h), v value width per head
(d/h), n chunks, c chunk length.

Per head h with decay γ_h = 1 − 2^(−5−h) (h = 0 .. H−1), on q, k rotated by their position (Θ_n = e^{inθ},
eq. 1–2, the rotation of xPos without its length-extrapolation scale, which γ replaces; θ_i =
10000^(−i/(k/2−1)), i < k/2, each angle on a pair of channels as torchscale's `theta_shift`) and k scaled
by 1/sqrt(d_k) (torchscale):

    parallel   (eq. 5)   Retention(X) = (Q Kᵀ ⊙ D) V,   D_ts = γ^(t−s) for t >= s, else 0
    recurrent  (eq. 6)   S_t = γ S_{t−1} + k_tᵀ v_t,   o_t = q_t S_t
    chunkwise  (eq. 7)   R_i = K_iᵀ (V_i ⊙ ζ) + γ^c R_{i−1},  ζ_j = γ^(c−1−j)
                         Retention(X_i) = (Q_i K_iᵀ ⊙ D) V_i + (Q_i R_{i−1}) ⊙ ξ,  ξ_j = γ^(j+1)

    MSR(X) = (swish(X W_G) ⊙ GroupNorm_h(Concat_h Retention_h(X))) W_O            (eq. 8)

All three forms compute the same function; `form` picks the parallel one the module uses for a whole
sequence (`step` is the recurrent one). Only non-positive powers of γ appear, so no form can overflow.
The scores and matmuls run in the compute dtype; the state carried across chunks, the recurrent state and
GroupNorm are float32.

Hyperparameters: `num_heads` = 2 (d_k = d/2: 8 at the tests' d = 16; rotary needs d_k even), `chunk_size`
c = 64 (clipped to L; a length that c does not divide is padded at the end, which causality makes
harmless), `form` = 'chunkwise' (default: at L <= c it is the parallel form, one chunk; beyond it costs
O(L·c·d + L·d²/h) time and O(L·c) memory for the scores instead of O(L²)).

Zoology ships no RetNet mixer; this follows the paper and torchscale's `MultiScaleRetention`. Differences
from torchscale: the retention is left unnormalised (torchscale divides D's rows by sqrt(Σ_s D_ts) and
the scores by max(1, |Σ_s score_ts|); GroupNorm undoes both up to its ε, and without them the three
forms agree to round-off); GroupNorm per head as in the paper (mean and variance, learnable scale and
bias, ε = 1e-6) where later torchscale uses an RMSNorm without affine; value width d, not torchscale's
configurable `value_dim` (often 2d); projections without bias as in torchscale, but initialised as every
zoo_jax mixer (N(0, 0.02), out_proj N(0, 0.02/sqrt(2·n_layers))) rather than torchscale's Xavier with
gain 2^−2.5.

State: one d_k × d_v matrix per head, H·(d/H)² = d²/H elements per example (plus the position counter).
`__call__(x, state=..., return_state=True)` continues from such a state (prefill → decode): positions
start at its counter, each output adds (q_t ⊙ γ^(j+1)) S (the chunkwise form starts its scan from S), and
the state after x is γ^l S + Σ_s γ^(l−1−s) k_sᵀ v_s, summed in one contraction, not token by token.
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from zoo_jax import layers
from zoo_jax.mixers import registry

FORMS = ("parallel", "chunkwise")
GROUP_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class RetNetConfig:
  num_heads: int = 2
  chunk_size: int = 64
  form: str = "chunkwise"

  def validate(self, field: str) -> None:
    if self.num_heads < 1:
      raise ValueError(f"{field}.num_heads must be >= 1, got {self.num_heads}")
    if self.chunk_size < 1:
      raise ValueError(f"{field}.chunk_size must be >= 1, got {self.chunk_size}")
    if self.form not in FORMS:
      raise ValueError(f"{field}.form must be one of {list(FORMS)}, got {self.form!r}")

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    registry.check_heads(field, self.num_heads, d_model, even=True)


def head_log_decays(num_heads: int) -> np.ndarray:
  """log γ_h, γ_h = 1 − 2^(−5−h) (the paper's Section 3.1, torchscale's `RetNetRelPos`)."""
  return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads)))).astype(np.float32)


def rotary_angles(head_dim: int) -> np.ndarray:
  """θ for each channel of a head: 10000^(−linspace(0, 1, k/2)), each value on two adjacent channels."""
  angle = 1.0 / (10000.0 ** np.linspace(0.0, 1.0, head_dim // 2))
  return np.repeat(angle, 2).astype(np.float32)


def rotate(x_blhk: jax.Array, pos_l: jax.Array, angle_k: jax.Array) -> jax.Array:
  """x Θ_pos: each channel pair (x0, x1) turned by pos·θ, i.e. (x0 cos − x1 sin, x1 cos + x0 sin).

  `pos_l` is (l,), the same positions for every row, or (b, l), a row's own (after a state's)."""
  phase_lk = pos_l[..., None].astype(jnp.float32) * angle_k
  cos_l1k, sin_l1k = jnp.cos(phase_lk)[..., None, :], jnp.sin(phase_lk)[..., None, :]
  pairs = x_blhk.reshape(*x_blhk.shape[:-1], -1, 2)
  turned = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x_blhk.shape)
  return (x_blhk * cos_l1k + turned * sin_l1k).astype(x_blhk.dtype)


def decay_mask(length: int, log_gamma_h: jax.Array) -> jax.Array:
  """D (h, t, s) = γ_h^(t−s) for t >= s, else 0."""
  lag_ts = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
  return jnp.where(lag_ts >= 0, jnp.exp(jnp.maximum(lag_ts, 0) * log_gamma_h[:, None, None]), 0.0)


def _from_state(q_blhk, log_gamma_h, s_bhkv):
  """(Q_t ⊙ ξ_t) S, ξ_t = γ^(t+1): what a state S left by earlier positions adds at t (eq. 7's cross term)."""
  xi_lh = jnp.exp((jnp.arange(q_blhk.shape[1]) + 1)[:, None] * log_gamma_h).astype(q_blhk.dtype)
  return jnp.einsum("blhk,bhkv->blhv", q_blhk * xi_lh[:, :, None], s_bhkv.astype(q_blhk.dtype))


def retention_parallel(q_blhk, k_blhk, v_blhv, log_gamma_h, initial_state_bhkv=None):
  """Eq. 5: (Q Kᵀ ⊙ D) V per head; after a state S (b, h, k, v) of earlier positions, plus (Q ⊙ ξ) S."""
  d_hts = decay_mask(q_blhk.shape[1], log_gamma_h).astype(q_blhk.dtype)
  scores_bhts = jnp.einsum("bthk,bshk->bhts", q_blhk, k_blhk) * d_hts
  o_blhv = jnp.einsum("bhts,bshv->bthv", scores_bhts, v_blhv)
  if initial_state_bhkv is not None:
    o_blhv = o_blhv + _from_state(q_blhk, log_gamma_h, initial_state_bhkv)
  return o_blhv


def retention_final_state(k_blhk, v_blhv, log_gamma_h, initial_state_bhkv=None):
  """S_l = γ^l S_0 + Σ_s γ^(l−1−s) k_sᵀ v_s (eq. 6 unrolled), in float32, in one contraction over s."""
  l = k_blhk.shape[1]
  to_end_lh = jnp.exp((l - 1 - jnp.arange(l))[:, None] * log_gamma_h)
  s_bhkv = jnp.einsum("blhk,blhv->bhkv", k_blhk.astype(jnp.float32) * to_end_lh[:, :, None],
                      v_blhv.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  if initial_state_bhkv is not None:
    s_bhkv = s_bhkv + jnp.exp(l * log_gamma_h)[:, None, None] * initial_state_bhkv
  return s_bhkv


def retention_chunkwise(q_blhk, k_blhk, v_blhv, log_gamma_h, chunk_size: int, initial_state_bhkv=None):
  """Eq. 7: the parallel form inside chunks of c tokens, the state R carried across chunks by a scan
  (from `initial_state_bhkv`, the state after earlier positions, or 0)."""
  b, l, h, _ = q_blhk.shape
  c = min(chunk_size, l)
  n = -(-l // c)
  pad = lambda t: jnp.pad(t, ((0, 0), (0, n * c - l), (0, 0), (0, 0))).reshape(b, n, c, h, t.shape[-1])
  q, k, v = pad(q_blhk), pad(k_blhk), pad(v_blhv)
  dtype = q.dtype
  d_hts = decay_mask(c, log_gamma_h).astype(dtype)
  scores_bnhts = jnp.einsum("bnthk,bnshk->bnhts", q, k) * d_hts
  inner_bnthv = jnp.einsum("bnhts,bnshv->bnthv", scores_bnhts, v)
  pos_c = jnp.arange(c)
  zeta_ch = jnp.exp((c - 1 - pos_c)[:, None] * log_gamma_h).astype(dtype)  # decay to the chunk's end
  xi_ch = jnp.exp((pos_c + 1)[:, None] * log_gamma_h).astype(dtype)  # decay from the last chunk's end
  kv_bnhkv = jnp.einsum("bnchk,bnchv->bnhkv", k, v * zeta_ch[:, :, None])
  chunk_decay_h11 = jnp.exp(c * log_gamma_h)[:, None, None]

  def carry_state(r_bhkv, kv_bhkv):  # float32: the state sums every earlier chunk
    return chunk_decay_h11 * r_bhkv + kv_bhkv, r_bhkv

  if initial_state_bhkv is None:
    r0 = jnp.zeros((b, h, *kv_bnhkv.shape[-2:]), jnp.float32)
  else:
    r0 = initial_state_bhkv.astype(jnp.float32)
  _, r_prev_nbhkv = jax.lax.scan(carry_state, r0, jnp.swapaxes(kv_bnhkv, 0, 1).astype(jnp.float32))
  cross_bnthv = jnp.einsum("bnchk,nbhkv->bnchv", q * xi_ch[:, :, None], r_prev_nbhkv.astype(dtype))
  return (inner_bnthv + cross_bnthv).reshape(b, n * c, h, -1)[:, :l]


@registry.register("retnet", hparams=RetNetConfig,
                   state_size_formula="d²/H (one (d/H)×(d/H) matrix per head, H heads)")
class MultiScaleRetention(nnx.Module):

  def __init__(self, cfg: RetNetConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    if d_model % cfg.num_heads or (d_model // cfg.num_heads) % 2:
      raise ValueError(f"model.mixer.num_heads must divide model.d_model ({d_model}) into heads of even "
                       f"width (rotary position), got {cfg.num_heads}")
    self.num_heads = cfg.num_heads
    self.chunk_size = cfg.chunk_size
    self.form = cfg.form
    self.d_model = d_model
    self.dtype = dtype
    head_dim = d_model // cfg.num_heads
    # Constants, not variables: recomputed (as numpy, at trace time) where used.
    self.log_gamma_h = tuple(head_log_decays(cfg.num_heads).tolist())
    self.angle_k = tuple(rotary_angles(head_dim).tolist())
    # q, k, v, gate: kernel (d, 4, d), logical (embed, None, heads): a `model` shard holds the same
    # channels (heads) of all four.
    self.in_proj = layers.FusedLinear(d_model, (4, d_model), axes=("embed", None, "heads"), rngs=rngs,
                                      dtype=dtype, use_bias=False)
    self.norm_scale = nnx.Param(layers.logical(jax.nn.initializers.ones, ("heads",))(
        rngs.params(), (d_model,)))
    self.norm_bias = nnx.Param(layers.logical(jax.nn.initializers.zeros, ("heads",))(
        rngs.params(), (d_model,)))
    self.out_proj = layers.linear(d_model, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                                  std=layers.out_proj_std(n_layers), use_bias=False)

  @staticmethod
  def state_size(cfg: RetNetConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    return d_model * d_model // cfg.num_heads

  def _project(self, x_bld: jax.Array, pos_l: jax.Array):
    """(q, k, v, gate): q, k rotated by their positions, k scaled by 1/sqrt(d_k)."""
    b, l, d = x_bld.shape
    q, k, v, gate_bld = (self.in_proj(x_bld)[:, :, i] for i in range(4))
    heads = lambda t: t.reshape(b, l, self.num_heads, d // self.num_heads)
    angle_k = jnp.asarray(self.angle_k)
    q_blhk = rotate(heads(q), pos_l, angle_k)
    k_blhk = rotate(heads(k), pos_l, angle_k) * (d // self.num_heads) ** -0.5
    return q_blhk, k_blhk.astype(q_blhk.dtype), heads(v), gate_bld

  def _output(self, o_blhv: jax.Array, gate_bld: jax.Array) -> jax.Array:
    """swish(gate) ⊙ GroupNorm_h(o), then W_O (eq. 8); the normalisation in float32."""
    b, l, h, v = o_blhv.shape
    o = o_blhv.astype(jnp.float32)
    mean = o.mean(axis=-1, keepdims=True)
    var = jnp.square(o - mean).mean(axis=-1, keepdims=True)
    normed_bld = ((o - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)).reshape(b, l, h * v)
    normed_bld = normed_bld * self.norm_scale[...] + self.norm_bias[...]
    return self.out_proj(jax.nn.silu(gate_bld) * normed_bld.astype(self.dtype))

  def __call__(self, x_bld: jax.Array, state: dict[str, jax.Array] | None = None,
               return_state: bool = False) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """The parallel or chunkwise form over x; from `state` (`init_state`'s pytree) it continues after the
    positions the state has seen: q, k rotated at positions t, t+1, ... and every output reads S decayed
    by γ^(j+1) (eq. 7's cross term). With `return_state`, also the state after x: S_l = γ^l S + Σ_s
    γ^(l−1−s) k_sᵀ v_s, in one contraction, and t + l."""
    b, l, _ = x_bld.shape
    pos = jnp.arange(l) if state is None else state["t"][:, None] + jnp.arange(l)
    s0 = None if state is None else state["s"]
    q, k, v, gate_bld = self._project(x_bld, pos)
    log_gamma_h = jnp.asarray(self.log_gamma_h)
    if self.form == "parallel":
      o_blhv = retention_parallel(q, k, v, log_gamma_h, s0)
    else:
      o_blhv = retention_chunkwise(q, k, v, log_gamma_h, self.chunk_size, s0)
    y_bld = self._output(o_blhv, gate_bld).astype(x_bld.dtype)
    if not return_state:
      return y_bld
    t_b = jnp.zeros((b,), jnp.int32) if state is None else state["t"]
    return y_bld, dict(s=retention_final_state(k, v, log_gamma_h, s0), t=t_b + l)

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    """S per head, (b, h, d/h, d/h), and the position t of the next token (for the rotation)."""
    head_dim = self.d_model // self.num_heads
    return dict(s=jnp.zeros((batch_size, self.num_heads, head_dim, head_dim), jnp.float32),
                t=jnp.zeros((batch_size,), jnp.int32))

  def step(self, state: dict[str, jax.Array], x_bd: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """Eq. 6: S_t = γ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t."""
    t_b = state["t"]
    project = jax.vmap(lambda x_d, t: self._project(x_d[None, None], t[None]))
    q, k, v, gate = (a[:, 0, 0] for a in project(x_bd, t_b))  # (b, h, k) each, gate (b, d)
    q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    gamma_h11 = jnp.exp(jnp.asarray(self.log_gamma_h))[:, None, None]
    s_bhkv = gamma_h11 * state["s"] + k[..., None] * v[..., None, :]
    o_bhv = jnp.einsum("bhk,bhkv->bhv", q, s_bhkv)
    y_bd = self._output(o_bhv[:, None].astype(self.dtype), gate[:, None])[:, 0]
    return dict(s=s_bhkv, t=t_b + 1), y_bd.astype(x_bd.dtype)
