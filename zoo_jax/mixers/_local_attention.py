"""Shared piece of the local softmax attentions (`sliding_window`, `blocked`): attention whose recurrent
form keeps a fixed number n of KV slots instead of the whole sequence.

Dimension legend: b batch, l sequence length, h heads, k head width, n cache slots.

Both mixers reuse `Attention`'s projections (`qkv_proj`, `out_proj`: Zoology's `Wqkv` and `out_proj`, with
biases) and its recurrent form on an n-slot cache: `Attention.step` writes token t to slot t and attends
to slots 0 .. t. Each subclass maps its own position onto that cache (`cache_view`): the slot the token
goes to, with the slots it may see all below it.
"""

from typing import Any

from flax import nnx
import jax

from zoo_jax.mixers.attention import Attention


def validate_at_least_one(field: str, **values: int) -> None:
  for key, value in values.items():
    if value < 1:
      raise ValueError(f"{field}.{key} must be >= 1, got {value}")


class LocalAttention(Attention):
  """Attention with an n-slot KV cache. Subclasses define `cache_len` (n), `__call__` (the parallel form)
  and `cache_view`."""

  def __init__(self, cfg: Any, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int, dtype: Any,
               rngs: nnx.Rngs):
    super().__init__(cfg, d_model=d_model, seq_len=seq_len, layer_idx=layer_idx, n_layers=n_layers,
                     dtype=dtype, rngs=rngs)
    self.hparams = cfg
    self.seq_len = self.cache_len(cfg, seq_len)  # `Attention`'s cache length: n slots, not L

  @staticmethod
  def cache_len(cfg: Any, seq_len: int) -> int:
    raise NotImplementedError

  def cache_view(self, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The state as `Attention.step` should see it for token t = state['t']: the cache, and the slot
    t' to write, such that slots 0 .. t' hold exactly the keys token t may see."""
    raise NotImplementedError

  def qkv_blhk(self, x_bld: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, l, d = x_bld.shape
    qkv = self.qkv_proj(x_bld).reshape(b, l, 3, self.num_heads, d // self.num_heads)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def step(self, state: dict[str, jax.Array], x_bd: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    cache, y_bd = super().step(self.cache_view(state), x_bd)
    return dict(cache, t=state["t"] + 1), y_bd
