"""Input-dependent sparse attention: softmax attention among the positions a selection function picks.

The paper's Section 5 fix for the recall gap: a gated-convolution backbone with a few attention layers
whose attention is restricted to an input-dependent set of positions. With f(u) ∈ {0, 1}^L the selection
and S = the first `budget` (k) positions with f = 1, in order:

    keys='selected' (default):  y_i = softmax_{j ∈ S, j <= i}(q_i k_jᵀ / sqrt(d_head)) v_j   for i ∈ S
    keys='all':                 y_i = softmax_{j <= i}(q_i k_jᵀ / sqrt(d_head)) v_j          for i ∈ S
    y_i = 0 for i ∉ S (the residual stream carries those positions);  out = y W_o + b_o at S

computed by gathering S into k slots (a cumulative sum gives each selected position its slot: O(L)),
attending in slot space and scattering back — never an L×L product. Cost per sequence:
keys='selected' O(L·d + k·d² + k²·d) (the projections run on the k gathered rows only), keys='all'
O(L·d² + k·L·d); both linear in L for a fixed k (tests/test_sparse_attention.py measures it with XLA's
cost analysis). A selected query sees only keys at or before it, and whether position i is selected
depends only on positions <= i, so the mixer is causal.

Selection functions (`selection`):
- `full`: f = 1, plain causal attention over all L positions (the BaseConv + attention hybrid's layer;
  `budget` and `keys` are ignored). Equal to the `attention` mixer with the same parameters.
- `random`: exactly min(k, L) positions uniform without replacement, seeded by `seed` and the
  sequence's first token (so each sequence gets its own set, the same set every time it is seen, and
  position i's selection depends on no token after it).
- `programmatic`: position i is selected when its token u_i occurred earlier in the sequence (the
  candidate AR positions: the token after i may complete a repeated bigram), found with a stable sort of
  the row (O(L log L), no L×L comparison); token ids in `exclude_tokens` are never selected (MQAR's filler
  0 repeats everywhere and would spend the budget); the first k such positions are kept.
- `learned`: a per-token score s_i = x_i w + b (float32); positions with s_i > 0 are selected in order
  until k are taken. The selection is discrete, so the scorer learns through a gate g_i = sigmoid(s_i):
  a selected query's output is scaled by g_i and a key's logit gets log g_j (keys the scorer doubts weigh
  less). The auxiliary sparsity loss `aux_weight · mean_i g_i` (mean over batch and positions) is sown
  as an `nnx.Intermediate` named `aux_loss`; `zoo_jax.train` adds every sown `aux_loss` to the task loss
  and logs it separately as `aux_loss`.

`keys='selected'` is the issue's sparse pattern: the KV cache needs only k slots, state 2·d·k. But a
selection that marks only queries cannot see the keys it must retrieve: `programmatic` selects the second
occurrence of a token, not the position after its first occurrence, where an AR lookup finds its answer.
`keys='all'` (selected queries over every earlier key) keeps the compute linear in L for a fixed k but
needs the whole KV cache, 2·d·L; use it to separate "which queries" from "which keys".

No `implementation` option (attention's `xla` / `cudnn` / `blockwise`, `zoo_jax.mixers.attention`): with
selection='full' the layer is `Attention` with implementation None, so it takes that mixer's table (blockwise
on CPU, no l×l array); the other selections attend over the k gathered slots, a (k, k) score matrix per head
with keys='selected' and (k, L) with keys='all' (L×L only if budget >= L), on `jax.nn.dot_product_attention`'s
XLA path with an additive bias (learned selection's key log-gates) and a per-example mask of empty slots,
which neither the blockwise op nor cuDNN's causal kernel takes. An O(k·L) array is the price of keys='all'
whatever the kernel; the budget, not an implementation, bounds it.

`random` and `programmatic` read token ids: the model passes `tokens=` to mixers whose `uses_tokens` is
true (`zoo_jax.model.Block`).

Differences from the paper. The paper's learned selection takes the top-k scores of a sequence; a
sequence-wide top-k is not causal (a later, higher score would evict an earlier position whose output
was already produced), so zoo_jax takes positions above a threshold (s > 0) in order until the budget is
spent, the causal counterpart. Zoology's repository has no sparse-attention code; the gate and the
sparsity loss (the mean gate, an L1 penalty on the soft selection) are our choices where the paper gives
no formula.

State: the KV cache, 2·d·L for full; 2·d·min(k, L) with keys='selected' and 2·d·L with keys='all', plus one
log-gate per cached key for learned selection ((2·d + 1)·min(k, L) or (2·d + 1)·L). Recurrent form
(`init_state` / `step`) for full and learned selections; random and programmatic selections read token ids,
which a step does not take, so they have neither a state nor a parallel form that continues from one.

Prefill → decode (full and learned): given a state, the parallel form continues after its t positions and
n selected ones. full: `Attention`'s KV cache. learned: of the l new positions, the first k − n with s > 0
are selected (slots n, n + 1, ... with keys='selected'; with keys='all' every new key and its log-gate go to
slots t .. t + l − 1); their keys and values are projected in parallel and written into the cache, and the
selected queries attend over the cache's filled slots at or before their own.
"""

import dataclasses
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp

from zoo_jax import layers
from zoo_jax.mixers import registry
from zoo_jax.mixers.attention import Attention, apply_rotary

SELECTIONS = ("full", "random", "programmatic", "learned")
KEYS = ("selected", "all")


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
  selection: str = "learned"
  budget: int = 64  # k: at most this many selected positions per sequence
  keys: str = "selected"
  num_heads: int = 1
  seed: int = 0  # random selection
  exclude_tokens: tuple[int, ...] = ()  # programmatic selection never selects these token ids
  aux_weight: float = 0.01  # learned selection: weight of the sparsity loss (0 disables it)
  rotary: bool = False
  rotary_base: float = 10000.0

  def validate(self, field: str) -> None:
    if self.selection not in SELECTIONS:
      raise ValueError(f"{field}.selection must be one of {SELECTIONS}, got {self.selection!r}")
    if self.keys not in KEYS:
      raise ValueError(f"{field}.keys must be one of {KEYS}, got {self.keys!r}")
    if self.budget < 1:
      raise ValueError(f"{field}.budget must be >= 1, got {self.budget}")
    if self.num_heads < 1:
      raise ValueError(f"{field}.num_heads must be >= 1, got {self.num_heads}")
    if self.aux_weight < 0:
      raise ValueError(f"{field}.aux_weight must be >= 0, got {self.aux_weight}")
    if any(t < 0 for t in self.exclude_tokens):
      raise ValueError(f"{field}.exclude_tokens must be token ids >= 0, got {list(self.exclude_tokens)}")
    if self.rotary_base <= 1.0:
      raise ValueError(f"{field}.rotary_base must be > 1, got {self.rotary_base}")

  def check_shapes(self, field: str, *, d_model: int, seq_len: int, layer_idx: int) -> None:
    registry.check_heads(field, self.num_heads, d_model, even=self.rotary)


# ------------------------------------------------------------------------------- selection functions


def select_programmatic(tokens_bl: jax.Array, exclude_tokens=()) -> jax.Array:
  """(b, l) bool: u_i occurred at some j < i (and is not excluded). A stable sort groups equal tokens in
  position order; every member of a group but the first is a repeat."""
  b, l = tokens_bl.shape
  order_bl = jnp.argsort(tokens_bl, axis=1, stable=True)
  sorted_bl = jnp.take_along_axis(tokens_bl, order_bl, axis=1)
  repeat_sorted_bl = jnp.concatenate(
      [jnp.zeros((b, 1), bool), sorted_bl[:, 1:] == sorted_bl[:, :-1]], axis=1)
  selected_bl = jnp.zeros((b, l), bool).at[jnp.arange(b)[:, None], order_bl].set(repeat_sorted_bl)
  for token in exclude_tokens:
    selected_bl &= tokens_bl != token
  return selected_bl


def select_random(tokens_bl: jax.Array, budget: int, seed: int) -> jax.Array:
  """(b, l) bool with exactly min(budget, l) True per row, uniform without replacement; the row's key is
  `seed` folded with the row's first token."""
  b, l = tokens_bl.shape
  keys_b = jax.vmap(lambda t: jax.random.fold_in(jax.random.key(seed), t))(tokens_bl[:, 0].astype(jnp.uint32))
  scores_bl = jax.vmap(lambda key: jax.random.uniform(key, (l,)))(keys_b)
  _, idx_bk = jax.lax.top_k(scores_bl, min(budget, l))
  return jnp.zeros((b, l), bool).at[jnp.arange(b)[:, None], idx_bk].set(True)


def first_k(selected_bl: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The first k selected positions of each row, ascending: (positions (b, k) int32, valid (b, k) bool).
  Empty slots hold l, an out-of-range index that the scatter back drops. O(l): a cumulative sum."""
  b, l = selected_bl.shape
  slot_bl = jnp.cumsum(selected_bl, axis=1, dtype=jnp.int32) - 1
  keep_bl = selected_bl & (slot_bl < k)
  positions_bk = jnp.full((b, k), l, jnp.int32).at[jnp.arange(b)[:, None], jnp.where(keep_bl, slot_bl, k)].set(
      jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)), mode="drop")
  return positions_bk, positions_bk < l


# ------------------------------------------------------------------------------------------- mixer


@registry.register("sparse_attention", hparams=SparseAttentionConfig,
                   state_size_formula="2·d·L (full); (2·d + [learned])·min(k, L) (keys='selected') or ·L (keys='all')")
class SparseAttention(Attention):

  def __init__(self, cfg: SparseAttentionConfig, *, d_model: int, seq_len: int, layer_idx: int, n_layers: int,
               dtype: Any, rngs: nnx.Rngs):
    super().__init__(cfg, d_model=d_model, seq_len=seq_len, layer_idx=layer_idx, n_layers=n_layers,
                     dtype=dtype, rngs=rngs)
    self.cfg = cfg
    self.uses_tokens = cfg.selection in ("random", "programmatic")
    self.scorer = layers.linear(d_model, 1, axes=("embed", None), rngs=rngs, dtype=jnp.float32) \
        if cfg.selection == "learned" else None
    if self.uses_tokens:  # no recurrent form: a step takes no token ids (tests skip a mixer without step)
      self.init_state = self.step = None

  @staticmethod
  def state_size(cfg: SparseAttentionConfig, d_model: int, seq_len: int, layer_idx: int) -> int:
    if cfg.selection == "full":
      return 2 * d_model * seq_len
    slots = seq_len if cfg.keys == "all" else min(cfg.budget, seq_len)
    return (2 * d_model + (cfg.selection == "learned")) * slots  # learned: each key's gate too

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    """The recurrent form's state (full and learned selections; random and programmatic read token ids,
    which `step` does not take). full: Attention's KV cache of L positions. learned: a KV cache of
    min(k, L) slots (keys='selected') or L (keys='all'), each key's log-gate, the number of selected
    positions n and the position t."""
    cfg = self.cfg
    if cfg.selection == "full":
      return super().init_state(batch_size)
    slots = self.seq_len if cfg.keys == "all" else min(cfg.budget, self.seq_len)
    shape = (batch_size, slots, self.num_heads, self.d_model // self.num_heads)
    return dict(k=jnp.zeros(shape, jnp.float32), v=jnp.zeros(shape, jnp.float32),
                key_log_gate=jnp.zeros((batch_size, slots), jnp.float32),
                n=jnp.zeros((batch_size,), jnp.int32), t=jnp.zeros((batch_size,), jnp.int32))

  def step(self, state: dict[str, jax.Array], x_bd: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """One token. learned: score it; if s > 0 and fewer than k are selected, it is selected: with
    keys='selected' its key and value enter slot n (keys='all' writes every token at slot t, its gate
    with it) and it attends over the filled slots; an unselected token outputs 0."""
    cfg = self.cfg
    if cfg.selection == "full":
      return super().step(state, x_bd)
    b, d = x_bd.shape
    score_b = self.scorer(x_bd.astype(jnp.float32))[:, 0]
    n_b, t_b = state["n"], state["t"]
    budget = min(cfg.budget, self.seq_len)
    selected_b = (score_b > 0) & (n_b < budget)
    q_bhe, k_bhe, v_bhe = (a[:, 0].astype(jnp.float32) for a in self._split_heads(self.qkv_proj(x_bd)[:, None]))
    if self.rotary:
      q_bhe, k_bhe = (apply_rotary(a[:, None], t_b[:, None], self.rotary_base)[:, 0] for a in (q_bhe, k_bhe))
    slot_b = t_b if cfg.keys == "all" else jnp.minimum(n_b, budget - 1)
    write_b = jnp.ones_like(selected_b) if cfg.keys == "all" else selected_b
    put = jax.vmap(lambda cache, i, new, w: cache.at[i].set(jnp.where(w, new, cache[i])))
    k_cache, v_cache = put(state["k"], slot_b, k_bhe, write_b), put(state["v"], slot_b, v_bhe, write_b)
    log_gate_b = jax.nn.log_sigmoid(score_b)
    key_log_gate = put(state["key_log_gate"], slot_b, log_gate_b, write_b)
    filled_b = t_b + 1 if cfg.keys == "all" else n_b + selected_b
    mask_bs = jnp.arange(k_cache.shape[1])[None] < jnp.maximum(filled_b, 1)[:, None]
    y_bhe = jax.nn.dot_product_attention(q_bhe[:, None], k_cache, v_cache, bias=key_log_gate[:, None, None, :],
                                         mask=mask_bs[:, None, None, :])[:, 0]
    y_bd = (y_bhe.reshape(b, d) * jax.nn.sigmoid(score_b)[:, None]).astype(x_bd.dtype)
    out_bd = jnp.where(selected_b[:, None], self.out_proj(y_bd), 0)
    return dict(k=k_cache, v=v_cache, key_log_gate=key_log_gate, n=n_b + selected_b, t=t_b + 1), out_bd

  def selection(self, x_bld: jax.Array, tokens_bl: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """(f(u) (b, l) bool, learned scores (b, l) float32 or None)."""
    cfg = self.cfg
    if cfg.selection in ("random", "programmatic") and tokens_bl is None:
      raise ValueError(f"sparse_attention with selection={cfg.selection!r} needs the token ids (tokens=...)")
    if cfg.selection == "random":
      return select_random(tokens_bl, cfg.budget, cfg.seed), None
    if cfg.selection == "programmatic":
      return select_programmatic(tokens_bl, cfg.exclude_tokens), None
    score_bl = self.scorer(x_bld.astype(jnp.float32))[..., 0]
    return score_bl > 0, score_bl

  def selected_positions(self, x_bld: jax.Array, tokens_bl: jax.Array | None = None) -> jax.Array:
    """(b, l) bool: the positions this layer outputs at (the first k selected); all of them for `full`."""
    if self.cfg.selection == "full":
      return jnp.ones(x_bld.shape[:2], bool)
    b, l, _ = x_bld.shape
    positions_bk, valid_bk = first_k(self.selection(x_bld, tokens_bl)[0], min(self.cfg.budget, l))
    return jnp.zeros((b, l), bool).at[jnp.arange(b)[:, None], positions_bk].set(valid_bk, mode="drop")

  def _split_heads(self, qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v (b, n, h, e) of `qkv_proj`'s output (b, n, 3, h, e)."""
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def __call__(self, x_bld: jax.Array, tokens_bl: jax.Array | None = None,
               state: dict[str, jax.Array] | None = None,
               return_state: bool = False) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Sparse attention over x (module docstring); with `state`, continuing after the positions it has seen;
    with `return_state`, also the state after x (full and learned selections)."""
    cfg = self.cfg
    if cfg.selection == "full":
      return super().__call__(x_bld, state=state, return_state=return_state)
    b, l, d = x_bld.shape
    if state is not None or return_state:
      if self.uses_tokens:
        raise ValueError(f"sparse_attention with selection={cfg.selection!r} has no recurrent state (it reads "
                         "token ids, which a step does not take): call it without state= and return_state=")
      state, y_bld = self.continue_learned(self.init_state(b) if state is None else state, x_bld)
      return (y_bld, state) if return_state else y_bld
    k = min(cfg.budget, l)
    selected_bl, score_bl = self.selection(x_bld, tokens_bl)
    positions_bk, valid_bk = first_k(selected_bl, k)
    safe_bk = jnp.minimum(positions_bk, l - 1)  # empty slots read the last row; their output is dropped
    rows_b1 = jnp.arange(b)[:, None]

    gate_bl = None if score_bl is None else jax.nn.sigmoid(score_bl)
    if cfg.keys == "selected":
      # Project only the k gathered rows. Slots are in position order: slot i sees slots j <= i that hold a
      # position. An empty slot sees itself only (a defined softmax; its output is dropped).
      key_positions_bs = safe_bk
      q_bkhe, keys_bshe, values_bshe = self._split_heads(self.qkv_proj(x_bld[rows_b1, safe_bk]))
      eye_kk = jnp.eye(k, dtype=bool)
      mask_b1kk = ((jnp.tril(jnp.ones((k, k), bool)) & valid_bk[:, None, :]) | eye_kk)[:, None]
      key_log_gate_bs = None if score_bl is None else jax.nn.log_sigmoid(score_bl[rows_b1, safe_bk])
    else:
      # Every position is a key: project all L rows once and gather the queries from them.
      key_positions_bs = jnp.broadcast_to(jnp.arange(l), (b, l))
      q_blhe, keys_bshe, values_bshe = self._split_heads(self.qkv_proj(x_bld))
      q_bkhe = q_blhe[rows_b1, safe_bk]
      key_positions_s = jnp.arange(l)
      mask_b1kk = ((key_positions_s[None, None, :] <= safe_bk[:, :, None])
                   | (~valid_bk[:, :, None] & (key_positions_s == 0)))[:, None]
      key_log_gate_bs = None if score_bl is None else jax.nn.log_sigmoid(score_bl)
    if self.rotary:
      q_bkhe = apply_rotary(q_bkhe, safe_bk, self.rotary_base)
      keys_bshe = apply_rotary(keys_bshe, key_positions_bs, self.rotary_base)
    bias = None if key_log_gate_bs is None else key_log_gate_bs[:, None, None, :].astype(q_bkhe.dtype)
    y_bkhe = jax.nn.dot_product_attention(q_bkhe, keys_bshe, values_bshe, bias=bias, mask=mask_b1kk)
    y_bkd = y_bkhe.reshape(b, k, d)
    if gate_bl is not None:
      y_bkd = y_bkd * gate_bl[rows_b1, safe_bk][..., None].astype(y_bkd.dtype)
      if cfg.aux_weight > 0:
        try:
          self.sow(nnx.Intermediate, registry.AUX_LOSS, cfg.aux_weight * jnp.mean(gate_bl))
        except flax.errors.TraceContextError:
          # Called under a transform that closed over the module (e.g. `jax.jit(lambda x: model(x))`), where
          # NNX forbids mutating it: nothing can collect the loss there. Training merges the model inside its
          # step (zoo_jax.trainer.loss_and_metrics), where the sow works.
          pass
    out_bkd = self.out_proj(y_bkd)
    return jnp.zeros((b, l, d), out_bkd.dtype).at[rows_b1, positions_bk].set(out_bkd, mode="drop")

  def continue_learned(self, state: dict[str, jax.Array],
                       x_bld: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """Learned selection over l tokens after the state's t tokens, n of them selected (module docstring): the
    first k − n new positions with s > 0 are selected; all in parallel, in float32 as the cache is. Inference:
    no auxiliary loss is sown (as in `step`)."""
    cfg = self.cfg
    b, l, d = x_bld.shape
    budget = min(cfg.budget, self.seq_len)
    n_b, t_b = state["n"], state["t"]
    score_bl = self.scorer(x_bld.astype(jnp.float32))[..., 0]
    positive_bl = score_bl > 0
    selected_bl = positive_bl & (n_b[:, None] + jnp.cumsum(positive_bl, axis=1) <= budget)
    positions_bk, valid_bk = first_k(selected_bl, min(budget, l))
    safe_bk = jnp.minimum(positions_bk, l - 1)  # empty slots read the last row; their output is dropped
    rows_b1 = jnp.arange(b)[:, None]
    log_gate_bl = jax.nn.log_sigmoid(score_bl)
    # j: the new keys, one per selected position (keys='selected') or one per position (keys='all').
    if cfg.keys == "selected":
      # New keys only at the selected positions: the j-th goes to slot n + j (an empty one nowhere).
      q_bkhe, k_bjhe, v_bjhe = self._split_heads(self.qkv_proj(x_bld[rows_b1, safe_bk]).astype(jnp.float32))
      key_positions_bj = t_b[:, None] + safe_bk
      slots_bk = jnp.where(valid_bk, n_b[:, None] + jnp.arange(positions_bk.shape[1]), budget)
      log_gate_bj = log_gate_bl[rows_b1, safe_bk]
      put = lambda cache, new: cache.at[rows_b1, slots_bk].set(new, mode="drop")
      query_slots_bk = n_b[:, None] + jnp.arange(positions_bk.shape[1])
    else:
      # Every new position is a key, at slots t .. t + l − 1; the queries are gathered from the projected rows.
      q_blhe, k_bjhe, v_bjhe = self._split_heads(self.qkv_proj(x_bld).astype(jnp.float32))
      q_bkhe = q_blhe[rows_b1, safe_bk]
      key_positions_bj = t_b[:, None] + jnp.arange(l)
      log_gate_bj = log_gate_bl
      put_row = jax.vmap(lambda cache, new, t: jax.lax.dynamic_update_slice_in_dim(cache, new, t, 0))
      put = lambda cache, new: put_row(cache, new, t_b)
      query_slots_bk = t_b[:, None] + safe_bk
    if self.rotary:
      q_bkhe = apply_rotary(q_bkhe, t_b[:, None] + safe_bk, self.rotary_base)
      k_bjhe = apply_rotary(k_bjhe, key_positions_bj, self.rotary_base)
    k_cache, v_cache = put(state["k"], k_bjhe), put(state["v"], v_bjhe)
    key_log_gate = put(state["key_log_gate"], log_gate_bj)
    # A query sees the filled slots up to its own (slot 0 at least: an empty query's softmax stays defined).
    mask_bks = jnp.arange(k_cache.shape[1]) <= query_slots_bk[..., None]
    y_bkhe = jax.nn.dot_product_attention(q_bkhe, k_cache, v_cache, bias=key_log_gate[:, None, None, :],
                                         mask=mask_bks[:, None])
    gate_bk = jax.nn.sigmoid(score_bl)[rows_b1, safe_bk]
    y_bkd = (y_bkhe.reshape(b, -1, d) * gate_bk[..., None]).astype(x_bld.dtype)
    out_bkd = self.out_proj(y_bkd)
    y_bld = jnp.zeros((b, l, d), out_bkd.dtype).at[rows_b1, positions_bk].set(out_bkd, mode="drop")
    n_b = n_b + jnp.sum(selected_bl, axis=1, dtype=jnp.int32)
    return dict(k=k_cache, v=v_cache, key_log_gate=key_log_gate, n=n_b, t=t_b + l), y_bld
