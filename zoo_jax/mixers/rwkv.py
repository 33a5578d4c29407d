"""RWKV-4 time mixing (Peng et al. 2023, Section 3; Zoology's `RWKVTimeMixer`), one of the paper's gated
convolutions: a per-channel exponentially decaying average of values weighted by exp(key).

Dimension legend: b batch, l sequence length, d model width (= channels of the WKV recurrence).

    x'_t = x_{t-1} (token shift; x_{-1} = 0)
    k_t = W_k (μ_k ⊙ x_t + (1-μ_k) ⊙ x'_t),   v_t, r_t likewise with μ_v, μ_r
    wkv_t = (Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (Σ_{i<t} e^{(t-1-i)w + k_i} + e^{u + k_t})
    out_t = W_o (σ(r_t) ⊙ wkv_t)

per channel, with decay w = -exp(time_decay) < 0 (the paper writes -w with w > 0) and bonus u = time_first.

Numerics: the sums are carried as (a, b, p) with value e^p·(a, b) and p a running maximum of the
exponents, as in the official CUDA kernel (`wkv_cuda.cu`), in float32 whatever the input dtype; no
exponential of an unnormalised key is ever formed, so keys of any size are safe.

Parallel forms (`parallel_implementation`): 'associative' (default) composes the per-token updates
S_t = e^w S_{t-1} + e^{k_t} (v_t, 1) with `jax.lax.associative_scan` — log depth, O(l log l) work; the
running maximum is a normaliser the result does not depend on, so its gradient is stopped. 'scan' is the
CUDA kernel's loop, one token per `lax.scan` step, the same function `step` runs.

Hyperparameters: only `parallel_implementation`; Zoology's `RWKVTimeMixer` has none beyond the sizes.
Initialisation is Zoology's "fancy init", which depends on the layer: with r0 = layer/(n_layers-1) and
r1 = 1 - layer/n_layers, time_decay_c = -5 + 8 (c/(d-1))^{0.7 + 1.3 r0}, time_first_c = ln 0.3 +
0.5·((c+1) mod 3 - 1), and with x_c = c/d: μ_k = x^{r1}, μ_v = x^{r1} + 0.3 r0, μ_r = x^{r1/2}.

Differences from Zoology's PyTorch code:
- the CUDA kernel (T ≤ 1024, bfloat16 via `RWKV_FLOAT_MODE`) is replaced by the two JAX forms above;
  the output of the WKV stays float32 until the output projection's input is cast to the compute dtype;
- the projections are initialised with PyTorch's default `nn.Linear` init, U(±1/sqrt(d)), not Zoology's
  N(0, 0.02): `RWKVTimeMixer` is a `torch.jit.ScriptModule`, whose submodules are scripted at
  construction, so Zoology's `_init_weights` (which matches `isinstance(m, nn.Linear)`) never reaches them
  and `init_rwkv` is never called. This is a reading of PyTorch's scripting, not a measured fact;
- with n_layers = 1, r0 = 0 (Zoology divides by n_layers - 1 = 0).

State: the last input for the token shift and the WKV sums (a, b, p): 4·d elements per example.
`__call__(x, state=..., return_state=True)` continues from such a state (prefill → decode): the token
shift starts from the last input, and the initial sums are folded into every prefix of the parallel scan
(decayed over it); the sums after the last prefix are the final state.
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

IMPLEMENTATIONS = ("associative", "scan")
# The CUDA kernel's initial running maximum: e^{MIN_EXPONENT} is 0, and it survives adding a few decays.
MIN_EXPONENT = -1e38

Sums = tuple[jax.Array, jax.Array, jax.Array]  # (a, b, p): the pair e^p·(a, b), float32


@dataclasses.dataclass(frozen=True)
class RWKVConfig:
  parallel_implementation: str = "associative"

  def validate(self, field: str) -> None:
    if self.parallel_implementation not in IMPLEMENTATIONS:
      raise ValueError(f"{field}.parallel_implementation must be one of {list(IMPLEMENTATIONS)}, "
                       f"got {self.parallel_implementation!r}")


def _combine(earlier, later):
  """Composes two segments (log decay over the segment, a, b, p): the earlier one decays over the later."""
  log_decay_1, a_1, b_1, p_1 = earlier
  log_decay_2, a_2, b_2, p_2 = later
  decayed_1 = p_1 + log_decay_2
  p = jax.lax.stop_gradient(jnp.maximum(decayed_1, p_2))  # a normaliser: e^p·(a, b) does not depend on it
  scale_1, scale_2 = jnp.exp(decayed_1 - p), jnp.exp(p_2 - p)
  return log_decay_1 + log_decay_2, scale_1 * a_1 + scale_2 * a_2, scale_1 * b_1 + scale_2 * b_2, p


def _wkv_output(sums: Sums, k, v, u):
  """wkv_t from the sums over i < t and the current token's bonus-weighted term."""
  a, b, p = sums
  bonus = u + k
  m = jnp.maximum(p, bonus)
  scale_sums, scale_now = jnp.exp(p - m), jnp.exp(bonus - m)
  return (scale_sums * a + scale_now * v) / (scale_sums * b + scale_now)


def wkv_token(sums: Sums, k, v, w, u) -> tuple[Sums, jax.Array]:
  """One token of the CUDA kernel's loop, (..., d) float32 each: the output, then the sums updated."""
  y = _wkv_output(sums, k, v, u)
  _, a, b, p = _combine((0.0, *sums), (w, v, jnp.ones_like(v), k))
  return (a, b, p), y


def empty_sums(shape) -> Sums:
  return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.full(shape, MIN_EXPONENT)


def wkv(w_d, u_d, k_bld, v_bld, implementation: str = "associative") -> jax.Array:
  """The WKV of a whole sequence, (b, l, d) float32, from w = -exp(time_decay) and u = time_first."""
  return wkv_from(w_d, u_d, k_bld, v_bld, implementation)[0]


def wkv_from(w_d, u_d, k_bld, v_bld, implementation: str = "associative",
             initial_sums: Sums | None = None) -> tuple[jax.Array, Sums]:
  """The WKV of x continued after the tokens summed in `initial_sums` ((b, d) each; the empty sums when
  None), and the sums after the last token. 'associative' combines the initial sums into every prefix of
  the scan (one more elementwise `_combine`), so the final sums come from the parallel form too."""
  k_bld, v_bld = k_bld.astype(jnp.float32), v_bld.astype(jnp.float32)
  b, l, d = k_bld.shape
  first = empty_sums((b, d)) if initial_sums is None else tuple(initial_sums)
  if implementation == "scan":
    sums, y_lbd = jax.lax.scan(lambda sums, kv: wkv_token(sums, *kv, w_d, u_d), first,
                               (jnp.swapaxes(k_bld, 0, 1), jnp.swapaxes(v_bld, 0, 1)))
    return jnp.swapaxes(y_lbd, 0, 1), sums
  tokens = (jnp.broadcast_to(w_d, k_bld.shape), v_bld, jnp.ones_like(v_bld), k_bld)
  inclusive = jax.lax.associative_scan(_combine, tokens, axis=1)
  if initial_sums is not None:  # the initial sums decay over each prefix
    inclusive = _combine((0.0, *(x[:, None] for x in first)), inclusive)
  # wkv_t reads the sums over i < t: the inclusive prefix shifted by one, the initial sums first.
  before = [jnp.concatenate([start[:, None], prefix[:, :-1]], axis=1)
            for start, prefix in zip(first, inclusive[1:])]
  return _wkv_output(tuple(before), k_bld, v_bld, u_d), tuple(prefix[:, -1] for prefix in inclusive[1:])


def token_shift(x_bld: jax.Array, last_bd: jax.Array | None = None) -> jax.Array:
  """x'_t = x_{t−1}: x shifted one token later, `last_bd` (the token before x; zeros when None) first."""
  if last_bd is None:
    return jnp.pad(x_bld, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  return jnp.concatenate([last_bd.astype(x_bld.dtype)[:, None], x_bld[:, :-1]], axis=1)


def _fancy_init(d_model: int, layer_idx: int, n_layers: int) -> dict[str, np.ndarray]:
  """Zoology's (RWKV-LM's) layer-dependent init of the decay, bonus and token-shift mixes."""
  ratio_0_to_1 = layer_idx / (n_layers - 1) if n_layers > 1 else 0.0
  ratio_1_to_almost0 = 1.0 - layer_idx / n_layers
  c = np.arange(d_model, dtype=np.float64)
  x = c / d_model
  return dict(
      time_decay=-5 + 8 * (c / max(d_model - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1),
      time_first=math.log(0.3) + ((c + 1) % 3 - 1) * 0.5,
      time_mix_k=x**ratio_1_to_almost0,
      time_mix_v=x**ratio_1_to_almost0 + 0.3 * ratio_0_to_1,
      time_mix_r=x**(0.5 * ratio_1_to_almost0))


@registry.register("rwkv", hparams=RWKVConfig,
                   state_size_formula="4·d (last input, WKV numerator, denominator, running max)")
class RWKV(nnx.Module):

  def __init__(self, cfg: RWKVConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    for name, value in _fancy_init(d_model, layer_idx, n_layers).items():
      setattr(self, name, nnx.Param(jnp.asarray(value, jnp.float32)))

    def linear(axes):  # PyTorch's default nn.Linear init, U(±1/sqrt(d)): see the module docstring
      return nnx.Linear(d_model, d_model, use_bias=False, dtype=dtype, rngs=rngs,
                        kernel_init=layers.logical(layers._torch_conv_init(d_model), axes))

    self.key, self.value, self.receptance = (linear(("embed", "heads")) for _ in range(3))
    self.output = linear(("heads", "embed"))
    self.implementation = cfg.parallel_implementation
    self.d_model = d_model
    self.dtype = dtype

  @staticmethod
  def state_size(cfg: RWKVConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    return 4 * d_model

  def _krv(self, x, x_prev):
    """k, v, r from the token and its predecessor, mixed per channel (the token shift)."""
    def mix(mu):
      mu = mu[...].astype(self.dtype)
      return x * mu + x_prev * (1 - mu)

    return (self.key(mix(self.time_mix_k)), self.value(mix(self.time_mix_v)),
            self.receptance(mix(self.time_mix_r)))

  def _decay_bonus(self):
    return -jnp.exp(self.time_decay[...]), self.time_first[...]

  def _out(self, r, wkv_):
    return self.output((jax.nn.sigmoid(r.astype(jnp.float32)) * wkv_).astype(self.dtype))

  def __call__(self, x_bld: jax.Array, state: dict[str, jax.Array] | None = None,
               return_state: bool = False) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """The parallel form over x; from `state` (`init_state`'s pytree) it continues after the tokens the
    state has seen: the token shift starts from `x_prev` and the WKV sums from (num, den, max). With
    `return_state`, also the state after x (its last token, the sums after it)."""
    if state is None and not return_state:  # training: no state in or out
      k_bld, v_bld, r_bld = self._krv(x_bld, token_shift(x_bld))
      return self._out(r_bld, wkv(*self._decay_bonus(), k_bld, v_bld, self.implementation))
    state = self.init_state(x_bld.shape[0]) if state is None else state
    k_bld, v_bld, r_bld = self._krv(x_bld, token_shift(x_bld, state["x_prev"]))
    wkv_bld, (a, b, p) = wkv_from(*self._decay_bonus(), k_bld, v_bld, self.implementation,
                                  (state["num"], state["den"], state["max"]))
    state = dict(x_prev=x_bld[:, -1].astype(jnp.float32), num=a, den=b, max=p)
    return self._out(r_bld, wkv_bld), state

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    """The previous input (zeros before the sequence) and the empty WKV sums, (b, d) float32 each."""
    a, b, p = empty_sums((batch_size, self.d_model))
    return dict(x_prev=jnp.zeros((batch_size, self.d_model), jnp.float32), num=a, den=b, max=p)

  def step(self, state: dict[str, jax.Array], x_bd: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    k_bd, v_bd, r_bd = self._krv(x_bd, state["x_prev"].astype(x_bd.dtype))
    sums, wkv_bd = wkv_token((state["num"], state["den"], state["max"]), k_bd.astype(jnp.float32),
                             v_bd.astype(jnp.float32), *self._decay_bonus())
    state = dict(x_prev=x_bd.astype(jnp.float32), num=sums[0], den=sums[1], max=sums[2])
    return state, self._out(r_bd, wkv_bd)
