"""Gated convolution core y = out_gate ⊙ (h ∗ (in_gate ⊙ u) + D ⊙ in_gate ⊙ u), per channel.

The inner loop of the gated convolutions (BaseConv: Arora et al. 2023, Zoology Section 4, y =
(h ∗ u + u) ⊙ (u W + b); H3: Fu et al. 2023, eq. (2) with head_dim 1, q ⊙ (K ∗ (k ⊙ v) + D k ⊙ v);
Hyena: Poli et al. 2023, eq. (4) of order 2, x2 ⊙ (h ∗ (x1 ⊙ v) + D x1 ⊙ v)). ∗ is the causal long
convolution of `ops.long_conv`; in_gate, out_gate (b, l, c) and D (c,) are each optional (None).

Paths:
  reference  the gates around the O(l²) Toeplitz convolution, all in float32: the ground truth.
  xla        the gates around `rfft`/`irfft` (n = 2l), separate XLA ops (XLA fuses the elementwise ones).
  monarch    the gates around the Monarch DFT-matmul FFT (`ops._fftconv`).
  pallas     one fused kernel (`ops._fftconv`): both gates, the padded FFT, the spectral product, the
             inverse and D in one pass per (batch row, channel block), never writing the 2l-padded input
             or its spectrum to HBM; backward by `jax.custom_vjp` (the same kernel with the conjugate
             filter spectrum computes the correlation v̄ = h ⋆ z̄; h̄ by rfft correlation in XLA).
Every path computes in float32 and returns u's dtype. FlashFFTConv (Fu et al. 2023) fuses the same chain
in CUDA with fp16/bf16 tensor-core matmuls; here the matmuls accumulate in float32 at HIGHEST precision,
which costs speed on GPU/TPU matrix units and buys float32-level agreement with the reference.
"""

import jax
import jax.numpy as jnp

from zoo_jax.ops import _dispatch, _fftconv
from zoo_jax.ops import long_conv

IMPLEMENTATIONS = ("reference", "xla", "monarch", "pallas")
# See ops.long_conv.FASTEST: measured on CPU only so far.
FASTEST = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}


def _f32(x):
  return None if x is None else x.astype(jnp.float32)


def _gated(conv_f32, u, h, in_gate, out_gate, d):
  v = u.astype(jnp.float32) if in_gate is None else _f32(in_gate) * u.astype(jnp.float32)
  z = conv_f32(v, h)
  if d is not None:
    z = z + _f32(d) * v
  return (z if out_gate is None else _f32(out_gate) * z).astype(u.dtype)


def gated_conv_reference(u, h_lc, in_gate=None, out_gate=None, d_c=None):
  _check(u, h_lc, in_gate, out_gate, d_c)
  return _gated(long_conv.causal_conv_reference, u, h_lc, in_gate, out_gate, d_c)


def gated_conv_fft(u, h_lc, in_gate=None, out_gate=None, d_c=None):
  _check(u, h_lc, in_gate, out_gate, d_c)
  return _gated(long_conv.fft_conv_f32, u, h_lc, in_gate, out_gate, d_c)


def gated_conv_monarch(u, h_lc, in_gate=None, out_gate=None, d_c=None):
  _check(u, h_lc, in_gate, out_gate, d_c)
  return _fftconv.monarch_gated(u, h_lc, in_gate, out_gate, d_c)


def gated_conv_pallas(u, h_lc, in_gate=None, out_gate=None, d_c=None, *, block_c=None):
  _check(u, h_lc, in_gate, out_gate, d_c)
  _fftconv.check_pallas_supported(u.shape[1], u.shape[2], block_c)
  return _fftconv.pallas_gated(u, h_lc, in_gate, out_gate, d_c, block_c)


def _check(u, h_lc, in_gate, out_gate, d_c):
  long_conv.check_shapes("gated_conv", u, h_lc, d_c, gates=(("in_gate", in_gate), ("out_gate", out_gate)))


def gated_conv(u_blc: jax.Array, h_lc: jax.Array, *, in_gate: jax.Array | None = None,
               out_gate: jax.Array | None = None, d_c: jax.Array | None = None,
               implementation: str | None = None) -> jax.Array:
  """out_gate ⊙ (h ∗ (in_gate ⊙ u) + D ⊙ in_gate ⊙ u) for u (b, l, c), h (l_h <= l, c); gates (b, l, c)
  and d_c (c,) optional; output dtype follows u."""
  _check(u_blc, h_lc, in_gate, out_gate, d_c)
  implementation = _dispatch.resolve("gated_conv", implementation, IMPLEMENTATIONS, FASTEST)
  if implementation == "pallas" and not _fftconv.pallas_supported(u_blc.shape[1], u_blc.shape[2]):
    implementation = "monarch"
  return {"reference": gated_conv_reference, "xla": gated_conv_fft, "monarch": gated_conv_monarch,
          "pallas": gated_conv_pallas}[implementation](u_blc, h_lc, in_gate, out_gate, d_c)
