"""Shared piece of the local softmax attentions (`sliding_window`, `blocked`): attention whose recurrent
form keeps a fixed number n of KV slots instead of the whole sequence.

Dimension legend: b batch, l sequence length, h heads, k head width, n cache slots, m = n + l buffer rows.

Both mixers reuse `Attention`'s projections (`qkv_proj`, `out_proj`: Zoology's `Wqkv` and `out_proj`, with
biases) and its recurrent form on an n-slot cache: `Attention.step` writes token t to slot t and attends
to slots 0 .. t. Each subclass maps its own position onto that cache (`cache_view`): the slot the token
goes to, with the slots it may see all below it.

The parallel form continues from a state (prefill → decode) on a buffer of n + l rows: the first c cache
slots (`context_slots`: the keys the next token may still see, in position order, starting at a window or
block start), then the l new tokens, then whatever the cache held past c (after every new query, so the
causal mask hides it). The subclass's own parallel attention (`attend`) runs on the buffer; the outputs are
rows c .. c + l − 1, and the next cache is n rows gathered from the buffer (`slots_after`).
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax.mixers.attention import Attention


def validate_at_least_one(field: str, **values: int) -> None:
  for key, value in values.items():
    if value < 1:
      raise ValueError(f"{field}.{key} must be >= 1, got {value}")


class LocalAttention(Attention):
  """Attention with an n-slot KV cache. Subclasses define `cache_len` (n), `attend` (the parallel form),
  `cache_view` (the recurrent form), `context_slots` and `slots_after` (the parallel form from a state)."""

  def __init__(self, cfg: Any, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int, dtype: Any,
               rngs: nnx.Rngs):
    super().__init__(cfg, d_model=d_model, seq_len=seq_len, layer_idx=layer_idx, n_layers=n_layers,
                     dtype=dtype, rngs=rngs)
    self.hparams = cfg
    self.seq_len = self.cache_len(cfg, seq_len)  # `Attention`'s cache length: n slots, not L

  @staticmethod
  def cache_len(cfg: Any, seq_len: int) -> int:
    raise NotImplementedError

  def attend(self, q_blhk: jax.Array, k_blhk: jax.Array, v_blhk: jax.Array,
             dropout_key: jax.Array | None = None) -> jax.Array:
    """The mixer's attention (b, l, h, k) over a sequence that starts at a block boundary; with
    `dropout_key` (training, dropout > 0) dropout on its probabilities (`attention.dropout_attention`)."""
    raise NotImplementedError

  def context_slots(self, t_b: jax.Array) -> jax.Array:
    """(b,) int: c, the number of leading cache slots, after t tokens, that the next tokens may still see."""
    raise NotImplementedError

  def slots_after(self, c_b: jax.Array, l: int) -> jax.Array:
    """(b, n) int: the buffer row each cache slot holds after l tokens continue c context slots."""
    raise NotImplementedError

  def cache_view(self, state: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The state as `Attention.step` should see it for token t = state['t']: the cache, and the slot
    t' to write, such that slots 0 .. t' hold exactly the keys token t may see."""
    raise NotImplementedError

  def qkv_blhk(self, x_bld: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    qkv = self.qkv_proj(x_bld)  # (b, l, 3, h, d/h)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def __call__(self, x_bld: jax.Array, state: dict[str, jax.Array] | None = None,
               return_state: bool = False, dropout_key: jax.Array | None = None,
               ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Local attention over x; with `state`, continuing from its cache (module docstring); with
    `return_state`, also the cache after x. `dropout_key` (training): dropout on the probabilities."""
    b, l, d = x_bld.shape
    if state is None and not return_state:
      key = dropout_key if self.drops(dropout_key) else None
      return self.out_proj(self.attend(*self.qkv_blhk(x_bld), dropout_key=key).reshape(b, l, d))
    state = self.init_state(b) if state is None else state
    c_b = self.context_slots(state["t"])
    # In float32, as the cache and the recurrent form are.
    q_blhk, k_blhk, v_blhk = (a.astype(jnp.float32) for a in self.qkv_blhk(x_bld))
    place = jax.vmap(lambda buf_mhk, new_lhk, c: jax.lax.dynamic_update_slice_in_dim(buf_mhk, new_lhk, c, 0))
    pad = lambda a_bnhk: jnp.pad(a_bnhk, ((0, 0), (0, l), (0, 0), (0, 0)))
    q_bmhk = place(jnp.zeros_like(pad(state["k"])), q_blhk, c_b)  # the cache rows' queries are never read
    k_bmhk, v_bmhk = place(pad(state["k"]), k_blhk, c_b), place(pad(state["v"]), v_blhk, c_b)
    y_bmhk = self.attend(q_bmhk, k_bmhk, v_bmhk)
    y_blhk = jax.vmap(lambda y_mhk, c: jax.lax.dynamic_slice_in_dim(y_mhk, c, l, 0))(y_bmhk, c_b)
    y_bld = self.out_proj(y_blhk.reshape(b, l, d).astype(x_bld.dtype))
    if not return_state:
      return y_bld
    rows_bn = self.slots_after(c_b, l)
    gather = jax.vmap(lambda buf_mhk, rows_n: buf_mhk[rows_n])
    return y_bld, dict(k=gather(k_bmhk, rows_bn), v=gather(v_bmhk, rows_bn), t=state["t"] + l)

  def step(self, state: dict[str, jax.Array], x_bd: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    cache, y_bd = super().step(self.cache_view(state), x_bd)
    return dict(cache, t=state["t"] + 1), y_bd
