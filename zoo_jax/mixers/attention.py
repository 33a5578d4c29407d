"""Causal multi-head softmax attention (Vaswani et al. 2017), the paper's reference mixer.

    q, k, v = split(x W_qkv + b_qkv);   y = softmax(q kᵀ / sqrt(d_head) + causal mask) v;   out = y W_o + b_o

Hyperparameters (Zoology's `MHA` defaults): `num_heads` = 1. Zoology's Figure-2 runs pair it with learned
absolute positions, which live in the model (`model.learned_positions`), not here.

`rotary` (default off, so MQAR runs are unchanged) rotates q and k by position before the softmax (RoPE,
Su et al. 2021, eq. 34), as the paper's Pile attention baselines do: for head-dimension pairs
(i, i + d_head/2) and frequencies θ_i = base^(-2i/d_head), (q_i, q_{i+d/2}) at position t becomes
(q_i cos tθ_i − q_{i+d/2} sin tθ_i, q_{i+d/2} cos tθ_i + q_i sin tθ_i); likewise k. This is the half-split
(GPT-NeoX / flash-attn non-interleaved) layout the paper's Pile runs use. No parameters are added.

Differences from Zoology's PyTorch `MHA`: no attention dropout (Zoology's `MHA` takes a `dropout` rate,
which its MQAR attention configs set; zoo_jax trains without dropout everywhere); the softmax is
`jax.nn.dot_product_attention`, which XLA fuses, and on GPU can use cuDNN.

State: the KV cache, 2·d·L elements per example per layer.
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers
from zoo_jax.mixers import registry


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  num_heads: int = 1
  rotary: bool = False  # rotary position embedding on q and k (the paper's Pile runs)
  rotary_base: float = 10000.0

  def validate(self, field: str) -> None:
    if self.num_heads < 1:
      raise ValueError(f"{field}.num_heads must be >= 1, got {self.num_heads}")
    if self.rotary_base <= 1.0:
      raise ValueError(f"{field}.rotary_base must be > 1, got {self.rotary_base}")

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    registry.check_heads(field, self.num_heads, d_model, even=self.rotary)


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
    self.num_heads = cfg.num_heads
    self.rotary = rotary
    self.rotary_base = rotary_base
    self.seq_len = seq_len
    self.d_model = d_model
    self.qkv_proj = layers.linear(d_model, 3 * d_model, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
    self.out_proj = layers.linear(d_model, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                                  std=layers.out_proj_std(n_layers))

  @staticmethod
  def state_size(cfg: AttentionConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    return 2 * d_model * seq_len

  def __call__(self, x_bld: jax.Array) -> jax.Array:
    b, l, d = x_bld.shape
    qkv = self.qkv_proj(x_bld).reshape(b, l, 3, self.num_heads, d // self.num_heads)
    q_blhk, k_blhk, v_blhk = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.rotary:
      positions_bl = jnp.broadcast_to(jnp.arange(l), (b, l))
      q_blhk = apply_rotary(q_blhk, positions_bl, self.rotary_base)
      k_blhk = apply_rotary(k_blhk, positions_bl, self.rotary_base)
    y_blhk = jax.nn.dot_product_attention(q_blhk, k_blhk, v_blhk, is_causal=True)
    return self.out_proj(y_blhk.reshape(b, l, d))

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    """The KV cache for L positions, (b, L, h, d/h) each, and the position."""
    shape = (batch_size, self.seq_len, self.num_heads, self.d_model // self.num_heads)
    return dict(k=jnp.zeros(shape, jnp.float32), v=jnp.zeros(shape, jnp.float32),
                t=jnp.zeros((batch_size,), jnp.int32))

  def step(self, state: dict[str, jax.Array], x_bd: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """One token: append k, v to the cache and attend over the positions filled so far."""
    b, d = x_bd.shape
    qkv = self.qkv_proj(x_bd).astype(jnp.float32).reshape(b, 3, self.num_heads, d // self.num_heads)
    t_b = state["t"]
    if self.rotary:
      qkv = jnp.stack([apply_rotary(qkv[:, None, 0], t_b[:, None], self.rotary_base)[:, 0],
                       apply_rotary(qkv[:, None, 1], t_b[:, None], self.rotary_base)[:, 0], qkv[:, 2]], axis=1)
    put = jax.vmap(lambda cache, t, new: cache.at[t].set(new))
    k_blhk, v_blhk = put(state["k"], t_b, qkv[:, 1]), put(state["v"], t_b, qkv[:, 2])
    mask_1l = jnp.arange(self.seq_len)[None] <= t_b[:, None]
    y_bhk = jax.nn.dot_product_attention(qkv[:, None, 0], k_blhk, v_blhk,
                                         mask=mask_1l[:, None, None, :])[:, 0]
    y_bd = self.out_proj(y_bhk.reshape(b, d).astype(x_bd.dtype))
    return dict(k=k_blhk, v=v_blhk, t=t_b + 1), y_bd
