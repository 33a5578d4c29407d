"""Gated linear attention (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
Training"), with the structure and defaults of `fla`'s `GatedLinearAttention` layer (which Zoology wraps).

    q, k, v = x W_q, x W_k, x W_v                 widths K = expand_k·d, K, V = expand_v·d; H heads
    [q, k, v = SiLU(causal depthwise conv(q, k, v))  with use_short_conv]
    log α_t = log σ(x W_1 W_2 + b) / τ            (b, l, K): the low-rank data-dependent forget gate on
                                                  the keys, α_t = σ(·)^(1/τ), τ = gate_logit_normalizer
    S_t = diag(α_t) S_{t−1} + k_tᵀ v_t            per head, (K/H × V/H)                      (Section 4.1)
    o_t = (q_t / sqrt(K/H)) S_t
    out = (RMSNorm_head(o) ⊙ swish(x W_r)) W_O     per-head RMSNorm (weight shared by the heads), the
                                                  output gate (the GLA Transformer layer, Section 4.4)

Dimension legend: b batch, l length, d model width, h heads, k key width per head (K/H), v value width
per head (V/H), r the gate's rank (gate_low_rank_dim).

The parallel form is the chunkwise form (Section 4.2; its secondary chunking, Section 4.3, at one level)
in its log-space stable variant: inside a chunk of `chunk_size` tokens the weights
exp(Σ_{s<u<=t} log α_u) per key channel are formed pairwise (never exp(±cumulative sums), which
overflow), across chunks the states are passed by a `lax.scan` (`ops.chunked_gla.chunked` states the
algorithm and its numerics: float32, every exponent <= 0). `step` is the recurrence, one token at a time.

Hyperparameters (fla's defaults): `num_heads` = 4, `expand_k` = 0.5, `expand_v` = 1, `gate_low_rank_dim`
= 16, `gate_logit_normalizer` = 16, `clamp_min` = None (a floor on log α), `use_short_conv` = False,
`conv_size` = 4, `use_output_gate` = True, `norm_eps` = 1e-5; `chunk_size` = 16.

Differences from fla:
- `chunk_size` 16 is fla's inner (secondary) chunk: fla's `chunk_gla` runs chunks of 64 split into
  sub-chunks of 16, the pairs across sub-chunks as matmuls; here one level of chunks, so the pairwise
  c × c × k weights cost l·c·k per head and a small chunk is the fast one (measured in
  `experiments/bench_recurrence.py`).
- The short convolution (`layers.ShortConvolution`, one over q, k, v together, the same depthwise
  arithmetic as fla's three) has a bias; fla's default `conv_bias=False` has none.
- All projections are initialised as every zoo_jax mixer (`layers.linear`): N(0, 0.02), biases 0 (so
  α ≈ σ(0)^(1/16) ≈ 0.96 at init), W_O N(0, 0.02/sqrt(2·n_layers)); fla's and Zoology's model-level
  `_init_weights` were not reproduced name by name for this layer.
- The recurrence runs in float32 at the highest matmul precision, not in Triton kernels; the projections
  in the compute dtype. Not options: `num_kv_heads` (grouped keys), `feature_map`, `gate_fn` other than
  swish, `elementwise_affine=False`, the kernel `mode`s.

State: one k × v matrix per head, K·V/H elements per example, plus with use_short_conv the conv window
(2K + V)·(conv_size − 1) — the count Zoology's `GatedLinearAttention.state_size` reports.
`__call__(x, state=..., return_state=True)` continues from such a state (prefill → decode): the conv
window is prepended to the conv's input, the chunked recurrence starts from S (`ops.chunked_gla.chunked`'s
initial state), and the state after x is its final chunk state and the last conv_size − 1 conv inputs.

Sharding: the fused qkv_proj kernel is replicated over the mesh's `model` axis (logical
axes (embed, None)): its parts have unequal widths and the short conv runs over them before the split,
so a split of its columns would cut across q, k and v (`layers.FusedLinear` is the layout of the
mixers whose parts split evenly).
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers
from zoo_jax.mixers import _filters, registry
from zoo_jax.ops import chunked_gla


@dataclasses.dataclass(frozen=True)
class GLAConfig:
  num_heads: int = 4
  expand_k: float = 0.5
  expand_v: float = 1.0
  gate_low_rank_dim: int = 16
  gate_logit_normalizer: float = 16.0
  clamp_min: float | None = None
  use_short_conv: bool = False
  conv_size: int = 4
  use_output_gate: bool = True
  norm_eps: float = 1e-5
  chunk_size: int = 16

  def validate(self, field: str) -> None:
    for name in ("num_heads", "gate_low_rank_dim", "conv_size", "chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{field}.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("expand_k", "expand_v", "gate_logit_normalizer", "norm_eps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{field}.{name} must be > 0, got {getattr(self, name)}")
    if self.clamp_min is not None and not self.clamp_min < 0:
      raise ValueError(f"{field}.clamp_min must be None or < 0 (a floor on log α), got {self.clamp_min}")

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    self.widths(d_model, field)

  def widths(self, d_model: int, field: str = "model.mixer") -> tuple[int, int]:
    """(K, V), each split evenly over the heads; a one-line ValueError if they are not."""
    widths = int(d_model * self.expand_k), int(d_model * self.expand_v)
    for name, width in zip(("expand_k", "expand_v"), widths):
      if width < self.num_heads or width % self.num_heads:
        raise ValueError(f"{field}.{name}·d_model = {width} must be a positive multiple of num_heads = "
                         f"{self.num_heads}, got {name} = {getattr(self, name)}")
    return widths


@registry.register("gla", hparams=GLAConfig,
                   state_size_formula="K·V/H (+ (2K+V)·(conv_size-1) with use_short_conv), "
                                      "K = expand_k·d, V = expand_v·d, H = num_heads")
class GatedLinearAttention(nnx.Module):

  def __init__(self, cfg: GLAConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    key_width, value_width = cfg.widths(d_model)
    self.num_heads, self.key_width, self.value_width = cfg.num_heads, key_width, value_width
    self.gate_logit_normalizer, self.clamp_min = cfg.gate_logit_normalizer, cfg.clamp_min
    self.chunk_size, self.dtype = cfg.chunk_size, dtype
    proj = lambda width, axes=("embed", "heads"): layers.linear(d_model, width, axes=axes, rngs=rngs,
                                                                dtype=dtype, use_bias=False)
    # Replicated over `model` (logical None): q, k, v have unequal widths when expand_v != 1 and the short
    # conv runs over the fused channels, so a column split would cut across them.
    self.qkv_proj = proj(2 * key_width + value_width, ("embed", None))
    self.conv = (layers.ShortConvolution(2 * key_width + value_width, cfg.conv_size, rngs=rngs, dtype=dtype)
                 if cfg.use_short_conv else None)
    self.gate_proj = proj(value_width) if cfg.use_output_gate else None
    self.forget_down = proj(cfg.gate_low_rank_dim, ("embed", None))
    self.forget_up = layers.linear(cfg.gate_low_rank_dim, key_width, axes=(None, "heads"), rngs=rngs,
                                   dtype=dtype)
    self.norm = nnx.RMSNorm(value_width // cfg.num_heads, epsilon=cfg.norm_eps, dtype=jnp.float32, rngs=rngs)
    self.out_proj = layers.linear(value_width, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                                  std=layers.out_proj_std(n_layers), use_bias=False)

  @staticmethod
  def state_size(cfg: GLAConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    key_width, value_width = cfg.widths(d_model)
    conv = (2 * key_width + value_width) * (cfg.conv_size - 1) if cfg.use_short_conv else 0
    return key_width * value_width // cfg.num_heads + conv

  def _heads(self, x, qkv):
    """(q scaled by 1/sqrt(k), k, v, log α) per head, float32, from the input and the (conv'd) q, k, v."""
    lead = qkv.shape[:-1]
    q, k, v = jnp.split(qkv.astype(jnp.float32), [self.key_width, 2 * self.key_width], axis=-1)
    log_alpha = jax.nn.log_sigmoid(self.forget_up(self.forget_down(x)).astype(jnp.float32))
    log_alpha = log_alpha / self.gate_logit_normalizer
    if self.clamp_min is not None:
      log_alpha = jnp.maximum(log_alpha, self.clamp_min)
    heads = lambda t: t.reshape(*lead, self.num_heads, -1)
    q = q * (self.key_width // self.num_heads) ** -0.5
    return heads(q), heads(k), heads(v), heads(log_alpha)

  def _output(self, o_heads, x):
    o = self.norm(o_heads)
    o = o.reshape(*o.shape[:-2], self.value_width)
    if self.gate_proj is not None:
      o = o * jax.nn.silu(self.gate_proj(x).astype(jnp.float32))
    return self.out_proj(o.astype(self.dtype))

  def __call__(self, x_bld: jax.Array, state: dict[str, Any] | None = None,
               return_state: bool = False) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """The chunked form over x; from `state` (`init_state`'s pytree) it continues after the tokens the
    state has seen: the conv window is prepended to the conv's input and the chunked recurrence starts
    from S. With `return_state`, also the state after x: the final chunk state and the last conv inputs."""
    state = {} if state is None else state  # None: the sequence starts here (S = 0, zero conv inputs before it)
    qkv, new_state = self.qkv_proj(x_bld), {}
    if self.conv is not None:
      qkv, new_state["conv"] = _filters.short_conv_continued(self.conv, state.get("conv"), qkv)
      qkv = jax.nn.silu(qkv)
    result = chunked_gla.chunked(*self._heads(x_bld, qkv), self.chunk_size, initial_state_bhkv=state.get("s"),
                                 output_final_state=return_state)
    if not return_state:
      return self._output(result, x_bld).astype(x_bld.dtype)
    o_blhv, new_state["s"] = result
    return self._output(o_blhv, x_bld).astype(x_bld.dtype), new_state

  def init_state(self, batch_size: int) -> dict[str, Any]:
    """S per head (b, h, k, v), and with use_short_conv the conv window (b, conv_size − 1, 2K + V): the
    last conv inputs (q | k | v before the conv)."""
    state = dict(s=jnp.zeros((batch_size, self.num_heads, self.key_width // self.num_heads,
                              self.value_width // self.num_heads), jnp.float32))
    if self.conv is not None:
      state["conv"] = self.conv.init_state(batch_size)
    return state

  def step(self, state: dict[str, Any], x_bd: jax.Array) -> tuple[dict[str, Any], jax.Array]:
    qkv, new_state = self.qkv_proj(x_bd), {}
    if self.conv is not None:
      new_state["conv"], qkv = self.conv.step(state["conv"], qkv)
      qkv = jax.nn.silu(qkv)
    new_state["s"], o_bhv = chunked_gla.recurrent_step(state["s"], *self._heads(x_bd, qkv))
    return new_state, self._output(o_bhv, x_bd).astype(x_bd.dtype)
