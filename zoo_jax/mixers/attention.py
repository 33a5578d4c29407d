"""Causal multi-head softmax attention (Vaswani et al. 2017), the paper's reference mixer.

    q, k, v = split(x W_qkv + b_qkv);   y = softmax(q kᵀ / sqrt(d_head) + causal mask) v;   out = y W_o + b_o

Hyperparameters (Zoology's `MHA` defaults): `num_heads` = 1. Zoology's Figure-2 runs pair it with learned
absolute positions, which live in the model (`model.learned_positions`), not here.

`rotary` (default off, so MQAR runs are unchanged) rotates q and k by position before the softmax (RoPE,
Su et al. 2021, eq. 34), as the paper's Pile attention baselines do: for head-dimension pairs
(i, i + d_head/2) and frequencies θ_i = base^(-2i/d_head), (q_i, q_{i+d/2}) at position t becomes
(q_i cos tθ_i − q_{i+d/2} sin tθ_i, q_{i+d/2} cos tθ_i + q_i sin tθ_i); likewise k. This is the half-split
(GPT-NeoX / flash-attn non-interleaved) layout the paper's Pile runs use. No parameters are added.

`dropout` (default 0, so runs are unchanged; Zoology's `MHA(dropout=...)` defaults to 0.0 too, and its
Figure-2 configs set 0.1, which `zoo_jax.configs.figure2.ZOOLOGY_DROPOUT` gives): during training, each
softmax probability is zeroed with that probability and the rest scaled by 1 / (1 − dropout), before the
weighted sum of the values, as Zoology's `SelfAttention` does (`F.dropout(attention, ...)`,
`zoology/mixers/attention.py` at 0a76ef2). The probabilities are materialised for that (`dropout_attention`:
(b, h, l, l) float32, the 'xla' path's memory), so a training forward with dropout > 0 takes that path
whatever `implementation` None picks; 'blockwise' / 'cudnn' given explicitly with dropout > 0 are refused
(one line). Evaluation, prefill and decoding never drop (the model passes no dropout key there).

Differences from Zoology's PyTorch `MHA`: masked logits are −inf rather than an additive −10000; the
softmax is `jax.nn.dot_product_attention`, which XLA fuses, and on GPU can use cuDNN.

`implementation` (zoo_jax's, default None) picks how the causal softmax is computed (`ops.attention`):
'xla' (`jax.nn.dot_product_attention`'s XLA path: l×l float32 logits, the masked half computed too),
'cudnn' (its cuDNN flash kernel: GPU only, bf16 / fp16), 'blockwise' (FlashAttention-2 in plain JAX on
every backend: key blocks with an online float32 softmax, blocks above the diagonal skipped, a
recomputing backward, never an l×l array).

Which path runs: THE table for `attention`, `sliding_window`, `blocked` and `sparse_attention`'s
selection='full' (the others' docstrings point here; `Attention.implementation_for`, `check_implementation`,
`validate_implementation`, `validate_dropout` and `ops.attention.default_implementation` implement it).

  call                                  activations    None                          explicit choice
  training, dropout > 0 (a key)         any            `dropout_attention`: the      'xla': the same; 'blockwise',
                                                       (b, h, l, l) probabilities    'cudnn': refused (config time)
  training without dropout, evaluation, bf16 / fp16    GPU 'cudnn', CPU / TPU        as given
  prefill from position 0 (no state)    float32        'blockwise' (`FASTEST`)       as given; 'cudnn': refused (config)
  local attentions' cache paths         float32        'blockwise'                   'cudnn' runs 'blockwise' (cuDNN
  (prefill from a state, buffer)                                                     takes no float32); others as given
  `Attention` from a state / `step`     float32        'xla' (l × L mask over the    'xla' whatever was chosen
                                                       cache)

Why: CPU's default is measured (experiments/bench_attention.py, README); GPU's is unmeasured (cuDNN where
it runs, blockwise elsewhere). Dropout needs the probabilities materialised, which only the XLA path has.
`Attention`'s cache path stays on XLA: its queries sit at per-example positions t .. t + l − 1 (t traced)
over an L-slot cache, which the blockwise op (queries and keys aligned from position 0) does not take; a
step (l = 1) costs O(L) on any path, and `generate`'s prefill (no state) already takes the training path,
so its temporaries are linear in L (tests/test_attention_blockwise.py). Impossible explicit choices are one
line naming the field, before any compute: 'cudnn' off GPU when the config is parsed (`validate`, the
field including a hybrid's `mixers[i]`), 'cudnn' with model.dtype float32 when the model config is parsed
(`ModelConfig.validate` → the configs' `check_dtype`, the same field names), and again when the mixer is
built.

State: the KV cache, 2·d·L elements per example per layer: keys (rotated when `rotary`) and values of
the positions seen so far at cache slots 0 .. t − 1, and the per-example position t. Given a state, the
parallel form continues from it (prefill → decode): the keys and values of its l positions go into cache
slots t .. t + l − 1 (t + l <= L), their queries attend causally over slots 0 .. t + i, and rotary positions
run t .. t + l − 1. `step` is the same computation for l = 1.
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers
from zoo_jax.mixers import registry
from zoo_jax.ops import attention as attention_ops

# The mixers' `implementation` values besides None: the op's paths but its test-only reference.
IMPLEMENTATIONS = tuple(impl for impl in attention_ops.IMPLEMENTATIONS if impl != "reference")


def validate_implementation(field: str, implementation: str | None) -> None:
  """When the config is parsed: a known name, and 'cudnn' only on a GPU (the table in the module docstring)."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{field}.implementation must be one of None, {', '.join(map(repr, IMPLEMENTATIONS))}; "
                     f"got {implementation!r}")
  attention_ops.resolve(implementation, field=f"{field}.implementation")  # 'cudnn' off GPU


def check_implementation(implementation: str | None, dtype: Any, field: str = "model.mixer") -> None:
  """'cudnn' needs a GPU and bf16 / fp16 activations (model.dtype): the configs' `check_dtype` when the model
  config is parsed (`field` naming a hybrid's `mixers[i]`), and again at construction."""
  attention_ops.resolve(implementation, dtype, field=f"{field}.implementation")
  if implementation == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"{field}.implementation='cudnn' takes model.dtype bfloat16 / float16 (cuDNN has no "
                     f"float32 kernel), got {jnp.dtype(dtype).name}: use None, 'blockwise' or 'xla'")


def validate_dropout(field: str, rate: float, implementation: str | None) -> None:
  """`dropout` in [0, 1), and a path that materialises the probabilities it drops (None or 'xla')."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"{field}.dropout must be a number in [0, 1), got {rate!r}")
  if rate > 0 and implementation not in (None, "xla"):
    raise ValueError(f"{field}.dropout > 0 needs {field}.implementation None or 'xla' (dropout acts on the "
                     f"materialised softmax probabilities), got {implementation!r}")


def dropout_attention(q_blhk: jax.Array, k_blhk: jax.Array, v_blhk: jax.Array, *, rate: float,
                      key: jax.Array | None, window: int | None = None) -> jax.Array:
  """Causal softmax attention (scale 1/sqrt(k); `window` w: query i sees keys i − w .. i) with dropout on
  the (b, h, l, l) float32 probabilities (`ops.attention.causal_probabilities`), as Zoology's
  `SelfAttention`; the output has q's dtype."""
  p_bhij = layers.dropout(attention_ops.causal_probabilities(q_blhk, k_blhk, window=window), rate, key)
  return jnp.einsum("bhij,bjhk->bihk", p_bhij.astype(v_blhk.dtype), v_blhk,
                    preferred_element_type=jnp.float32).astype(q_blhk.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  num_heads: int = 1
  rotary: bool = False  # rotary position embedding on q and k (the paper's Pile runs)
  rotary_base: float = 10000.0
  implementation: str | None = None  # None | 'xla' | 'cudnn' | 'blockwise' (module docstring)
  dropout: float = 0.0  # on the softmax probabilities, training only (module docstring)

  def validate(self, field: str) -> None:
    validate_implementation(field, self.implementation)
    validate_dropout(field, self.dropout, self.implementation)
    if self.num_heads < 1:
      raise ValueError(f"{field}.num_heads must be >= 1, got {self.num_heads}")
    if self.rotary_base <= 1.0:
      raise ValueError(f"{field}.rotary_base must be > 1, got {self.rotary_base}")

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    registry.check_heads(field, self.num_heads, d_model, even=self.rotary)

  def check_dtype(self, field: str, dtype: Any) -> None:
    check_implementation(self.implementation, dtype, field)


def apply_rotary(x_blhk: jax.Array, positions_bl: jax.Array, base: float) -> jax.Array:
  """RoPE in the half-split layout: rotates the pairs (x_i, x_{i+k/2}) by angle position·base^(-2i/k)."""
  half = x_blhk.shape[-1] // 2
  inv_freq_f = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_bl1f = (positions_bl.astype(jnp.float32)[..., None] * inv_freq_f)[:, :, None, :]
  cos, sin = jnp.cos(angle_bl1f), jnp.sin(angle_bl1f)
  x1, x2 = x_blhk[..., :half].astype(jnp.float32), x_blhk[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_blhk.dtype)


@registry.register("attention", hparams=AttentionConfig, state_size_formula="2·d·L (KV cache)")
class Attention(nnx.Module):

  def __init__(self, cfg: AttentionConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    if d_model % cfg.num_heads:
      raise ValueError(f"model.mixer.num_heads must divide model.d_model ({d_model}), got {cfg.num_heads}")
    # The local attentions (sliding_window, blocked) subclass Attention with configs that have no rotary.
    rotary, rotary_base = getattr(cfg, "rotary", False), getattr(cfg, "rotary_base", 10000.0)
    if rotary and (d_model // cfg.num_heads) % 2:
      raise ValueError(f"model.mixer.rotary needs an even head dimension, got d_model/num_heads = "
                       f"{d_model // cfg.num_heads}")
    # sparse_attention subclasses Attention with a config that has no `implementation`: the default.
    self.implementation = getattr(cfg, "implementation", None)
    check_implementation(self.implementation, dtype)
    self.dropout_rate = getattr(cfg, "dropout", 0.0)  # sparse_attention's config has none: 0
    self.num_heads = cfg.num_heads
    self.rotary = rotary
    self.rotary_base = rotary_base
    self.seq_len = seq_len
    self.d_model = d_model
    # Kernel (d, 3, h, d/h), logical (embed, None, heads, head_dim): a `model` shard holds whole heads of
    # q, k and v alike (layers.FusedLinear); the output is (b, l, 3, h, d/h).
    self.qkv_proj = layers.FusedLinear(d_model, (3, cfg.num_heads, d_model // cfg.num_heads),
                                       axes=("embed", None, "heads", "head_dim"), rngs=rngs, dtype=dtype)
    self.out_proj = layers.linear(d_model, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                                  std=layers.out_proj_std(n_layers))

  @staticmethod
  def state_size(cfg: AttentionConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    return 2 * d_model * seq_len

  def __call__(self, x_bld: jax.Array, state: dict[str, jax.Array] | None = None,
               return_state: bool = False, dropout_key: jax.Array | None = None,
               ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Causal attention over x; with `state`, x's positions follow the cached ones (module docstring).
    With `return_state`, also the KV cache after x. `dropout_key` (training): dropout on the probabilities."""
    if state is not None:
      state, y_bld = self.extend_cache(state, x_bld)
      return (y_bld, state) if return_state else y_bld
    b, l, d = x_bld.shape
    qkv = self.qkv_proj(x_bld)  # (b, l, 3, h, d/h)
    q_blhk, k_blhk, v_blhk = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.rotary:
      positions_bl = jnp.broadcast_to(jnp.arange(l), (b, l))
      q_blhk = apply_rotary(q_blhk, positions_bl, self.rotary_base)
      k_blhk = apply_rotary(k_blhk, positions_bl, self.rotary_base)
    if self.drops(dropout_key):
      y_blhk = dropout_attention(q_blhk, k_blhk, v_blhk, rate=self.dropout_rate, key=dropout_key)
    else:
      y_blhk = attention_ops.causal_attention(q_blhk, k_blhk, v_blhk,
                                              implementation=self.implementation_for(q_blhk.dtype))
    y_bld = self.out_proj(y_blhk.reshape(b, l, d))
    if not return_state:
      return y_bld
    # The cache of a prefill from position 0: this pass's keys and values in slots 0 .. l − 1.
    cache = self.init_state(b)
    write = lambda cache_bshk, new_blhk: cache_bshk.at[:, :l].set(new_blhk.astype(cache_bshk.dtype))
    return y_bld, dict(k=write(cache["k"], k_blhk), v=write(cache["v"], v_blhk), t=cache["t"] + l)

  def drops(self, dropout_key: jax.Array | None) -> bool:
    """Whether this call drops probabilities: a training call (a key) of a mixer with dropout > 0."""
    return dropout_key is not None and self.dropout_rate > 0

  def implementation_for(self, dtype: Any) -> str | None:
    """`implementation` for activations of `dtype` (the module docstring's table): cuDNN takes no float32,
    so an explicit 'cudnn' (allowed only with bf16 / fp16 model.dtype) runs 'blockwise' on the float32
    paths (the local attentions' cache path); None stays None (`ops.attention` picks by backend and dtype)."""
    if self.implementation == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      return "blockwise"
    return self.implementation

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    """The KV cache for L positions, (b, L, h, d/h) each, and the position."""
    shape = (batch_size, self.seq_len, self.num_heads, self.d_model // self.num_heads)
    return dict(k=jnp.zeros(shape, jnp.float32), v=jnp.zeros(shape, jnp.float32),
                t=jnp.zeros((batch_size,), jnp.int32))

  def extend_cache(self, state: dict[str, jax.Array], x_bld: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """l tokens after the state's t: their keys and values go into cache slots t .. t + l − 1 (one
    dynamic_update_slice per example; t + l must not pass the cache's length), and query i attends over
    slots 0 .. t + i. In float32, as the cache is, on the XLA path whatever `implementation` (the module
    docstring's table says why)."""
    b, l, d = x_bld.shape
    qkv = self.qkv_proj(x_bld).astype(jnp.float32)  # (b, l, 3, h, d/h)
    q_blhk, k_blhk, v_blhk = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    t_b = state["t"]
    positions_bl = t_b[:, None] + jnp.arange(l)
    if self.rotary:
      q_blhk = apply_rotary(q_blhk, positions_bl, self.rotary_base)
      k_blhk = apply_rotary(k_blhk, positions_bl, self.rotary_base)
    put = jax.vmap(lambda cache_shk, t, new_lhk: jax.lax.dynamic_update_slice_in_dim(cache_shk, new_lhk, t, 0))
    k_cache, v_cache = put(state["k"], t_b, k_blhk), put(state["v"], t_b, v_blhk)
    mask_bls = jnp.arange(k_cache.shape[1])[None, None] <= positions_bl[:, :, None]
    y_blhk = jax.nn.dot_product_attention(q_blhk, k_cache, v_cache, mask=mask_bls[:, None], implementation="xla")
    y_bld = self.out_proj(y_blhk.reshape(b, l, d).astype(x_bld.dtype))
    return dict(k=k_cache, v=v_cache, t=t_b + l), y_bld

  def step(self, state: dict[str, jax.Array], x_bd: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """One token: append k, v to the cache and attend over the positions filled so far."""
    state, y_b1d = self.extend_cache(state, x_bd[:, None])
    return state, y_b1d[:, 0]
