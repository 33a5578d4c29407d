"""The generalised delta rule, shared by `delta_net`, `gated_delta_net` and `rwkv7`: a token-by-token
recurrence (the reference, and one token of it for `step`) and a chunked parallel form for training.

Dimension legend: b batch, l length, h heads, k key width per head, v value width per head, n chunks,
c chunk length, s / t positions inside a chunk, g decay width (1: one scalar per head, or k).

Per head, with the state S (k × v) and row-vector inputs q, k, a, b (k), v (v), log w (g) at token t:

    S_t = diag(w_t) S_{t−1} + b_t (a_tᵀ S_{t−1}) + k_t v_tᵀ,     o_t = S_tᵀ q_t          (*)

i.e. the transition diag(w_t) + b_t a_tᵀ (diagonal plus rank one) followed by the write k_t v_tᵀ. This is
RWKV-7's wkv_t = wkv_{t−1}(diag(w_t) + a_tᵀ b_t) + v_tᵀ k_t (Peng et al. 2025, eq. 16–18; wkv = Sᵀ) and
flash-linear-attention's DPLR delta rule. The mixers instantiate it as
- DeltaNet (Yang et al. 2024, eq. 1):      w = 1,  a = −k, b = β k,  write (β k) vᵀ;
- Gated DeltaNet (Yang et al. 2025, eq. 10): w = α (scalar), a = −k, b = α β k, write (β k) vᵀ;
- RWKV-7:                                  w (per channel), a = −κ̂, b = κ̂ ⊙ a_iclr, write k̃ vᵀ.

Chunked form (the WY / UT representation of Yang et al. 2024, Section 3, generalised to a diagonal decay;
the form flash-linear-attention's `chunk_dplr_delta_rule` computes). Inside a chunk starting from S_0,
with Γ_t = Π_{r<=t} w_r (cumulative, per channel) and the "read-out" u_t = S_{t−1}ᵀ a_t, unrolling (*):

    S_t = Γ_t ⊙ S_0 + Σ_{s<=t} (Γ_t/Γ_s) ⊙ (b_s u_sᵀ + k_s v_sᵀ)
    u_t = S_0ᵀ (a_t ⊙ Γ_{t−1}) + Σ_{s<t} ⟨a_t, b_s⟩_{Γ_{t−1}/Γ_s} u_s + Σ_{s<t} ⟨a_t, k_s⟩_{Γ_{t−1}/Γ_s} v_s

where ⟨x, y⟩_γ = Σ_i x_i γ_i y_i. The second line is a unit lower-triangular system in U (c × v), solved
once per chunk in parallel over chunks: U = W S_0 + Ũ, W = T (a ⊙ Γ_{t−1}), Ũ = T A_ak V,
T = (I − A_ab)⁻¹. Only the inter-chunk recurrence is sequential (`lax.scan` over chunks, matmuls inside):

    U = W S_0 + Ũ,   S_c = Γ_c ⊙ S_0 + (B ⊙ Γ_c/Γ)ᵀ U + (K ⊙ Γ_c/Γ)ᵀ V
    O = (Q ⊙ Γ) S_0 + [⟨q_t, b_s⟩_{Γ_t/Γ_s}]_{s<=t} U + [⟨q_t, k_s⟩_{Γ_t/Γ_s}]_{s<=t} V     (after the scan)

Cost per chunk O(c²(k+v) + c k v) plus one c × c triangular solve (forward substitution: c sequential
row updates, each vectorised over batch, chunks and heads), against O(c k v) per token for the
recurrence; the state is materialised once per chunk, not per token. Everything runs in float32.
On 2 shared CPU cores (d = 128, L = 1024–4096) the chunked form trains (forward + backward) 1.4–3× faster
than the token scan but its forward alone is 0.3–1.3× as fast: XLA:CPU runs the small per-token update
well, and the substitution loop is ~1/3 of the chunked forward (see experiments/bench_recurrence.py).

Decays. With one scalar decay per head (g = 1) the c × c factors exp(G_t − G_s) are formed from the
pairwise differences of the cumulative log decay G, so no factor exceeds 1 and any decay is safe. With a
decay per channel (g = k) that would cost c²·k per chunk, so the factor is split into exp(G_t)·exp(−G_s);
exp(−G_s) grows like 1/Π w, which is safe in float32 only while the chunk's total log decay per channel
stays above about −80 (RWKV-7 bounds log w >= −e^(−1/2), so chunks up to 131 tokens; the mixer checks).

Lengths that the chunk size does not divide are padded at the end with identity steps (log w = 0,
a = b = k = v = q = 0), which leave the state unchanged, so the final state is the state after token l.

State passing (flash-linear-attention's `initial_state` / `output_final_state`): both forms start from a
given S_0 (b, h, k, v) instead of 0 and return the state after the last token. In the chunked form S_0 is
the first chunk's S_0 above (its read-outs U = W S_0 + Ũ and outputs (Q ⊙ Γ) S_0 + ...), and the final
state is the inter-chunk scan's last carry, so a prefill costs one chunked pass.
"""

import functools

import jax
import jax.numpy as jnp

# Every product in full float32: a float32 matmul's default precision on GPU/TPU rounds its inputs to
# TF32/bfloat16, ~1e-3 relative, which the 1e-5 agreement with the recurrence cannot absorb.
PRECISION = jax.lax.Precision.HIGHEST
einsum = functools.partial(jnp.einsum, precision=PRECISION)
matmul = functools.partial(jnp.matmul, precision=PRECISION)

# Largest |Σ log w| over one chunk for which the per-channel split exp(G_t)·exp(−G_s) stays far from
# float32 overflow (e^80 ≈ 5.5e34 < 3.4e38, leaving 4 orders of magnitude for the products with q, k, a, b).
MAX_CHUNK_LOG_DECAY = 80.0


def step(s_bhkv, q_bhk, k_bhk, v_bhv, log_w_bhg, a_bhk, b_bhk):
  """One token of (*): (S_t, o_t) from S_{t−1}, all float32."""
  read_bhv = einsum("bhk,bhkv->bhv", a_bhk, s_bhkv)
  s_bhkv = (jnp.exp(log_w_bhg)[..., None] * s_bhkv + b_bhk[..., None] * read_bhv[..., None, :]
            + k_bhk[..., None] * v_bhv[..., None, :])
  return s_bhkv, einsum("bhk,bhkv->bhv", q_bhk, s_bhkv)


def _f32(*arrays):
  return [x.astype(jnp.float32) for x in arrays]


def zero_state(q_blhk, v_blhv):
  b, _, h, k = q_blhk.shape
  return jnp.zeros((b, h, k, v_blhv.shape[-1]), jnp.float32)


def recurrent(q_blhk, k_blhk, v_blhv, log_w_blhg, a_blhk, b_blhk, initial_state=None):
  """(*) token by token (`lax.scan` over l): o (b, l, h, v) and the final state (b, h, k, v), float32."""
  inputs = _f32(q_blhk, k_blhk, v_blhv, log_w_blhg, a_blhk, b_blhk)
  s0 = zero_state(q_blhk, v_blhv) if initial_state is None else initial_state.astype(jnp.float32)
  s_final, o_lbhv = jax.lax.scan(lambda s, x: step(s, *x), s0, [jnp.swapaxes(x, 0, 1) for x in inputs])
  return jnp.swapaxes(o_lbhv, 0, 1), s_final


def _decayed_scores(x_tk, y_sk, gx_tg, gy_sg, *, strict: bool):
  """[Σ_i x_ti y_si exp(gx_ti − gy_si)] for s < t (strict) or s <= t, else 0; (..., c, c)."""
  c = x_tk.shape[-2]
  mask_ts = jnp.tril(jnp.ones((c, c), bool), k=-1 if strict else 0)
  if gx_tg.shape[-1] == 1:  # a scalar decay: pairwise differences, every factor <= 1
    diff_ts = gx_tg - jnp.swapaxes(gy_sg, -1, -2)
    decay_ts = jnp.where(mask_ts, jnp.exp(jnp.where(mask_ts, diff_ts, 0.0)), 0.0)
    return einsum("...tk,...sk->...ts", x_tk, y_sk) * decay_ts
  scores_ts = einsum("...tk,...sk->...ts", x_tk * jnp.exp(gx_tg), y_sk * jnp.exp(-gy_sg))
  return jnp.where(mask_ts, scores_ts, 0.0)


def _forward_substitution(a_ts, rhs_tx):
  """X with (I − A) X = rhs, A strictly lower triangular (..., c, c): row t = rhs_t + Σ_{s<t} A_ts X_s."""

  def row(t, x_tx):
    x_row = rhs_tx[..., t, :] + einsum("...s,...sx->...x", a_ts[..., t, :], x_tx)
    return x_tx.at[..., t, :].set(x_row)

  return jax.lax.fori_loop(0, a_ts.shape[-1], row, jnp.zeros_like(rhs_tx))


@jax.custom_vjp
def solve_unit_lower(a_ts, rhs_tx):
  """(I − A)⁻¹ rhs for a strictly lower-triangular A, by forward substitution.

  Not `jax.scipy.linalg.solve_triangular`: on XLA:CPU (jax 0.10.2) its LAPACK call deadlocked inside the
  training step at some shapes (b = 32, 2 heads, c = 16: the step never returned, every thread waiting
  on a futex). The backward pass is the transposed solve (backward substitution, run as a forward one on
  the reversed system) rather than autodiff through the loop, which would keep every iterate.
  """
  return _forward_substitution(a_ts, rhs_tx)


def _solve_fwd(a_ts, rhs_tx):
  x_tx = _forward_substitution(a_ts, rhs_tx)
  return x_tx, (a_ts, x_tx)


def _solve_bwd(residuals, g_tx):
  a_ts, x_tx = residuals
  # (I − A)⁻ᵀ g: with J the reversal, J (I − Aᵀ) J = I − J Aᵀ J is unit lower triangular again.
  flipped_a = jnp.swapaxes(a_ts, -1, -2)[..., ::-1, ::-1]
  g_rhs = _forward_substitution(flipped_a, g_tx[..., ::-1, :])[..., ::-1, :]
  c = a_ts.shape[-1]
  strictly_lower = jnp.tril(jnp.ones((c, c), bool), k=-1)
  g_a = jnp.where(strictly_lower, matmul(g_rhs, jnp.swapaxes(x_tx, -1, -2)), 0.0)
  return g_a, g_rhs


solve_unit_lower.defvjp(_solve_fwd, _solve_bwd)


def chunked(q_blhk, k_blhk, v_blhv, log_w_blhg, a_blhk, b_blhk, chunk_size: int, initial_state=None):
  """(*) in chunks of `chunk_size` (clipped to l): o (b, l, h, v) and the final state, float32.

  Equal to `recurrent` up to float32 round-off (see the module docstring for the algebra)."""
  bsz, l, h, dk = q_blhk.shape
  dv = v_blhv.shape[-1]
  c = min(chunk_size, l)
  n = -(-l // c)

  def chunks(x_blhx):  # (b, l, h, x) -> (b, n, h, c, x), padded with zeros (identity steps)
    x = jnp.pad(x_blhx.astype(jnp.float32), ((0, 0), (0, n * c - l), (0, 0), (0, 0)))
    return jnp.swapaxes(x.reshape(bsz, n, c, h, x.shape[-1]), 2, 3)

  q, k, v, log_w, a, b = map(chunks, (q_blhk, k_blhk, v_blhv, log_w_blhg, a_blhk, b_blhk))
  g_incl = jnp.cumsum(log_w, axis=-2)  # log Γ_t
  g_excl = g_incl - log_w  # log Γ_{t−1}
  g_last = g_incl[..., -1:, :]  # log Γ_c

  a_ab = _decayed_scores(a, b, g_excl, g_incl, strict=True)
  a_ak = _decayed_scores(a, k, g_excl, g_incl, strict=True)
  # T [W, Ũ] = [a ⊙ Γ_{t−1}, A_ak V]: one unit lower-triangular solve per chunk and head.
  rhs = jnp.concatenate([a * jnp.exp(g_excl), matmul(a_ak, v)], axis=-1)
  w_u = solve_unit_lower(a_ab, rhs)
  w_ck, u_tilde_cv = w_u[..., :dk], w_u[..., dk:]
  b_tail = b * jnp.exp(g_last - g_incl)  # b_s ⊙ Γ_c/Γ_s
  k_tail = k * jnp.exp(g_last - g_incl)
  decay_k1 = jnp.swapaxes(jnp.exp(g_last), -1, -2)  # Γ_c as a column, (..., g, 1)

  def chunk_step(s_bhkv, xs):
    w_, u_tilde, b_tail_, k_tail_, v_, decay = xs
    u_bhcv = matmul(w_, s_bhkv) + u_tilde
    s_next = (decay * s_bhkv + matmul(jnp.swapaxes(b_tail_, -1, -2), u_bhcv)
              + matmul(jnp.swapaxes(k_tail_, -1, -2), v_))
    return s_next, (s_bhkv, u_bhcv)

  s0 = jnp.zeros((bsz, h, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(
      jnp.float32)
  time_major = [jnp.swapaxes(x, 0, 1) for x in (w_ck, u_tilde_cv, b_tail, k_tail, v, decay_k1)]
  s_final, (s_prev_nbhkv, u_nbhcv) = jax.lax.scan(chunk_step, s0, time_major)
  s_prev, u = jnp.swapaxes(s_prev_nbhkv, 0, 1), jnp.swapaxes(u_nbhcv, 0, 1)

  q_b = _decayed_scores(q, b, g_incl, g_incl, strict=False)
  q_k = _decayed_scores(q, k, g_incl, g_incl, strict=False)
  o_bnhcv = matmul(q * jnp.exp(g_incl), s_prev) + matmul(q_b, u) + matmul(q_k, v)
  o_blhv = jnp.swapaxes(o_bnhcv, 2, 3).reshape(bsz, n * c, h, dv)[:, :l]
  return o_blhv, s_final


FORMS = ("chunked", "recurrent")


def delta_rule(form: str, q, k, v, log_w, a, b, chunk_size: int, initial_state=None,
               output_final_state: bool = False):
  """o (b, l, h, v) of (*) by the named form, from `initial_state` (b, h, k, v) (S = 0 when None).

  With `output_final_state` (flash-linear-attention's name) the result is (o, S after token l): the
  chunked form's last inter-chunk state, so a prefill never replays the tokens one by one."""
  if form == "chunked":
    o, s_final = chunked(q, k, v, log_w, a, b, chunk_size, initial_state)
  else:
    o, s_final = recurrent(q, k, v, log_w, a, b, initial_state)
  return (o, s_final) if output_final_state else o


def l2_normalize(x, eps: float = 1e-6):
  """x / sqrt(Σ x² + eps) over the last axis, in float32 (flash-linear-attention's `l2norm`)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
