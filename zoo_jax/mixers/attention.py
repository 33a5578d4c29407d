"""Causal multi-head softmax attention (Vaswani et al. 2017), the paper's reference mixer.

    q, k, v = split(x W_qkv + b_qkv);   y = softmax(q kᵀ / sqrt(d_head) + causal mask) v;   out = y W_o + b_o

Hyperparameters (Zoology's `MHA` defaults): `num_heads` = 1. Zoology's Figure-2 runs pair it with learned
absolute positions, which live in the model (`model.learned_positions`), not here.

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

  def validate(self, field: str) -> None:
    if self.num_heads < 1:
      raise ValueError(f"{field}.num_heads must be >= 1, got {self.num_heads}")


@registry.register("attention", hparams=AttentionConfig, state_size_formula="2·d·L (KV cache)")
class Attention(nnx.Module):

  def __init__(self, cfg: AttentionConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    if d_model % cfg.num_heads:
      raise ValueError(f"model.mixer.num_heads must divide model.d_model ({d_model}), got {cfg.num_heads}")
    self.num_heads = cfg.num_heads
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
    y_blhk = jax.nn.dot_product_attention(q_blhk, k_blhk, v_blhk, is_causal=True)
    return self.out_proj(y_blhk.reshape(b, l, d))
