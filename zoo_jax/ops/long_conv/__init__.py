"""Causal long convolution y[t] = Σ_{s<=t} h[t-s] · u[s] (+ D ⊙ u[t]), per channel.

Dimension legend: b batch, l sequence length, c channels (depthwise: one filter per channel).
Inputs u (b, l, c), filter h (l_h <= l, c) (float32; shorter filters are zero-padded), optional skip D (c,).
The output has u's shape and dtype; every path computes in float32 inside.

Paths (the contract every op in `zoo_jax/ops/` follows):
  reference  O(l²) Toeplitz matmul in float32 (HIGHEST precision): the ground truth the others are tested
             against.
  xla        FFT by `rfft`/`irfft` with n = 2l (zero padding makes the circular convolution causal), the
             same zero-padded FFT as Zoology's `fft_conv`.
  monarch    the FFT as two stages of small dense DFT matmuls (N = 2l = N1·N2, `ops._fftconv`), so it
             runs on matrix units; float32 accumulation.
  pallas     the fused kernel of `ops._fftconv` with no gates (custom VJP).
The dispatcher `causal_conv(..., implementation=None)` takes the fastest path measured on the current
backend (`FASTEST`, from `experiments/bench_kernels.py`).
"""

import jax
import jax.numpy as jnp

from zoo_jax.ops import _dispatch, _fftconv

IMPLEMENTATIONS = ("reference", "xla", "monarch", "pallas")
# Measured by experiments/bench_kernels.py (forward + backward). CPU: rfft beats the DFT matmuls at every
# benchmarked length. GPU and TPU: not measured yet (no accelerator in the sessions so far), so the
# validated XLA path until a benchmark there says otherwise.
FASTEST = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}


def check_shapes(op: str, u_blc, h_lc, d_c=None, gates=()) -> None:
  """One-line ValueErrors for shapes the convolution ops cannot take (before any compute)."""
  if u_blc.ndim != 3 or h_lc.ndim != 2 or h_lc.shape[1] != u_blc.shape[2]:
    raise ValueError(f"{op} expects u (b, l, c) and h (l_h, c); got {u_blc.shape} and {h_lc.shape}")
  if h_lc.shape[0] > u_blc.shape[1]:
    raise ValueError(f"{op}: filter length {h_lc.shape[0]} exceeds sequence length {u_blc.shape[1]}")
  if d_c is not None and d_c.shape != (u_blc.shape[2],):
    raise ValueError(f"{op}: d must have shape ({u_blc.shape[2]},) (one per channel), got {d_c.shape}")
  for name, gate in gates:
    if gate is not None and gate.shape != u_blc.shape:
      raise ValueError(f"{op}: {name} must have u's shape {u_blc.shape}, got {gate.shape}")


def _skip(y, u, d_c):
  return y if d_c is None else y + d_c.astype(jnp.float32) * u.astype(jnp.float32)


def causal_conv_reference(u_blc: jax.Array, h_lc: jax.Array, d_c: jax.Array | None = None) -> jax.Array:
  check_shapes("causal_conv", u_blc, h_lc, d_c)
  l = u_blc.shape[1]
  h_lc = jnp.pad(h_lc.astype(jnp.float32), ((0, l - h_lc.shape[0]), (0, 0)))
  lag_ts = jnp.arange(l)[:, None] - jnp.arange(l)[None, :]
  toeplitz_tsc = jnp.where((lag_ts >= 0)[..., None], h_lc[jnp.clip(lag_ts, 0, l - 1)], 0.0)
  y = jnp.einsum("tsc,bsc->btc", toeplitz_tsc, u_blc.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return _skip(y, u_blc, d_c).astype(u_blc.dtype)


def fft_conv_f32(v_blc: jax.Array, h_lc: jax.Array) -> jax.Array:
  """h ∗ v by rfft with n = 2l, float32 in and out (shared with `ops.gated_conv`)."""
  l = v_blc.shape[1]
  n = 2 * l
  u_f = jnp.fft.rfft(v_blc.astype(jnp.float32), n=n, axis=1)
  h_f = jnp.fft.rfft(h_lc.astype(jnp.float32), n=n, axis=0)
  return jnp.fft.irfft(u_f * h_f[None], n=n, axis=1)[:, :l]


def causal_conv_fft(u_blc: jax.Array, h_lc: jax.Array, d_c: jax.Array | None = None) -> jax.Array:
  check_shapes("causal_conv", u_blc, h_lc, d_c)
  return _skip(fft_conv_f32(u_blc, h_lc), u_blc, d_c).astype(u_blc.dtype)


def causal_conv_monarch(u_blc: jax.Array, h_lc: jax.Array, d_c: jax.Array | None = None) -> jax.Array:
  check_shapes("causal_conv", u_blc, h_lc, d_c)
  return _fftconv.monarch_gated(u_blc, h_lc, None, None, d_c)


def causal_conv_pallas(u_blc: jax.Array, h_lc: jax.Array, d_c: jax.Array | None = None, *,
                       block_c: int | None = None) -> jax.Array:
  check_shapes("causal_conv", u_blc, h_lc, d_c)
  _fftconv.check_pallas_supported(u_blc.shape[1], u_blc.shape[2], block_c)
  return _fftconv.pallas_gated(u_blc, h_lc, None, None, d_c, block_c)


def causal_conv(u_blc: jax.Array, h_lc: jax.Array, d_c: jax.Array | None = None, *,
                implementation: str | None = None) -> jax.Array:
  """Depthwise causal convolution of u (b, l, c) with h (l_h <= l, c), plus D ⊙ u when d_c (c,) is
  given; output dtype follows u."""
  check_shapes("causal_conv", u_blc, h_lc, d_c)
  implementation = _dispatch.resolve("causal_conv", implementation, IMPLEMENTATIONS, FASTEST)
  if implementation == "pallas" and not _fftconv.pallas_supported(u_blc.shape[1], u_blc.shape[2]):
    implementation = "monarch"
  return {"reference": causal_conv_reference, "xla": causal_conv_fft, "monarch": causal_conv_monarch,
          "pallas": causal_conv_pallas}[implementation](u_blc, h_lc, d_c)
