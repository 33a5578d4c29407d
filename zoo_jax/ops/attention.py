"""Causal softmax attention, optionally local (a sliding window), that never holds an l×l array:

    y_i = softmax_{j ∈ S(i)}(q_i k_jᵀ · scale) v_j,   S(i) = {j : i − w <= j <= i}   (w = None: j <= i)

Dimension legend: b batch, l sequence length, h heads, k head width, n blocks, c block length (queries and
keys alike), o block offset (query block i meets key block i − o).

Paths (`implementation`):
  reference  the masked l×l softmax in float32 (the tests' ground truth).
  xla        `jax.nn.dot_product_attention(implementation='xla')`: the path the mixers have always taken
             (l×l logits in float32; a window is a mask on them).
  cudnn      `jax.nn.dot_product_attention(implementation='cudnn')`: GPU only (cuDNN's fused flash kernel,
             bf16 / fp16 inputs); elsewhere a one-line error.
  blockwise  FlashAttention-2 (Dao 2023) in plain JAX, on every backend: the sequence is cut into n blocks
             of c tokens; query blocks never meet the key blocks above the diagonal (causal: n(n+1)/2
             block pairs, not n²) or outside a window. Float32 softmax statistics; the backward
             (`jax.custom_vjp`) recomputes the block scores from the saved log-sum-exp (FlashAttention-2,
             Algorithm 2), so neither pass holds an l×l array. Three static layouts of the same sum:

  rows     full attention over at most `_UNROLLED` blocks (L <= 512 at c = 128): query block i against
           keys 0 .. (i + 1)·c − 1 in one matmul and a one-pass softmax (a Python loop over the n query
           blocks; only the diagonal block is masked). Few, large matmuls, no running rescale; XLA's cost
           analysis counts its FLOPs.
  band     a window w: query block i against the band of m + 1 = ⌈w/c⌉ + 1 key blocks i − m .. i,
           gathered into one (n, b, h, (m + 1)·c, k) array (m zero blocks in front, masked), all n blocks
           in one batched matmul with a one-pass softmax: O(l·w), and the key gradient sums each block's
           m + 1 copies back.
  offsets  full attention over more blocks: by block offset o (query block i against key block i − o, all
           n − o pairs of an offset in one batched matmul) with an online softmax (running max and sum).
           Offsets o and n − o together are exactly n block pairs, so after offset 0 a `lax.fori_loop`
           runs over the pairs (o, n − o) (gathered blocks, scatter-added statistics) and XLA reuses one
           step's buffers for the next: the compiled temporaries grow linearly in l
           (tests/test_attention_blockwise.py). A loop over query blocks would not do here: vmapped, a
           while loop runs every lane to the longest trip count, and unrolled, XLA:CPU keeps every row's
           scores alive (temporaries grow as l², measured).

Inputs (b, l, h, k) in any float dtype; the matmuls take the inputs' dtype with float32 accumulation, the
softmax statistics and accumulators are float32, the output has q's dtype (bf16 in, bf16 out).
"""

import functools
import math

import jax
import jax.numpy as jnp

from zoo_jax.ops import _dispatch

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "blockwise")
# Measured on CPU by experiments/bench_attention.py (README "Kernels and benchmarks"). GPU is unmeasured:
# `default_implementation` picks cuDNN's fused kernel for bf16 / fp16 and blockwise otherwise (cuDNN takes
# no float32). Which path each mixer call takes (training, dropout, cache): zoo_jax/mixers/attention.py.
FASTEST = {"cpu": "blockwise", "gpu": "blockwise", "tpu": "blockwise"}
_MAX_BLOCK = 128
_UNROLLED = 4  # full attention over at most this many blocks: the rows path (temporaries grow as l²)


def default_implementation(dtype=None) -> str:
  """The path `implementation=None` takes on this backend for inputs of `dtype`."""
  if jax.default_backend() == "gpu" and dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return FASTEST.get(jax.default_backend(), "xla")


def resolve(implementation: str | None, dtype=None, field: str = "implementation") -> str:
  """`implementation` checked (None: `default_implementation(dtype)`); a one-line ValueError for an unknown
  name, or for 'cudnn' off GPU."""
  if implementation is None:
    return default_implementation(dtype)
  try:
    impl = _dispatch.resolve("attention", implementation, IMPLEMENTATIONS, FASTEST)
  except ValueError:
    raise ValueError(f"{field} must be one of None, {', '.join(repr(a) for a in IMPLEMENTATIONS)}; "
                     f"got {implementation!r}") from None
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"{field}='cudnn' needs a GPU (cuDNN); this backend is {jax.default_backend()!r}: "
                     f"use 'blockwise' or 'xla'")
  return impl


def block_len(seq_len: int, window: int | None = None) -> int:
  """The block length c of the blockwise path, never longer than the sequence: 128 for full attention
  (measured on CPU: 64 makes the matmuls too small, 256 skips less above the diagonal); for a window w,
  the power of two >= w within [16, 128]: ⌈w/c⌉ + 1 offsets cover it (w = 64: c = 64, 2 offsets, 128 keys
  per query; measured on CPU faster than c = 32 (3 offsets) and c = 128 (2 offsets, 256 keys))."""
  if window is not None and window < seq_len:
    c = max(16, min(_MAX_BLOCK, 1 << math.ceil(math.log2(max(window, 1)))))
  else:
    c = _MAX_BLOCK
  return max(1, min(c, seq_len))


def _check(q, k, v, window):
  if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"attention expects q, k (b, l, h, k) and v (b, l, h, k_v) alike; got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  if window is not None and window < 0:
    raise ValueError(f"attention: window must be >= 0, got {window}")


def causal_attention(q_blhk, k_blhk, v_blhk, *, window: int | None = None, implementation: str | None = None,
                     block: int | None = None):
  """Causal softmax attention with scale 1/sqrt(k); `window` w: query i sees keys i − w .. i (None: 0 .. i).

  `block` sets the blockwise path's block length (default `block_len`)."""
  _check(q_blhk, k_blhk, v_blhk, window)
  impl = resolve(implementation, q_blhk.dtype)
  l = q_blhk.shape[1]
  if window is not None and window >= l - 1:
    window = None  # every causal key is in the window
  if impl == "reference":
    return attention_reference(q_blhk, k_blhk, v_blhk, window=window)
  if impl in ("xla", "cudnn"):
    local = None if window is None else (window, 0)
    return jax.nn.dot_product_attention(q_blhk, k_blhk, v_blhk, is_causal=True, local_window_size=local,
                                        implementation=impl)
  c = block_len(l, window) if block is None else block
  if c < 1:
    raise ValueError(f"attention: block must be >= 1, got {c}")
  return blockwise_attention(q_blhk, k_blhk, v_blhk, window, min(c, l))


def causal_probabilities(q_blhk, k_blhk, *, window: int | None = None):
  """The masked l×l softmax probabilities (b, h, l, l), float32: the definition every path computes (the
  reference below, and attention dropout, which needs them materialised)."""
  l, scale = q_blhk.shape[1], q_blhk.shape[-1] ** -0.5
  f32 = lambda a: a.astype(jnp.float32)
  s_bhij = jnp.einsum("bihk,bjhk->bhij", f32(q_blhk), f32(k_blhk)) * scale
  i, j = jnp.arange(l)[:, None], jnp.arange(l)[None]
  mask_ij = (j <= i) if window is None else (j <= i) & (i - j <= window)
  return jax.nn.softmax(jnp.where(mask_ij, s_bhij, -jnp.inf), axis=-1)


def attention_reference(q_blhk, k_blhk, v_blhk, *, window: int | None = None):
  """The masked l×l softmax, float32 (the definition; tests only)."""
  p_bhij = causal_probabilities(q_blhk, k_blhk, window=window)
  return jnp.einsum("bhij,bjhk->bihk", p_bhij, v_blhk.astype(jnp.float32)).astype(q_blhk.dtype)


# ----- blockwise (FlashAttention-2) -----


def _to_blocks(a_blhk, c, front=0):
  """(b, l, h, k) → (front + n, b, h, c, k): `front` blocks of zeros, then the sequence zero-padded at the
  end to n·c. Blocks lead, so that consecutive blocks are one contiguous slice."""
  b, l, h, k = a_blhk.shape
  n = -(-l // c)
  a_blhk = jnp.pad(a_blhk, ((0, 0), (front * c, n * c - l), (0, 0), (0, 0)))
  return a_blhk.reshape(b, front + n, c, h, k).transpose(1, 0, 3, 2, 4)


def _from_blocks(a_nbhck, l):
  n, b, h, c, k = a_nbhck.shape
  return a_nbhck.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, k)[:, :l]


def _scores(q_ak, k_ek, mask_ae, scale):
  """Scores of queries (..., a, k) against keys (..., e, k) in float32, −inf where `mask_ae` (broadcast;
  None: no mask) is False."""
  s = jnp.einsum("...ak,...ek->...ae", q_ak, k_ek, preferred_element_type=jnp.float32) * scale
  return s if mask_ae is None else jnp.where(mask_ae, s, -jnp.inf)


def _softmax_rows(q_ak, k_ek, v_ek, mask_ae, scale):
  """One-pass softmax attention of queries over keys that all fit in one matmul: the output (q's dtype)
  and each row's log-sum-exp. Every row must see at least one key."""
  s = _scores(q_ak, k_ek, mask_ae, scale)
  m = s.max(-1)
  p = jnp.exp(s - m[..., None])
  s_sum = p.sum(-1)
  pv = jnp.einsum("...ae,...ek->...ak", p.astype(v_ek.dtype), v_ek, preferred_element_type=jnp.float32)
  return (pv / s_sum[..., None]).astype(q_ak.dtype), m + jnp.log(s_sum)


def _grads_rows(q_ak, k_ek, v_ek, dout_ak, lse_a, delta_a, mask_ae, scale):
  """FlashAttention-2's backward for one set of scores: p = exp(s − lse) recomputed; returns the float32
  contributions dq = ds k, dk = dsᵀ q (both without the scale) and dv = pᵀ dO, where
  ds = p ⊙ (dO vᵀ − delta), delta = rowsum(dO ⊙ O)."""
  mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  p = jnp.exp(_scores(q_ak, k_ek, mask_ae, scale) - lse_a[..., None])
  dp = mm("...ak,...ek->...ae", dout_ak, v_ek)
  ds = (p * (dp - delta_a[..., None])).astype(q_ak.dtype)
  return (mm("...ae,...ek->...ak", ds, k_ek), mm("...ae,...ak->...ek", ds, q_ak),
          mm("...ae,...ak->...ek", p.astype(dout_ak.dtype), dout_ak))


def _delta(dout, out):
  return jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)


# The rows path: full attention over at most `_UNROLLED` blocks, layout (b, h, l, k).


def _row_spans(l, c):
  """(start, end) of each query block; its queries see keys 0 .. end − 1 (the diagonal block masked)."""
  return [(r0, min(r0 + c, l)) for r0 in range(0, l, c)]


def _causal_mask(r0, r1):
  """(r1 − r0, r1) bool: may query r0 + a see key e?"""
  return jnp.arange(r1)[None] <= (r0 + jnp.arange(r1 - r0))[:, None]


def _rows_forward(q_bhlk, k_bhlk, v_bhlk, c):
  scale = q_bhlk.shape[-1] ** -0.5
  outs, lses = zip(*(_softmax_rows(q_bhlk[:, :, r0:r1], k_bhlk[:, :, :r1], v_bhlk[:, :, :r1],
                                   _causal_mask(r0, r1), scale)
                     for r0, r1 in _row_spans(q_bhlk.shape[2], c)))
  return jnp.concatenate(outs, 2), jnp.concatenate(lses, 2)


def _rows_backward(q_bhlk, k_bhlk, v_bhlk, out_bhlk, lse_bhl, dout_bhlk, c):
  scale = q_bhlk.shape[-1] ** -0.5
  delta_bhl = _delta(dout_bhlk, out_bhlk)
  dqs, dk, dv = [], jnp.zeros(k_bhlk.shape, jnp.float32), jnp.zeros(v_bhlk.shape, jnp.float32)
  for r0, r1 in _row_spans(q_bhlk.shape[2], c):
    dq_r, dk_r, dv_r = _grads_rows(q_bhlk[:, :, r0:r1], k_bhlk[:, :, :r1], v_bhlk[:, :, :r1],
                                   dout_bhlk[:, :, r0:r1], lse_bhl[:, :, r0:r1], delta_bhl[:, :, r0:r1],
                                   _causal_mask(r0, r1), scale)
    dqs.append(dq_r)
    dk, dv = dk.at[:, :, :r1].add(dk_r), dv.at[:, :, :r1].add(dv_r)
  return jnp.concatenate(dqs, 2) * scale, dk * scale, dv


# The band path: a window w, layout (n, b, h, c, k). Query block i meets the m + 1 = ⌈w/c⌉ + 1 key blocks
# i − m .. i, gathered into one band of (m + 1)·c keys (m zero blocks in front of the sequence).


def _band_mask(n, c, m, window):
  """(n, 1, 1, c, (m + 1)·c) bool: may query a of block i see band key e (position (i − m)·c + e)?"""
  i = jnp.arange(n)[:, None, None]
  query, key = i * c + jnp.arange(c)[:, None], (i - m) * c + jnp.arange((m + 1) * c)
  dist = query - key
  return ((dist >= 0) & (dist <= window) & (key >= 0))[:, None, None]


def _band(a_nbhck, n, m):
  """(m + n, b, h, c, k) blocks → (n, b, h, (m + 1)·c, k): blocks i .. i + m, i.e. positions (i − m)·c on."""
  return jnp.concatenate([a_nbhck[o:o + n] for o in range(m + 1)], axis=3)


def _unband(band_nbhek, m):
  """The transpose of `_band` (m front blocks dropped): each block's m + 1 copies summed."""
  n, b, h, e, k = band_nbhek.shape
  parts = band_nbhek.reshape(n, b, h, m + 1, e // (m + 1), k)
  acc = jnp.zeros((m + n,) + parts[:, :, :, 0].shape[1:], band_nbhek.dtype)
  for o in range(m + 1):
    acc = acc.at[o:o + n].add(parts[:, :, :, o])
  return acc[m:]


def _band_inputs(q_blhk, k_blhk, v_blhk, c, window):
  n, m = -(-q_blhk.shape[1] // c), -(-window // c)
  band = lambda a_blhk: _band(_to_blocks(a_blhk, c, m), n, m)
  return _to_blocks(q_blhk, c), band(k_blhk), band(v_blhk), _band_mask(n, c, m, window), m


# The offsets path: full attention over more than `_UNROLLED` blocks, layout (n, b, h, c, k).


def _pair_index(n, o):
  """Query and key block of each of the n pairs of offsets o and n − o: pairs j < n − o are (o + j, j),
  the rest (j, j − (n − o))."""
  j = jnp.arange(n)
  first = j < n - o
  return jnp.where(first, j + o, j), jnp.where(first, j, j - (n - o))


def _offset_visits(n, c):
  """Static visits (query blocks, key blocks, mask): offset 0 (the diagonal, masked), and offset n/2 when
  n is even; plus the number of paired steps o = 1 .. (n − 1) // 2, each visiting offsets o and n − o
  together (n block pairs) in one `lax.fori_loop`, so that XLA reuses a step's buffers for the next
  (unrolled, XLA:CPU kept every offset's scores alive at once: temporaries grew as l², measured)."""
  static = [(slice(0, n), slice(0, n), _causal_mask(0, c))]
  if n % 2 == 0:
    static.append((slice(n // 2, n), slice(0, n // 2), None))
  return static, (n - 1) // 2


def _offsets_forward(q_nbhck, k_nbhck, v_nbhck):
  """Online softmax over the visits. Offset 0, first, holds every query's own key, so the running max is
  finite from then on. A query block met twice in one paired step is updated by scatter-max, then
  scatter-add."""
  n, b, h, c, dk = q_nbhck.shape
  scale = dk ** -0.5

  def visit(state, qi, ki, mask_cc):
    m, s_sum, acc = state
    s = _scores(q_nbhck[qi], k_nbhck[ki], mask_cc, scale)
    m_new = m.at[qi].max(s.max(-1))
    p = jnp.exp(s - m_new[qi][..., None])
    rescale = jnp.exp(m - m_new)
    pv = jnp.einsum("nbhae,nbhek->nbhak", p.astype(v_nbhck.dtype), v_nbhck[ki],
                    preferred_element_type=jnp.float32)
    return m_new, (s_sum * rescale).at[qi].add(p.sum(-1)), (acc * rescale[..., None]).at[qi].add(pv)

  state = (jnp.full((n, b, h, c), -jnp.inf, jnp.float32), jnp.zeros((n, b, h, c), jnp.float32),
           jnp.zeros(v_nbhck.shape, jnp.float32))
  static, steps = _offset_visits(n, c)
  state = visit(state, *static[0])
  state = jax.lax.fori_loop(1, steps + 1, lambda o, st: visit(st, *_pair_index(n, o), None), state)
  for visit_args in static[1:]:
    state = visit(state, *visit_args)
  m, s_sum, acc = state
  return (acc / s_sum[..., None]).astype(q_nbhck.dtype), m + jnp.log(s_sum)


def _offsets_backward(q, k, v, out, lse, dout):
  n, c = q.shape[0], q.shape[3]
  scale = q.shape[-1] ** -0.5
  delta = _delta(dout, out)

  def visit(grads, qi, ki, mask_cc):
    dq, dk, dv = grads
    dq_, dk_, dv_ = _grads_rows(q[qi], k[ki], v[ki], dout[qi], lse[qi], delta[qi], mask_cc, scale)
    return dq.at[qi].add(dq_), dk.at[ki].add(dk_), dv.at[ki].add(dv_)

  grads = tuple(jnp.zeros(a.shape, jnp.float32) for a in (q, k, v))
  static, steps = _offset_visits(n, c)
  for visit_args in static:
    grads = visit(grads, *visit_args)
  dq, dk, dv = jax.lax.fori_loop(1, steps + 1, lambda o, g: visit(g, *_pair_index(n, o), None), grads)
  return dq * scale, dk * scale, dv


# The three paths behind one custom VJP; the residuals are each path's own layout.


def _path(l, c, window):
  if window is not None:
    return "band"
  return "rows" if -(-l // c) <= _UNROLLED else "offsets"


def _bhlk(a):
  return a.transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q_blhk, k_blhk, v_blhk, window, c):
  return _flash_fwd(q_blhk, k_blhk, v_blhk, window, c)[0]


def _flash_fwd(q_blhk, k_blhk, v_blhk, window, c):
  l = q_blhk.shape[1]
  path = _path(l, c, window)
  if path == "rows":
    q, k, v = _bhlk(q_blhk), _bhlk(k_blhk), _bhlk(v_blhk)
    out, lse = _rows_forward(q, k, v, c)
    return _bhlk(out), (q, k, v, out, lse)
  if path == "band":
    q, k_band, v_band, mask, _ = _band_inputs(q_blhk, k_blhk, v_blhk, c, window)
    out, lse = _softmax_rows(q, k_band, v_band, mask, q_blhk.shape[-1] ** -0.5)
    return _from_blocks(out, l), (q_blhk, k_blhk, v_blhk, out, lse)
  q, k, v = (_to_blocks(a, c) for a in (q_blhk, k_blhk, v_blhk))
  out, lse = _offsets_forward(q, k, v)
  return _from_blocks(out, l), (q, k, v, out, lse)


def _flash_bwd(window, c, residuals, dout_blhk):
  l = dout_blhk.shape[1]
  path = _path(l, c, window)
  if path == "rows":
    grads = map(_bhlk, _rows_backward(*residuals, _bhlk(dout_blhk), c))
  elif path == "band":
    q_blhk, k_blhk, v_blhk, out, lse = residuals
    q, k_band, v_band, mask, m = _band_inputs(q_blhk, k_blhk, v_blhk, c, window)
    scale = q_blhk.shape[-1] ** -0.5
    dout = _to_blocks(dout_blhk, c)
    dq, dk_band, dv_band = _grads_rows(q, k_band, v_band, dout, lse, _delta(dout, out), mask, scale)
    grads = (_from_blocks(g, l) for g in (dq * scale, _unband(dk_band, m) * scale, _unband(dv_band, m)))
  else:
    grads = (_from_blocks(g, l) for g in _offsets_backward(*residuals, _to_blocks(dout_blhk, c)))
  return tuple(g.astype(a.dtype) for g, a in zip(grads, residuals[:3]))


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q_blhk, k_blhk, v_blhk, window: int | None, block: int):
  """The blockwise path (module docstring) with block length `block`."""
  return _flash(q_blhk, k_blhk, v_blhk, window, block)
