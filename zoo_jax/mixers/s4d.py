"""S4D, the diagonal structured state space (Gu et al. 2022, "On the Parameterization and Initialization
of Diagonal State Space Models"), as its standalone layer (state-spaces/s4 `models/s4/s4d.py`).

Per channel c, a complex diagonal SSM with N/2 modes (`_filters.DiagonalSSM`, S4D-Lin, ZOH):

    K[l] = 2 Re Σ_n C_n (exp(dt A_n) - 1)/A_n · exp(dt A_n)^l,   A_n = -1/2 + iπn
    y = K * u + D ⊙ u                    # causal convolution by FFT (n = 2L)
    a, g = split(gelu(y) W + b);  out = a ⊙ sigmoid(g)     # the output linear: a 1x1 conv to 2d, then GLU

and the same map as a recurrence (`step`): x[t] = dA x[t-1] + dB u[t], y[t] = 2 Re(C x[t]) + D u[t].
log dt ~ U[log dt_min, log dt_max], C ~ complex N(0, 1), D ~ N(0, 1); there is no input projection.

Zoology ships no S4D mixer; this is the layer the paper's "S4" rows refer to, with Zoology's conventions:
the output linear's weight ~ N(0, 0.02/sqrt(2·n_layers)) (Zoology's `_init_weights` rescales
`output_linear.0.weight`), bias 0 (PyTorch's Conv1d default U(±1/sqrt(d)) would be kept there).

Hyperparameters (the S4D layer's defaults): `d_state` = 64 (N), `dt_min` = 1e-3, `dt_max` = 1e-1;
zoo_jax's `conv_implementation` = None picks the kernel path of K * u + D u (`ops.long_conv`).
No optimizer groups: A, dt and C are ordinary parameters with the run's learning rate and weight decay
(the S4D repository registers A and dt with weight decay 0 and, optionally, their own learning rate).

Differences from the PyTorch layer: no dropout inside the layer (the model's `embed_dropout` /
`resid_dropout`, `zoo_jax.model`, apply around it); GELU is exact (`nn.GELU()`); the SSM and D run in
float32 whatever the compute dtype; (exp(dt A) - 1) is computed without float32 cancellation
(`_filters._expm1`); the recurrent form is new (the standalone layer has only the convolution).

State: N/2 complex modes per channel, stored as real and imaginary float32 parts: d·N elements per example.
Given a state x0, `__call__` continues after it (prefill → decode): y = K * u + D ⊙ u plus the modes' free
response 2 Re Σ_n C_n dA_n^(i+1) x0_n; with `return_state` the modes after u come back too, as one
contraction over the tokens, dA^l x0 + Σ_s dA^(l-1-s) dB u[s] (`_filters.DiagonalSSM`), not a scan.
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax.ops import long_conv
from zoo_jax import layers
from zoo_jax.mixers import _filters, registry


@dataclasses.dataclass(frozen=True)
class S4DConfig:
  d_state: int = 64
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  conv_implementation: str | None = None

  def validate(self, field: str) -> None:
    _filters.validate_ssm_hparams(self, field)
    layers.validate_conv_implementation(self.conv_implementation, field)


@registry.register("s4d", hparams=S4DConfig,
                   state_size_formula="d·N (N/2 complex modes per channel as 2 reals, N = d_state)")
class S4D(nnx.Module):

  def __init__(self, cfg: S4DConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    self.dtype, self.implementation = dtype, cfg.conv_implementation
    self.ssm = _filters.DiagonalSSM(d_model, cfg.d_state, discretization="zoh", learn_b=False,
                                    dt_min=cfg.dt_min, dt_max=cfg.dt_max, rngs=rngs)
    self.skip_d = nnx.Param(jax.random.normal(rngs.params(), (d_model,)))
    # GLU halves a, g: kernel (d, 2, d), logical (embed, None, mlp): a `model` shard holds both halves.
    self.output_linear = layers.FusedLinear(d_model, (2, d_model), axes=("embed", None, "mlp"), rngs=rngs,
                                            dtype=dtype, std=layers.out_proj_std(n_layers))

  @staticmethod
  def state_size(cfg: S4DConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    return d_model * cfg.d_state

  def __call__(self, u_bld: jax.Array, state: dict[str, jax.Array] | None = None,
               return_state: bool = False) -> Any:
    """y (b, l, d), continuing after the modes `state` if given; `(y, modes after u)` with `return_state`."""
    u_bld32 = u_bld.astype(jnp.float32)
    y_bld = long_conv.causal_conv(u_bld32, self.ssm.kernel(u_bld.shape[1]), self.skip_d[...],
                                  implementation=self.implementation)
    if state is not None:
      y_bld = y_bld + self.ssm.free_response(state, u_bld.shape[1])
    if return_state:
      return self._output(y_bld), self.ssm.final_state(state, u_bld32)
    return self._output(y_bld)

  def _output(self, y: jax.Array) -> jax.Array:
    out = self.output_linear(jax.nn.gelu(y, approximate=False).astype(self.dtype))  # (..., 2, d)
    a, g = out[..., 0, :], out[..., 1, :]
    return a * jax.nn.sigmoid(g)

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    return self.ssm.init_state((batch_size,))

  def step(self, state: dict[str, jax.Array], u_bd: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    u_bd32 = u_bd.astype(jnp.float32)
    state, y_bd = self.ssm.step(state, u_bd32)
    return state, self._output(y_bd + self.skip_d[...] * u_bd32)
