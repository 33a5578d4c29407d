"""RWKV-7 "Goose" time mixing (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State
Evolution", Section 4): the generalised delta rule with a vector-valued, LoRA-parameterised decay, an
in-context learning rate and a separate removal key.

Dimension legend: b batch, l length, d model width (= key = value width), h heads, k head width (d/H),
r LoRA rank.

With the token shift x'_t = x_{t−1} (0 before the sequence) and per-channel mixes μ (eq. 3):

    x_□ = x + (x' − x) ⊙ μ_□,   □ ∈ {r, w, k, v, a, g}
    r, k, v = x_r W_r, x_k W_k, x_v W_v
    log w = −e^(−1/2) · sigmoid(w_0 + tanh(x_w W_w1) W_w2)        (eq. 11: w = exp(−e^(−1/2) σ(·)) ∈ (0.545, 1))
    a = sigmoid(a_0 + x_a W_a1 W_a2)                              (in-context learning rate, eq. 6)
    g = sigmoid(x_g W_g1) W_g2                                    (output gate)
    κ̂ = normalise_h(k ⊙ ξ)                                       (removal key, ξ = k_k; eq. 8, per head)
    k̃ = k ⊙ (1 + (a − 1) ⊙ α)                                     (replacement key, α = k_a; eq. 9)
    wkv_t = wkv_{t−1} (diag(w_t) − κ̂_tᵀ (a_t ⊙ κ̂_t)) + v_tᵀ k̃_t     (eq. 16–17, per head)
    o_t = GroupNorm_h(r_t wkv_tᵀ) + ((r_t ⊙ k̃_t ⊙ ρ) · 1) v_t        (ρ = r_k, the "bonus", eq. 20–21)
    out = (o ⊙ g) W_o

The wkv recurrence is `ops.delta_rule`'s generalised rule (S = wkvᵀ) with log w per channel, a = −κ̂,
b = κ̂ ⊙ a and the write k̃ vᵀ, exactly the arguments flash-linear-attention passes to `chunk_rwkv7`
(`r, w, k, v, a=-kk, b=kk*a`, scale 1). Training runs its chunked form (`lax.scan` over chunks of
`chunk_size` tokens, matmuls and one triangular solve inside a chunk, float32); the per-channel decay is
split as exp(G_t)·exp(−G_s) inside a chunk, which the bound w > e^(−e^(−1/2)) keeps finite in float32 up
to 131 tokens per chunk (hence the limit on `chunk_size`). `form = 'recurrent'` runs the token-by-token
recurrence (the reference; `step` is one token of it).

Hyperparameters: `num_heads` = 2 (head width d/H; RWKV-7 and fla fix head_dim = 64, Zoology's configs
set 2 heads), LoRA ranks `decay_low_rank_dim`, `a_low_rank_dim`, `gate_low_rank_dim` = 'auto' (RWKV-LM's
suggestion: max(32, round(1.8·sqrt(d)/32)·32) for w and a, max(32, round(0.6·d^0.8/32)·32) for g),
`norm_eps` = 1e-5 (GroupNorm ε = head width · norm_eps, as RWKV-LM and fla), `chunk_size` = 64 (<= 131,
clipped to L), `form` = 'chunked'.

Initialisation: RWKV-LM's (x070) for the vectors that set the working regime (token-shift mixes μ from
the layer's depth, decay speeds w_0 = −7 + 5(n/(d−1))^(0.85 + (layer/(n_layers−1))^0.5) + 1/2 per
channel, a_0 = 0, k_k = 0.85, k_a = 1, r_k = 0, GroupNorm scale 1 and bias 0); every matrix (projections
and LoRA factors) ~ N(0, 0.02), out_proj N(0, 0.02/sqrt(2·n_layers)), as zoo_jax initialises every mixer
and as Zoology's `_init_weights` leaves fla's linear layers.

Differences from Zoology's `RWKV7Attention` (a copy of fla's layer):
- No value residual: fla mixes v towards the first layer's v (`v_first`, through `v_lora`) in layers > 0,
  which needs state passed between layers; Zoology calls the layer without `v_first`, so its `v_lora`
  is never used either. Left out here.
- Zoology zero-initialises μ, k_k and k_a (so κ̂ = 0: no removal at init) and Xavier-initialises the
  LoRA factors; RWKV-LM's values are used here (see Initialisation).
- The wkv recurrence runs in float32 in `lax.scan` / matmuls instead of fla's Triton kernels.
- State size: Zoology's `state_size` reports H·d·d, H² times the real H·(d/H)² (4× at 2 heads, 16× at 4);
  here it is H·(d/H)² for wkv plus d for the token shift (the previous token's x, which the recurrent
  form must keep).

State: H heads of (d/H)² plus the previous x: d²/H + d elements per example per layer.
`__call__(x, state=..., return_state=True)` continues from such a state (prefill → decode): the token
shift starts from the previous x and the chunked rule from S; the state after x is its last token and
the final chunk state.
"""

import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from zoo_jax import layers
from zoo_jax.mixers import registry
from zoo_jax.ops import delta_rule
from zoo_jax.mixers.delta_net import check_heads_divide
from zoo_jax.mixers.rwkv import token_shift

LOG_DECAY_SCALE = math.exp(-0.5)  # log w ∈ (−e^(−1/2), 0)
# The chunk's total log decay, at most chunk_size · e^(−1/2), must stay within the per-channel split's
# float32 range (delta_rule.MAX_CHUNK_LOG_DECAY = 80): 131 tokens.
MAX_CHUNK_SIZE = int(delta_rule.MAX_CHUNK_LOG_DECAY / LOG_DECAY_SCALE)
MIXES = ("r", "w", "k", "v", "a", "g")
LORA_RANKS = ("decay_low_rank_dim", "a_low_rank_dim", "gate_low_rank_dim")


@dataclasses.dataclass(frozen=True)
class RWKV7Config:
  num_heads: int = 2
  decay_low_rank_dim: int | str = "auto"
  a_low_rank_dim: int | str = "auto"
  gate_low_rank_dim: int | str = "auto"
  norm_eps: float = 1e-5
  chunk_size: int = 64
  form: str = "chunked"

  def validate(self, field: str) -> None:
    if self.num_heads < 1:
      raise ValueError(f"{field}.num_heads must be an integer >= 1, got {self.num_heads}")
    for name in LORA_RANKS:
      value = getattr(self, name)
      if value != "auto" and (isinstance(value, str) or value < 1):
        raise ValueError(f"{field}.{name} must be 'auto' or an integer >= 1, got {value!r}")
    if not self.norm_eps > 0:
      raise ValueError(f"{field}.norm_eps must be > 0, got {self.norm_eps}")
    if not 1 <= self.chunk_size <= MAX_CHUNK_SIZE:
      raise ValueError(f"{field}.chunk_size must be in [1, {MAX_CHUNK_SIZE}] (the per-channel decay "
                       f"overflows float32 beyond), got {self.chunk_size}")
    if self.form not in delta_rule.FORMS:
      raise ValueError(f"{field}.form must be one of {list(delta_rule.FORMS)}, got {self.form!r}")

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    registry.check_heads(field, self.num_heads, d_model)

  def rank(self, name: str, d_model: int) -> int:
    value = getattr(self, name)
    if value != "auto":
      return value
    suggested = 0.6 * d_model ** 0.8 if name == "gate_low_rank_dim" else 1.8 * d_model ** 0.5
    return max(32, int(round(suggested / 32) * 32))


def token_shift_mixes(d_model: int, layer_idx: int, n_layers: int) -> np.ndarray:
  """μ (6, d) for r, w, k, v, a, g: RWKV-LM x070's init, from each channel's index and the layer depth."""
  ratio_0_to_1 = layer_idx / max(n_layers - 1, 1)
  ratio_1_to_almost0 = 1.0 - layer_idx / n_layers
  ddd = np.arange(d_model) / d_model
  return np.stack([
      1.0 - ddd ** (0.2 * ratio_1_to_almost0),
      1.0 - ddd ** (0.9 * ratio_1_to_almost0),
      1.0 - (ddd ** (0.9 * ratio_1_to_almost0) + 0.4 * ratio_0_to_1),
      1.0 - (ddd ** (0.4 * ratio_1_to_almost0) + 0.6 * ratio_0_to_1),
      1.0 - ddd ** (0.9 * ratio_1_to_almost0),
      1.0 - ddd ** (0.2 * ratio_1_to_almost0),
  ]).astype(np.float32)


def decay_speeds(d_model: int, layer_idx: int, n_layers: int) -> np.ndarray:
  """w_0 (d): −7 + 5(n/(d−1))^(0.85 + (layer/(n_layers−1))^0.5) + 1/2 (RWKV-LM x070)."""
  ratio_0_to_1 = layer_idx / max(n_layers - 1, 1)
  position = np.arange(d_model) / max(d_model - 1, 1)
  return (-7.0 + 5.0 * position ** (0.85 + ratio_0_to_1 ** 0.5) + 0.5).astype(np.float32)


class LowRank(nnx.Module):
  """x W_1 [act] W_2: a LoRA-style low-rank map d -> r -> d, both factors N(0, 0.02), no bias."""

  def __init__(self, d_model: int, rank: int, *, rngs: nnx.Rngs, dtype: Any):
    self.down = layers.linear(d_model, rank, axes=("embed", None), rngs=rngs, dtype=dtype, use_bias=False)
    self.up = layers.linear(rank, d_model, axes=(None, "embed"), rngs=rngs, dtype=dtype, use_bias=False)

  def __call__(self, x, activation=lambda z: z):
    return self.up(activation(self.down(x))).astype(jnp.float32)


def _constant(values: np.ndarray, axes):
  return nnx.Param(layers.logical(lambda key, shape, dtype=jnp.float32: jnp.asarray(values, dtype),
                                  axes)(None, values.shape))


@registry.register("rwkv7", hparams=RWKV7Config,
                   state_size_formula="d²/H + d (H wkv states (d/H)×(d/H) + the token shift's previous x)")
class RWKV7(nnx.Module):

  def __init__(self, cfg: RWKV7Config, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    check_heads_divide(cfg.num_heads, d_model)
    self.num_heads, self.chunk_size, self.form, self.dtype = cfg.num_heads, cfg.chunk_size, cfg.form, dtype
    d, head_dim = d_model, d_model // cfg.num_heads
    proj = lambda: layers.linear(d, d, axes=("embed", "heads"), rngs=rngs, dtype=dtype, use_bias=False)
    self.r_proj, self.k_proj, self.v_proj = proj(), proj(), proj()
    self.mix_6d = _constant(token_shift_mixes(d, layer_idx, n_layers), (None, "embed"))
    self.w0 = _constant(decay_speeds(d, layer_idx, n_layers), ("heads",))
    self.a0 = _constant(np.zeros(d, np.float32), ("heads",))
    self.k_k = _constant(np.full(d, 0.85, np.float32), ("heads",))
    self.k_a = _constant(np.ones(d, np.float32), ("heads",))
    self.r_k = _constant(np.zeros((cfg.num_heads, head_dim), np.float32), ("heads", None))
    self.w_lora = LowRank(d, cfg.rank("decay_low_rank_dim", d), rngs=rngs, dtype=dtype)
    self.a_lora = LowRank(d, cfg.rank("a_low_rank_dim", d), rngs=rngs, dtype=dtype)
    self.g_lora = LowRank(d, cfg.rank("gate_low_rank_dim", d), rngs=rngs, dtype=dtype)
    self.norm = nnx.GroupNorm(d, num_groups=cfg.num_heads, epsilon=head_dim * cfg.norm_eps,
                              dtype=jnp.float32, rngs=rngs)
    self.out_proj = layers.linear(d, d, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                                  std=layers.out_proj_std(n_layers), use_bias=False)

  @staticmethod
  def state_size(cfg: RWKV7Config, d_model: int, seq_len: int, layer_idx: int) -> int:
    return d_model * d_model // cfg.num_heads + d_model

  def _rule_inputs(self, x_bld: jax.Array, x_prev_bld: jax.Array):
    """(r, k̃, v, log w, −κ̂, κ̂ ⊙ a) per head, and the gate g (b, l, d), float32 from the compute dtype."""
    b, l, d = x_bld.shape
    heads = lambda t: t.astype(jnp.float32).reshape(b, l, self.num_heads, -1)
    mixed = x_bld + (x_prev_bld - x_bld) * self.mix_6d[...].astype(x_bld.dtype)[:, None, None]
    xr, xw, xk, xv, xa, xg = mixed
    r, k, v = self.r_proj(xr), self.k_proj(xk).astype(jnp.float32), self.v_proj(xv)
    log_w = -LOG_DECAY_SCALE * jax.nn.sigmoid(self.w0[...] + self.w_lora(xw, jnp.tanh))
    a = jax.nn.sigmoid(self.a0[...] + self.a_lora(xa))
    g = self.g_lora(xg, jax.nn.sigmoid)
    kappa = delta_rule.l2_normalize(heads(k * self.k_k[...]))
    k_tilde = k * (1.0 + (a - 1.0) * self.k_a[...])
    return (heads(r), heads(k_tilde), heads(v), heads(log_w), -kappa, kappa * heads(a)), g

  def _output(self, o_blhv: jax.Array, rule, g_bld: jax.Array) -> jax.Array:
    r, k_tilde, v = rule[:3]
    b, l, h, dv = o_blhv.shape
    normed_bld = self.norm(o_blhv.reshape(b * l, h * dv)).reshape(b, l, h, dv)  # GroupNorm per token
    bonus_blh1 = jnp.sum(r * k_tilde * self.r_k[...], axis=-1, keepdims=True)
    o_bld = (normed_bld + bonus_blh1 * v).reshape(b, l, h * dv)
    return self.out_proj((o_bld * g_bld).astype(self.dtype))

  def __call__(self, x_bld: jax.Array, state: dict[str, jax.Array] | None = None,
               return_state: bool = False) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """The chunked (or recurrent) form over x; from `state` (`init_state`'s pytree) it continues after the
    tokens the state has seen: the token shift starts from `shift` and the rule from S. With
    `return_state`, also the state after x: its last token and the chunked scan's final S."""
    last_bd = None if state is None else state["shift"]
    rule, g_bld = self._rule_inputs(x_bld, token_shift(x_bld, last_bd))
    result = delta_rule.delta_rule(self.form, *rule, chunk_size=self.chunk_size,
                                   initial_state=None if state is None else state["s"],
                                   output_final_state=return_state)
    o_blhv, s_bhkv = result if return_state else (result, None)
    y_bld = self._output(o_blhv, rule, g_bld).astype(x_bld.dtype)
    if not return_state:
      return y_bld
    return y_bld, dict(shift=x_bld[:, -1].astype(jnp.float32), s=s_bhkv)

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    """The previous token's x (b, d) and wkv per head as S = wkvᵀ (b, h, d/H, d/H)."""
    d = self.mix_6d.shape[1]
    head_dim = d // self.num_heads
    return dict(shift=jnp.zeros((batch_size, d), jnp.float32),
                s=jnp.zeros((batch_size, self.num_heads, head_dim, head_dim), jnp.float32))

  def step(self, state: dict[str, jax.Array], x_bd: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    x_prev_bd = state["shift"].astype(x_bd.dtype)
    rule, g_bld = self._rule_inputs(x_bd[:, None], x_prev_bd[:, None])
    s_bhkv, o_bhv = delta_rule.step(state["s"], *(t[:, 0] for t in rule))
    y_bd = self._output(o_bhv[:, None], rule, g_bld)[:, 0]
    return dict(shift=x_bd.astype(jnp.float32), s=s_bhkv), y_bd.astype(x_bd.dtype)
