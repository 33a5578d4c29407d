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
             of c tokens (padded at the end); for each block offset o = 0, 1, ... (query block i against
             key block i − o, all n − o pairs of an offset in one batched matmul), an online softmax with
             float32 running max and sum. Offsets past the diagonal are never computed (causal: n(n+1)/2
             block pairs, not n²), and a window w stops at offset ⌈w/c⌉, so local attention costs
             O(l·w), not O(l²). The backward (`jax.custom_vjp`) recomputes each offset's block scores from
             the saved log-sum-exp (FlashAttention-2, Algorithm 2), so the gradient holds no l×l array
             either: only per-offset (n − o, c, c) scores.

Block offsets, not a per-query-block loop: a loop over query blocks whose key loop stops at the diagonal
skips nothing once it is vmapped (a batched while loop runs every lane to the longest trip count), and
run sequentially it leaves each matmul small. One batched matmul per offset skips the masked blocks and
keeps the matmuls large. Offsets o and n − o together are exactly n block pairs, so full attention over
more than 4 blocks runs offset 0, then a `lax.fori_loop` over the pairs (o, n − o) (gathered blocks,
scatter-added statistics), so that XLA reuses one step's buffers for the next: the compiled temporaries
grow linearly in l (tests/test_attention_blockwise.py). A window's few offsets are unrolled.

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
# no float32).
FASTEST = {"cpu": "blockwise", "gpu": "blockwise", "tpu": "blockwise"}
_MAX_BLOCK = 128
_UNROLLED = 4  # full attention over at most this many blocks: every offset unrolled (faster at L 512)


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


def attention_reference(q_blhk, k_blhk, v_blhk, *, window: int | None = None):
  """The masked l×l softmax, float32 (the definition; tests only)."""
  l, scale = q_blhk.shape[1], q_blhk.shape[-1] ** -0.5
  f32 = lambda a: a.astype(jnp.float32)
  s_bhij = jnp.einsum("bihk,bjhk->bhij", f32(q_blhk), f32(k_blhk)) * scale
  i, j = jnp.arange(l)[:, None], jnp.arange(l)[None]
  mask_ij = (j <= i) if window is None else (j <= i) & (i - j <= window)
  p_bhij = jax.nn.softmax(jnp.where(mask_ij, s_bhij, -jnp.inf), axis=-1)
  return jnp.einsum("bhij,bjhk->bihk", p_bhij, f32(v_blhk)).astype(q_blhk.dtype)


# ----- blockwise (FlashAttention-2 by block offsets) -----


def _to_blocks(a_blhk, c):
  """(b, l, h, k) → (n, b, h, c, k), zero-padded at the end to n·c. Blocks lead, so that an offset's
  n − o query or key blocks are one contiguous slice."""
  b, l, h, k = a_blhk.shape
  n = -(-l // c)
  a_blhk = jnp.pad(a_blhk, ((0, 0), (0, n * c - l), (0, 0), (0, 0)))
  return a_blhk.reshape(b, n, c, h, k).transpose(1, 0, 3, 2, 4)


def _from_blocks(a_nbhck, l):
  n, b, h, c, k = a_nbhck.shape
  return a_nbhck.transpose(1, 0, 3, 2, 4).reshape(b, n * c, h, k)[:, :l]


def _mask_cc(o, c, window):
  """(c, c) bool: may query row a of block i see key row e of block i − o? Their distance is o·c + a − e.
  Padding needs no mask: padded keys come after every real query."""
  dist_cc = o * c + jnp.arange(c)[:, None] - jnp.arange(c)[None]
  visible = dist_cc >= 0
  return visible if window is None else visible & (dist_cc <= window)


def _visits(n, c, window):
  """The block pairs to compute: a list of static visits (o, mask): offset o's n − o pairs, query blocks
  o .. n − 1 against key blocks 0 .. n − 1 − o, with the (c, c) mask where one is needed (on the diagonal,
  past the window: the blocks strictly below the diagonal of full attention need none); and a number of
  paired steps: full attention over more than `_UNROLLED` blocks visits offsets o and n − o together, n
  pairs a step for o = 1 .. steps, in one `lax.fori_loop`, so that XLA reuses a step's buffers for the next
  (unrolled, XLA:CPU kept every offset's scores alive at once: temporaries grew as l², measured). A window
  has ⌈w/c⌉ + 1 offsets, all static."""
  if window is not None:
    offsets = range(min(n, -(-window // c) + 1))
    return [(o, _mask_cc(o, c, window) if o == 0 or o * c + c - 1 > window else None) for o in offsets], 0
  if n <= _UNROLLED:
    return [(o, _mask_cc(0, c, None) if o == 0 else None) for o in range(n)], 0
  return [(0, _mask_cc(0, c, None))] + ([(n // 2, None)] if n % 2 == 0 else []), (n - 1) // 2


def _pair_index(n, o):
  """Query and key block of each of the n pairs of offsets o and n − o: pairs j < n − o are (o + j, j),
  the rest (j, j − (n − o))."""
  j = jnp.arange(n)
  first = j < n - o
  return jnp.where(first, j + o, j), jnp.where(first, j, j - (n - o))


def _offset_index(n, o):
  return slice(o, n), slice(0, n - o)


def _scores(q_nbhck, k_nbhck, mask_cc, scale):
  s = jnp.einsum("nbhak,nbhek->nbhae", q_nbhck, k_nbhck, preferred_element_type=jnp.float32) * scale
  return s if mask_cc is None else jnp.where(mask_cc, s, -jnp.inf)


def _forward(q_nbhck, k_nbhck, v_nbhck, window):
  """Online softmax over the visits. Offset 0, first, holds every query's own key, so the running max is
  finite from then on and a row with no visible key in a later pair adds exp(−inf) = 0. A query block
  met twice in one paired step is updated by scatter-max, then scatter-add."""
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
  static, steps = _visits(n, c, window)
  state = visit(state, *_offset_index(n, static[0][0]), static[0][1])
  if steps:
    state = jax.lax.fori_loop(1, steps + 1, lambda o, st: visit(st, *_pair_index(n, o), None), state)
  for o, mask_cc in static[1:]:
    state = visit(state, *_offset_index(n, o), mask_cc)
  m, s_sum, acc = state
  return (acc / s_sum[..., None]).astype(q_nbhck.dtype), m + jnp.log(s_sum)  # the output, each row's lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q_nbhck, k_nbhck, v_nbhck, window):
  return _forward(q_nbhck, k_nbhck, v_nbhck, window)[0]


def _flash_fwd(q_nbhck, k_nbhck, v_nbhck, window):
  out, lse = _forward(q_nbhck, k_nbhck, v_nbhck, window)
  return out, (q_nbhck, k_nbhck, v_nbhck, out, lse)


def _flash_bwd(window, residuals, dout_nbhck):
  """FlashAttention-2's backward over the same visits: p = exp(s − lse) recomputed per pair,
  dv += pᵀ dO, ds = p ⊙ (dO vᵀ − rowsum(dO ⊙ O)), dq += ds k · scale, dk += dsᵀ q · scale."""
  q, k, v, out, lse = residuals
  n, c, dk = q.shape[0], q.shape[3], q.shape[4]
  scale = dk ** -0.5
  mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  delta = jnp.sum(dout_nbhck.astype(jnp.float32) * out.astype(jnp.float32), -1)  # (n, b, h, c)

  def visit(grads, qi, ki, mask_cc):
    dq, dk_, dv = grads
    q_g, k_g, do = q[qi], k[ki], dout_nbhck[qi]
    p = jnp.exp(_scores(q_g, k_g, mask_cc, scale) - lse[qi][..., None])
    dp = mm("nbhak,nbhek->nbhae", do, v[ki])
    ds = (p * (dp - delta[qi][..., None])).astype(q.dtype)
    return (dq.at[qi].add(mm("nbhae,nbhek->nbhak", ds, k_g)),
            dk_.at[ki].add(mm("nbhae,nbhak->nbhek", ds, q_g)),
            dv.at[ki].add(mm("nbhae,nbhak->nbhek", p.astype(do.dtype), do)))

  grads = tuple(jnp.zeros(a.shape, jnp.float32) for a in (q, k, v))
  static, steps = _visits(n, c, window)
  for o, mask_cc in static:
    grads = visit(grads, *_offset_index(n, o), mask_cc)
  if steps:
    grads = jax.lax.fori_loop(1, steps + 1, lambda o, g: visit(g, *_pair_index(n, o), None), grads)
  dq, dk_, dv = grads
  return (dq * scale).astype(q.dtype), (dk_ * scale).astype(k.dtype), dv.astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q_blhk, k_blhk, v_blhk, window: int | None, block: int):
  """The blockwise path (module docstring) with block length `block`."""
  l = q_blhk.shape[1]
  out = _flash(_to_blocks(q_blhk, block), _to_blocks(k_blhk, block), _to_blocks(v_blhk, block), window)
  return _from_blocks(out, l)
