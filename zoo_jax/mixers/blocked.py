"""Blocked causal softmax attention: causal attention inside non-overlapping blocks of b tokens.

    q, k, v = split(x W_qkv + b_qkv);   y_i = softmax_{j <= i, ⌊j/b⌋ = ⌊i/b⌋}(q_i k_jᵀ / sqrt(d_head)) v;
    out = y W_o + b_o

The first token of each block sees only itself; a block never sees the block before it.

Hyperparameters: `num_heads` = 1 (as Zoology's attention baselines), `block_size` b = 64. Zoology has no
non-overlapping block-attention mixer; its nearest relatives are `SlidingAttn` (a window that slides
with the query, here `sliding_window`) and the lucidrains `LocalAttention` inside its NSA mixer (buckets
that also look one bucket back). b = 64 matches `sliding_window`'s default window. b >= L is full causal
attention.

Computed block by block (the sequence padded at the end to a multiple of b, padding discarded), so the
parallel form costs O(L·b·d), not O(L²·d). `implementation` (default None) as `attention`'s
(`ops.attention`) computes the causal attention inside each block: 'xla' its b×b masked logits,
'blockwise' FlashAttention-2 by key blocks (blocks above the diagonal skipped: it matters for b > 128),
'cudnn' cuDNN's kernel (GPU, bf16 / fp16); None and each call's path: the table in
`zoo_jax.mixers.attention`'s docstring. `dropout` (default 0; zoo_jax's, Zoology has no such mixer): during
training, dropout on each block's softmax probabilities as `attention`'s (materialised b×b per block;
explicit 'blockwise' / 'cudnn' with dropout > 0 are refused).

State: the keys and values of the current block, reset (overwritten, masked) at block boundaries:
2·d·min(b, L) elements per example. After t tokens, slot s holds the latest token p < t with p ≡ s (mod b):
slots below t mod b the current block, the rest the block before (masked; zeros in the first block). The
parallel form continues from it (prefill → decode) by running its blocks over the c = t mod b cached keys of
the current block followed by its own l, and returns each slot's latest token.
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
class BlockedConfig:
  num_heads: int = 1
  block_size: int = 64
  implementation: str | None = None  # None | 'xla' | 'cudnn' | 'blockwise' (module docstring)
  dropout: float = 0.0  # on each block's softmax probabilities, training only

  def validate(self, field: str) -> None:
    validate_implementation(field, self.implementation)
    validate_dropout(field, self.dropout, self.implementation)
    validate_at_least_one(field, num_heads=self.num_heads, block_size=self.block_size)

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    registry.check_heads(field, self.num_heads, d_model)
    if seq_len % self.block_size:  # a ragged last block is a smaller attention than the config says
      raise ValueError(f"{field}.block_size must divide the sequence length L ({seq_len}), got {self.block_size}")

  def check_dtype(self, field: str, dtype: Any) -> None:
    check_implementation(self.implementation, dtype, field)


@registry.register("blocked", hparams=BlockedConfig,
                   state_size_formula="2·d·min(b, L) (KV cache of the current block of size b)")
class BlockedAttention(LocalAttention):

  @staticmethod
  def cache_len(cfg: BlockedConfig, seq_len: int) -> int:
    return min(cfg.block_size, seq_len)  # the current block

  @staticmethod
  def state_size(cfg: BlockedConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    return 2 * d_model * BlockedAttention.cache_len(cfg, seq_len)

  def attend(self, q_blhk: jax.Array, k_blhk: jax.Array, v_blhk: jax.Array,
             dropout_key: jax.Array | None = None) -> jax.Array:
    b, l, h, k = q_blhk.shape
    block = min(self.hparams.block_size, l)
    n_blocks = -(-l // block)
    # Padding goes after the last real token, so causal masking keeps it away from every real query.
    pad = ((0, 0), (0, n_blocks * block - l), (0, 0), (0, 0))
    to_blocks = lambda a_blhk: jnp.pad(a_blhk, pad).reshape(b * n_blocks, block, h, k)
    if dropout_key is not None:
      y_blhk = dropout_attention(*map(to_blocks, (q_blhk, k_blhk, v_blhk)), rate=self.dropout_rate,
                                 key=dropout_key)
    else:
      y_blhk = attention_ops.causal_attention(*map(to_blocks, (q_blhk, k_blhk, v_blhk)),
                                              implementation=self.implementation_for(q_blhk.dtype))
    return y_blhk.reshape(b, n_blocks * block, h, k)[:, :l]

  def context_slots(self, t_b: jax.Array) -> jax.Array:
    return t_b % self.hparams.block_size  # the current block's tokens so far

  def slots_after(self, c_b: jax.Array, l: int) -> jax.Array:
    """Slot s: the latest of the c + l filled rows r with r ≡ s (mod b) (the buffer starts a block), or row s
    (the cache's own slot s, untouched) if there is none."""
    s_n, block = jnp.arange(self.seq_len), self.hparams.block_size
    return s_n + block * jnp.maximum((c_b[:, None] + l - 1 - s_n) // block, 0)

  def cache_view(self, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Token t goes to slot t mod b: a new block overwrites the old one from slot 0, and the slots past
    t mod b, still holding the previous block, are masked."""
    return dict(state, t=state["t"] % self.hparams.block_size)
