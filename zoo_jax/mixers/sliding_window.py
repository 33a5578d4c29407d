"""Sliding-window causal softmax attention: query i sees the keys j with i − w <= j <= i.

    q, k, v = split(x W_qkv + b_qkv);   y_i = softmax_{i−w <= j <= i}(q_i k_jᵀ / sqrt(d_head)) v;
    out = y W_o + b_o

so each query sees w + 1 keys (fewer near the start), as in Zoology's `SlidingAttn`, which masks the keys
j < i − block_size and j > i.

Hyperparameters: `num_heads` = 1 (Zoology's `SlidingAttn` is single-head); `window_size` w = 64
(Zoology's class default `block_size` is 256; its MQAR sweeps, `add_sliding_window` in its experiment
configs, use w ∈ {8, 16, ..., 1024} at d_model 128, paired with a short BaseConv in a `Hybrid`). A window
w >= L − 1 is full causal attention.

`implementation` (default None) as `attention`'s (`ops.attention`): 'xla' masks the l×l logits
(`jax.nn.dot_product_attention`'s `local_window_size`: O(L²) however small w); 'blockwise' computes only
the key blocks within reach of each query block, a band of ⌈w/c⌉ + 1 blocks of c tokens, O(L·w); 'cudnn'
is cuDNN's sliding-window kernel (GPU, bf16 / fp16). None, and which path each call takes (training,
dropout, cache): the table in `zoo_jax.mixers.attention`'s docstring.

`dropout` (default 0, as Zoology's `SlidingAttn(dropout=0.0)`): during training, dropout on the softmax
probabilities as `attention`'s (the l×l probabilities materialised, `attention.dropout_attention` with the
window as a mask; explicit 'blockwise' / 'cudnn' with dropout > 0 are refused).

Differences from Zoology's PyTorch `SlidingAttn` (`zoology/mixers/slide_attn.py`): masked keys get −inf
rather than an additive −10000, so they get exactly zero weight; `num_heads` may be > 1.

State: a shift register of the last min(w + 1, L) keys and values, 2·d·min(w + 1, L) elements per example:
after t tokens its n = min(w + 1, L) slots hold tokens max(t, n) − n .. t − 1 in order (zeros past them
while t < n). The parallel form continues from it (prefill → decode) by attending over those c = min(t, n)
cached keys followed by its own l, and returns the last n of them.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from zoo_jax.mixers import registry
from zoo_jax.mixers._local_attention import LocalAttention, validate_at_least_one
from zoo_jax.mixers.attention import check_implementation, dropout_attention, validate_dropout, validate_implementation
from zoo_jax.ops import attention as attention_ops


@dataclasses.dataclass(frozen=True)
class SlidingWindowConfig:
  num_heads: int = 1
  window_size: int = 64
  implementation: str | None = None  # None | 'xla' | 'cudnn' | 'blockwise' (module docstring)
  dropout: float = 0.0  # on the softmax probabilities, training only

  def validate(self, field: str) -> None:
    validate_implementation(field, self.implementation)
    validate_dropout(field, self.dropout, self.implementation)
    validate_at_least_one(field, num_heads=self.num_heads, window_size=self.window_size)

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    registry.check_heads(field, self.num_heads, d_model)
    if self.window_size > seq_len:  # a window past the sequence is full attention, not what was asked
      raise ValueError(f"{field}.window_size must be <= the sequence length L ({seq_len}), got {self.window_size}")

  def check_dtype(self, field: str, dtype: Any) -> None:
    check_implementation(self.implementation, dtype, field)


@registry.register("sliding_window", hparams=SlidingWindowConfig,
                   state_size_formula="2·d·min(w+1, L) (KV cache of the last w+1 tokens)")
class SlidingWindowAttention(LocalAttention):

  @staticmethod
  def cache_len(cfg: SlidingWindowConfig, seq_len: int) -> int:
    return min(cfg.window_size + 1, seq_len)  # the last w + 1 tokens, in order

  @staticmethod
  def state_size(cfg: SlidingWindowConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    return 2 * d_model * SlidingWindowAttention.cache_len(cfg, seq_len)

  def attend(self, q_blhk: jax.Array, k_blhk: jax.Array, v_blhk: jax.Array,
             dropout_key: jax.Array | None = None) -> jax.Array:
    if dropout_key is not None:
      return dropout_attention(q_blhk, k_blhk, v_blhk, rate=self.dropout_rate, key=dropout_key,
                               window=self.hparams.window_size)
    return attention_ops.causal_attention(q_blhk, k_blhk, v_blhk, window=self.hparams.window_size,
                                          implementation=self.implementation_for(q_blhk.dtype))

  def context_slots(self, t_b: jax.Array) -> jax.Array:
    return jnp.minimum(t_b, self.seq_len)  # every cached token is in the next token's window

  def slots_after(self, c_b: jax.Array, l: int) -> jax.Array:
    """The last n of the c + l filled rows, in order (rows 0 .. n − 1 while fewer are filled)."""
    return jnp.maximum(c_b + l - self.seq_len, 0)[:, None] + jnp.arange(self.seq_len)

  def cache_view(self, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Until the cache is full, token t goes to slot t; from then on the oldest token is shifted out and
    t goes to the last slot, so the n = min(w + 1, L) slots hold tokens t − n + 1 .. t, all in the window."""
    n, t_b = self.seq_len, state["t"]
    full_b11 = (t_b >= n)[:, None, None, None]
    shift = lambda cache_bnhk: jnp.where(full_b11, jnp.roll(cache_bnhk, -1, axis=1), cache_bnhk)
    return dict(k=shift(state["k"]), v=shift(state["v"]), t=jnp.minimum(t_b, n - 1))
