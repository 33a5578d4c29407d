"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
ICLR 2025): DeltaNet with a data-dependent scalar decay per head (Mamba-2's gate).

Dimension legend: b batch, l length, d model width, h heads, k key width per head (d/H), v value width
per head (expand_v·d/H).

Per head (the paper's eq. 10, the state S as a k × v matrix):

    q, k, v = SiLU(causal depthwise conv_{conv_size}(x W_q | x W_k | x W_v)),  q ← q/‖q‖/sqrt(k), k ← k/‖k‖
    β_t = sigmoid(x_t W_β),   α_t = exp(−exp(A_log) · softplus(x_t W_α + dt_bias))        (one per head)
    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   o_t = S_tᵀ q_t
    out = (RMSNorm_v(o) ⊙ SiLU(x W_g)) W_o                  (RMSNorm per head, weight shared; gated)

With α = 1 this is DeltaNet's rule (`delta_net.py`, which this module subclasses). The recurrence is
`ops.delta_rule`'s generalised rule with a scalar log w = log α per head, a = −k, b = α β k and the write
(β k) vᵀ; the chunked form forms the decays exp(Σ log α) from pairwise differences of the cumulative log
decay (every factor <= 1), so any α in (0, 1] is safe at any chunk size.

Hyperparameters (flash-linear-attention's `GatedDeltaNet`, as Zoology's copy configures it; fla's own
defaults in brackets): `num_heads` = 2 [6], key width d, so head_dim = d/H [fla: 256 fixed],
`expand_v` = 2, `conv_size` = 4, `use_gate` = True, `allow_neg_eigval` = False, `norm_eps` = 1e-5,
`chunk_size` = 64, `form` = 'chunked' (or 'recurrent'). The decay's init is hard-coded, as in fla:
A ~ U(0, 16) per head (A_log = log A), dt_bias = softplus⁻¹(dt), dt log-uniform in [1e-3, 0.1] floored at
1e-4 (Mamba's Δ init, `mamba._dt_bias_init` at mamba_ssm's defaults).

Differences from flash-linear-attention / Zoology: those of `delta_net.py` (fused projection and conv,
conv bias, float32 delta rule where Zoology casts to bfloat16, zoo_jax's init of the linear layers), and
Zoology's unused `D` parameter (declared, never applied) is left out.

State: H·k·v = expand_v·d²/H elements plus the q/k/v conv windows, (conv_size − 1)·(2 + expand_v)·d,
per example per layer. State passing is DeltaNet's (`__call__(x, state=..., return_state=True)`): the conv
window is prepended to the conv's input and the chunked rule starts from S, decays included; the state
after x is the last conv_size − 1 conv inputs and the final chunk state.
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers
from zoo_jax.mixers import registry
from zoo_jax.mixers.delta_net import DeltaNet, DeltaNetConfig
from zoo_jax.mixers.mamba import MambaConfig, _dt_bias_init

A_INIT_RANGE = (0.0, 16.0)
# fla hard-codes Mamba's Δ init for dt_bias (dt_min 1e-3, dt_max 0.1, floor 1e-4): mamba_ssm's defaults.
DT_INIT = MambaConfig()


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig(DeltaNetConfig):
  expand_v: int = 2
  use_gate: bool = True


def _a_log_init(key, shape, dtype=jnp.float32):
  a = jax.random.uniform(key, shape, dtype, *A_INIT_RANGE)
  return jnp.log(jnp.maximum(a, jnp.finfo(dtype).tiny))  # U(0, 16) may draw an exact 0


@registry.register("gated_delta_net", hparams=GatedDeltaNetConfig,
                   state_size_formula="e·d²/H + (conv_size−1)·(2+e)·d, e = expand_v "
                                      "(H gated delta-rule states (d/H)×(e·d/H) + q/k/v conv windows)")
class GatedDeltaNet(DeltaNet):

  HAS_DECAY = True

  def __init__(self, cfg: GatedDeltaNetConfig, **kwargs):
    super().__init__(cfg, **kwargs)
    rngs = kwargs["rngs"]
    self.A_log = nnx.Param(layers.logical(_a_log_init, ("heads",))(rngs.params(), (cfg.num_heads,)))
    self.dt_bias = nnx.Param(layers.logical(_dt_bias_init(DT_INIT), ("heads",))(rngs.params(),
                                                                            (cfg.num_heads,)))

  state_size = staticmethod(DeltaNet.state_size)

  def log_decay(self, logits_blh: jax.Array) -> jax.Array:
    """log α = −exp(A_log) · softplus(x W_α + dt_bias), in float32."""
    return -jnp.exp(self.A_log[...]) * jax.nn.softplus(logits_blh.astype(jnp.float32) + self.dt_bias[...])
