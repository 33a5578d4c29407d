"""Based linear attention (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff", Section 3; Zoology's `mixers/based.py`) with the Taylor-2 feature map.

Dimension legend: b batch, l / m sequence positions, h heads, f feature width (q, k per head), e expanded
feature width 1 + f + f(f+1)/2, v value width per head d/h, n chunks, c positions in a chunk.

    q, k = x W_q, x W_k  (h heads of f);   v = x W_v  (h heads of d/h)
    y_t = φ(q_t)ᵀ Σ_{s≤t} φ(k_s) v_sᵀ / (φ(q_t)ᵀ Σ_{s≤t} φ(k_s) + eps);   out = W_o y

with φ(q)·φ(k) = 1 + q·k/√f + (q·k)²/(2f), the second-order Taylor expansion of exp(q·k/√f)
(`ops.feature_maps.taylor_exp`). Every term is positive (1 + s + s²/2 ≥ 1/2), so the denominator is at least
(t+1)/2 and eps only guards the degenerate case, as in Zoology.

Parallel forms (`parallel_implementation`, Zoology's `train_view`): 'quadratic' masks the l×l matrix of
φ(q_t)·φ(k_s), computed from q·k directly (O(f) per pair, not O(f²)); 'linear' is a chunked scan: the
quadratic form inside chunks of `chunk_size` positions plus the running sums Σ φ(k) vᵀ, Σ φ(k) of all
earlier chunks (exclusive cumulative sums over chunks) — O(l·c + l·e·v) instead of O(l²), and unlike
Zoology's `linear` view, no (l, e, v) cumulative sum is materialised per position. The recurrent form
keeps the two sums.

Hyperparameters (Zoology's Figure-2 Based config: `feature_dim` 16 in Zoology's class, 8 in the figure;
`num_heads` = `num_key_value_heads` = 1; `train_view` 'quadratic'; eps 1e-12): `feature_dim` = 16,
`num_heads` = 1, `num_key_value_heads` = 1, `eps` = 1e-12, `parallel_implementation` = 'quadratic',
`chunk_size` = 64 (the 'linear' form only).

Differences from Zoology's PyTorch `Based`:
- `num_key_value_heads` must equal `num_heads`: Zoology's forward (without rotary embeddings) reshapes
  the k projection of `num_heads·f` outputs into `num_key_value_heads` heads, so any other value fails
  there too; rotary embeddings (`apply_rotary`), the non-causal mode and other feature maps are left out;
- the attention core runs in float32 whatever the compute dtype (Zoology's quadratic view multiplies in
  the input dtype); the projections run in the compute dtype;
- the sliding-window softmax attention the Based paper pairs with the linear attention is not part of
  this mixer (in Zoology it is a separate mixer, `slide_attn`, combined through `Hybrid`);
- every projection, `proj_o` too, is initialised N(0, 0.02), as Zoology's `_init_weights` does (it
  rescales only parameters named `out_proj` / `fc2`).

State: per head the sums Σ φ(k) vᵀ (e × d/h) and Σ φ(k) (e): e·(d + h) elements per example, with
e = 1 + f + f(f+1)/2 — the count Zoology's `Based.state_size` reports (its `expanded_size` is the compact
map's width). `__call__(x, state=..., return_state=True)` continues from such a state (prefill → decode):
both parallel forms add φ(q_t)ᵀ Σ φ(k) vᵀ and φ(q_t)ᵀ Σ φ(k) of the state to every numerator and
denominator, and the state after x adds Σ φ(k_s) v_sᵀ and Σ φ(k_s) over x (one contraction each).
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers
from zoo_jax.mixers import registry
from zoo_jax.ops.feature_maps import taylor_exp, taylor_exp_dim, taylor_exp_kernel

IMPLEMENTATIONS = ("quadratic", "linear")


@dataclasses.dataclass(frozen=True)
class BasedConfig:
  feature_dim: int = 16
  num_heads: int = 1
  num_key_value_heads: int = 1
  eps: float = 1e-12
  parallel_implementation: str = "quadratic"
  chunk_size: int = 64

  def validate(self, field: str) -> None:
    for name in ("feature_dim", "num_heads", "chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{field}.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_key_value_heads != self.num_heads:
      raise ValueError(f"{field}.num_key_value_heads must equal num_heads ({self.num_heads}), "
                       f"got {self.num_key_value_heads}")
    if not self.eps >= 0:
      raise ValueError(f"{field}.eps must be >= 0, got {self.eps}")
    if self.parallel_implementation not in IMPLEMENTATIONS:
      raise ValueError(f"{field}.parallel_implementation must be one of {list(IMPLEMENTATIONS)}, "
                       f"got {self.parallel_implementation!r}")

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    registry.check_heads(field, self.num_heads, d_model)


def _masked_kernel(q_bhlf, k_bhmf):
  """φ(q_t)·φ(k_s) for s ≤ t, 0 above the diagonal."""
  l = q_bhlf.shape[-2]
  return jnp.where(jnp.tril(jnp.ones((l, l), bool)), taylor_exp_kernel(q_bhlf, k_bhmf), 0.0)


def quadratic(q_bhlf, k_bhlf, v_bhlv, eps: float, state=None) -> jax.Array:
  """The quadratic form; after a `state` (the sums Σ φ(k) vᵀ `kv` (b, h, e, v) and Σ φ(k) `k_sum` (b, h, e)
  of earlier positions) every query also reads those sums through φ(q)."""
  a_bhlm = _masked_kernel(q_bhlf, k_bhlf)
  num, den = a_bhlm @ v_bhlv, a_bhlm.sum(-1, keepdims=True)
  if state is not None:
    phi_q = taylor_exp(q_bhlf)
    num = num + jnp.einsum("bhle,bhev->bhlv", phi_q, state["kv"])
    den = den + jnp.einsum("bhle,bhe->bhl", phi_q, state["k_sum"])[..., None]
  return num / (den + eps)


def final_state(k_bhlf, v_bhlv, state=None) -> dict[str, jax.Array]:
  """The sums after these positions: Σ φ(k) vᵀ and Σ φ(k) over them, plus `state`'s (earlier positions')."""
  phi_k = taylor_exp(k_bhlf)
  sums = dict(kv=jnp.einsum("bhle,bhlv->bhev", phi_k, v_bhlv, precision=jax.lax.Precision.HIGHEST),
              k_sum=phi_k.sum(axis=2))
  return sums if state is None else jax.tree.map(jnp.add, state, sums)


def chunked(q_bhlf, k_bhlf, v_bhlv, eps: float, chunk_size: int, state=None) -> jax.Array:
  """The linear form: quadratic within chunks, the sums of all earlier chunks through φ (and, after a
  `state` as `quadratic`'s, the sums of the earlier positions too)."""
  b, h, l, f = q_bhlf.shape
  c = min(chunk_size, l)
  n = -(-l // c)
  pad = ((0, 0), (0, 0), (0, n * c - l), (0, 0))  # padded keys come after every real query: no effect
  q, k, v = (jnp.pad(x, pad).reshape(b, h, n, c, x.shape[-1]) for x in (q_bhlf, k_bhlf, v_bhlv))
  a_bhncc = _masked_kernel(q, k)
  phi_q, phi_k = taylor_exp(q), taylor_exp(k)
  kv_bhnev = jnp.einsum("bhnce,bhncv->bhnev", phi_k, v)
  k_sum_bhne = phi_k.sum(axis=3)
  # Sums over the chunks before each chunk: the exclusive cumulative sum.
  kv_before, k_before = (jnp.cumsum(x, axis=2) - x for x in (kv_bhnev, k_sum_bhne))
  if state is not None:
    kv_before, k_before = kv_before + state["kv"][:, :, None], k_before + state["k_sum"][:, :, None]
  num = a_bhncc @ v + jnp.einsum("bhnce,bhnev->bhncv", phi_q, kv_before)
  den = a_bhncc.sum(-1) + jnp.einsum("bhnce,bhne->bhnc", phi_q, k_before)
  y = num / (den[..., None] + eps)
  return y.reshape(b, h, n * c, -1)[:, :, :l]


@registry.register("based", hparams=BasedConfig,
                   state_size_formula="e·(d + h), e = 1 + f + f(f+1)/2 (Σ φ(k) vᵀ and Σ φ(k) per head)")
class Based(nnx.Module):

  def __init__(self, cfg: BasedConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    if d_model % cfg.num_heads:
      raise ValueError(f"model.mixer.num_heads must divide model.d_model ({d_model}), got {cfg.num_heads}")
    h, f = cfg.num_heads, cfg.feature_dim

    def linear(d_out, axes):
      return layers.linear(d_model, d_out, axes=axes, rngs=rngs, use_bias=False, dtype=dtype)

    self.proj_q, self.proj_k = linear(h * f, ("embed", "heads")), linear(h * f, ("embed", "heads"))
    self.proj_v = linear(d_model, ("embed", "heads"))
    self.proj_o = linear(d_model, ("heads", "embed"))
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype

  @staticmethod
  def state_size(cfg: BasedConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    return taylor_exp_dim(cfg.feature_dim) * (d_model + cfg.num_heads)

  def _qkv(self, x_bld):
    """q, k (..., h, f) and v (..., h, d/h), float32, for x (..., d)."""
    h = self.cfg.num_heads
    split = lambda y: y.astype(jnp.float32).reshape(*y.shape[:-1], h, -1)
    return split(self.proj_q(x_bld)), split(self.proj_k(x_bld)), split(self.proj_v(x_bld))

  def __call__(self, x_bld: jax.Array, state: dict[str, jax.Array] | None = None,
               return_state: bool = False) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """The parallel form over x; from `state` (`init_state`'s pytree) it continues after the positions the
    state has seen: each query also reads the sums Σ φ(k) vᵀ and Σ φ(k) of those positions. With
    `return_state`, also the sums after x: the state's plus Σ φ(k) vᵀ and Σ φ(k) over x, contracted over
    the positions at once."""
    b, l, d = x_bld.shape
    q, k, v = (jnp.swapaxes(y, 1, 2) for y in self._qkv(x_bld))  # (b, h, l, .)
    if self.cfg.parallel_implementation == "quadratic":
      y_bhlv = quadratic(q, k, v, self.cfg.eps, state)
    else:
      y_bhlv = chunked(q, k, v, self.cfg.eps, self.cfg.chunk_size, state)
    y_bld = self.proj_o(jnp.swapaxes(y_bhlv, 1, 2).reshape(b, l, d).astype(self.dtype))
    return (y_bld, final_state(k, v, state)) if return_state else y_bld

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    """Σ φ(k) vᵀ (b, h, e, d/h) and Σ φ(k) (b, h, e) over the positions seen, zeros."""
    h, e = self.cfg.num_heads, taylor_exp_dim(self.cfg.feature_dim)
    return dict(kv=jnp.zeros((batch_size, h, e, self.d_model // h), jnp.float32),
                k_sum=jnp.zeros((batch_size, h, e), jnp.float32))

  def step(self, state: dict[str, jax.Array], x_bd: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    q_bhf, k_bhf, v_bhv = self._qkv(x_bd)
    phi_q, phi_k = taylor_exp(q_bhf), taylor_exp(k_bhf)
    kv = state["kv"] + phi_k[..., None] * v_bhv[..., None, :]
    k_sum = state["k_sum"] + phi_k
    y_bhv = (jnp.einsum("bhe,bhev->bhv", phi_q, kv)
             / (jnp.einsum("bhe,bhe->bh", phi_q, k_sum)[..., None] + self.cfg.eps))
    return dict(kv=kv, k_sum=k_sum), self.proj_o(y_bhv.reshape(x_bd.shape).astype(self.dtype))
