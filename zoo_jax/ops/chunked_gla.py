"""Gated linear recurrences, chunked and token by token: the shared core of `mamba2` (SSD) and `gla`.

Dimension legend: b batch, l sequence length, h heads, k key width per head, v value width per head,
n chunks, c positions in a chunk (t, s: two of them), g the decay's width (k, or 1 for a scalar per head).

Per head, with log-decays γ_t <= 0 (one per key channel, or one scalar broadcast over the k channels):

    S_t = diag(exp(γ_t)) S_{t−1} + k_t v_tᵀ          (k × v, S_0 = 0)
    o_t = S_tᵀ q_t

GLA (Yang et al. 2024, Section 4.1: q, k, v, α_t = exp(γ_t) per key channel) is this recurrence as
written; Mamba-2's SSD (Dao & Gu 2024, Sections 3 and 5: the selective SSM h_t = A_t h_{t−1} + B_t x_t,
y_t = C_tᵀ h_t with A_t = a_t·I, a scalar times the identity, a_t = exp(Δ_t A)) is it with q = C, k = B,
v = Δ x and a scalar γ = Δ A.

Chunked form (GLA Section 4.2, the chunkwise parallel form; SSD Section 6, the block-decomposition
algorithm): with
Γ_t = Σ_{s<=t in its chunk} γ_s (an inclusive cumulative sum of log-decays inside each chunk of c tokens),

    intra-chunk    o_t  = Σ_{s<=t, same chunk} (Σ_k q_tk k_sk exp(Γ_tk − Γ_sk)) v_s
    chunk state    ΔS_i = Σ_{s in chunk i} (k_s ⊙ exp(Γ_last − Γ_s)) v_sᵀ
    state passing  S_i  = diag(exp(Γ_last,i)) S_{i−1} + ΔS_i          (`lax.scan` over chunks)
    inter-chunk    o_t += S_{i−1}ᵀ (q_t ⊙ exp(Γ_t))

Every exponent above is a sum of log-decays over a span that ends where the decay is applied, so it is
<= 0: nothing is divided by a product of decays (GLA's q ⊙ exp(Γ), k ⊙ exp(−Γ) factorisation would be,
and overflows at strong decays). Each such sum is also summed over its own span (`segment_sums`, an
exclusive reverse cumsum for Γ_last − Γ_s), never taken as a difference Γ_t − Γ_s of two large sums,
which would lose the digits of a short lag after a strong decay. With a scalar decay the intra-chunk
weight is SSD's mask exp(segsum) times C Bᵀ, two matmuls; with a per-channel decay it is the log-space
form (the c × c × k tensor of exp(Γ_t − Γ_s) per chunk, GLA's "secondary chunking" at one level: its
cost is l·c·k per head, so GLA runs with small chunks).

State passing (fla's `initial_state` / `output_final_state`): from an initial state S_{−1} the first
chunk's inter-chunk term reads it as it reads any earlier chunk's state, and the scan's last carry is the
final state S_l (the padding at the end has γ = 0, k = v = 0, so it neither decays nor adds to it). So
`chunked(x[:t])` then `chunked(x[t:], initial_state=S_t)` is `chunked(x)`, and prefill hands the decode
loop (`recurrent_step`) exactly its state.

All arithmetic is float32 at the highest matmul precision (an f32 matmul may otherwise run as TF32 or
bfloat16 passes on GPU/TPU); the step form uses elementwise products and sums for the same reason.
"""

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec, *operands):
  return jnp.einsum(spec, *operands, precision=HIGHEST)


def recurrent_step(state_bhkv, q_bhk, k_bhk, v_bhv, log_decay_bhg):
  """One token: S = diag(exp(γ)) S + k vᵀ, o = Sᵀ q (float32). γ is (b, h, k) or (b, h, 1)."""
  q_bhk, k_bhk, v_bhv, log_decay_bhg = (a.astype(jnp.float32) for a in (q_bhk, k_bhk, v_bhv, log_decay_bhg))
  state_bhkv = jnp.exp(log_decay_bhg)[..., None] * state_bhkv + k_bhk[..., None] * v_bhv[..., None, :]
  return state_bhkv, (q_bhk[..., None] * state_bhkv).sum(-2)


def segment_sums(log_decay_bncg):
  """lag[t, s] = Σ_{s<u<=t} γ_u within each chunk, (b, n, c, c, ...), 0 where s >= t.

  Summed segment by segment (a cumulative sum over t of γ_t masked to t > s), as mamba_ssm's
  `ssd_minimal` "more stable segsum": Γ_t − Γ_s would lose the digits of small lags next to large Γ.
  """
  c = log_decay_bncg.shape[2]
  below_ts = jnp.tril(jnp.ones((c, c), bool), k=-1).reshape(1, 1, c, c, *[1] * (log_decay_bncg.ndim - 3))
  return jnp.cumsum(jnp.where(below_ts, log_decay_bncg[:, :, :, None], 0.0), axis=2)


def chunked(q_blhk, k_blhk, v_blhv, log_decay_blhg, chunk_size: int, initial_state_bhkv=None,
            output_final_state: bool = False):
  """o (b, l, h, v) in float32 of the recurrence, in chunks of `chunk_size` (clipped to l).

  The recurrence starts from `initial_state_bhkv` (b, h, k, v), the state after the positions before
  these (None: S = 0); with `output_final_state` the result is `(o, S_l)`, S_l (b, h, k, v) float32.
  A length that the chunk does not divide is padded at the end with γ = 0, k = v = 0 (causality makes the
  padding harmless, and it leaves the final state as it is) and cut off again.
  """
  b, l, h, _ = q_blhk.shape
  c = max(1, min(chunk_size, l))
  n = -(-l // c)

  def split(t):
    t = jnp.pad(t.astype(jnp.float32), ((0, 0), (0, n * c - l), (0, 0), (0, 0)))
    return t.reshape(b, n, c, h, t.shape[-1])

  q, k, v, log_decay = split(q_blhk), split(k_blhk), split(v_blhv), split(log_decay_blhg)
  causal_ts = jnp.tril(jnp.ones((c, c), bool))
  lag_bntshg = segment_sums(log_decay)
  weight_bntshg = jnp.where(causal_ts[:, :, None, None], jnp.exp(lag_bntshg), 0.0)
  if log_decay.shape[-1] == 1:  # scalar decay per head: SSD's mask L = exp(segsum) times C Bᵀ
    scores_bnhts = _einsum("bnthk,bnshk->bnhts", q, k) * jnp.moveaxis(weight_bntshg[..., 0], 4, 2)
  else:  # a decay per key channel: the pairwise log-space form
    scores_bnhts = _einsum("bnthk,bnshk,bntshk->bnhts", q, k, weight_bntshg)
  intra_bnthv = _einsum("bnhts,bnshv->bnthv", scores_bnhts, v)

  from_start_bnchg = jnp.cumsum(log_decay, axis=2)  # Γ_t, inclusive
  total_bnhg = from_start_bnchg[:, :, -1]  # Γ over the whole chunk
  # Γ_last − Γ_s as the sum over s < u <= last itself (an exclusive reverse cumsum), not a difference.
  to_end_bnchg = jnp.flip(jnp.cumsum(jnp.flip(log_decay[:, :, 1:], 2), axis=2), 2)
  to_end_bnchg = jnp.pad(to_end_bnchg, ((0, 0), (0, 0), (0, 1), (0, 0), (0, 0)))
  k_to_end = k * jnp.exp(to_end_bnchg)
  delta_bnhkv = _einsum("bnchk,bnchv->bnhkv", k_to_end, v)

  def carry_state(state_bhkv, chunk):
    total_bhg, delta_bhkv = chunk
    return jnp.exp(total_bhg)[..., None] * state_bhkv + delta_bhkv, state_bhkv

  if initial_state_bhkv is None:
    state0 = jnp.zeros((b, h, k.shape[-1], v.shape[-1]), jnp.float32)
  else:
    state0 = initial_state_bhkv.astype(jnp.float32)
  final_bhkv, prev_nbhkv = jax.lax.scan(carry_state, state0,
                                        (jnp.swapaxes(total_bnhg, 0, 1), jnp.swapaxes(delta_bnhkv, 0, 1)))
  inter_bnchv = _einsum("bnchk,nbhkv->bnchv", q * jnp.exp(from_start_bnchg), prev_nbhkv)
  o_blhv = (intra_bnthv + inter_bnchv).reshape(b, n * c, h, -1)[:, :l]
  return (o_blhv, final_bhkv) if output_final_state else o_blhv
