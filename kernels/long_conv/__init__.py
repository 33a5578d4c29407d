"""Causal long convolution y[t] = sum_{s<=t} h[t-s] * u[s], per channel.

Dimension legend: b batch, l sequence length, c channels (depthwise: one filter per channel).

Paths:
  reference  O(l^2) Toeplitz matmul in float32 -- the ground truth the others are tested against.
  xla        FFT with n = 2l (zero padding makes the circular convolution causal), float32 inside.
The dispatcher picks `xla` everywhere for now; the Pallas gated-convolution core of issue 4 joins here.
"""

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["reference", "xla"]


def _check(u_blc: jax.Array, h_lc: jax.Array) -> None:
  if u_blc.ndim != 3 or h_lc.ndim != 2 or h_lc.shape[1] != u_blc.shape[2]:
    raise ValueError(f"causal_conv expects u (b, l, c) and h (l_h, c); got {u_blc.shape} and {h_lc.shape}")
  if h_lc.shape[0] > u_blc.shape[1]:
    raise ValueError(f"filter length {h_lc.shape[0]} exceeds sequence length {u_blc.shape[1]}")


def causal_conv_reference(u_blc: jax.Array, h_lc: jax.Array) -> jax.Array:
  _check(u_blc, h_lc)
  l = u_blc.shape[1]
  h_lc = jnp.pad(h_lc.astype(jnp.float32), ((0, l - h_lc.shape[0]), (0, 0)))
  lag_ts = jnp.arange(l)[:, None] - jnp.arange(l)[None, :]
  toeplitz_tsc = jnp.where((lag_ts >= 0)[..., None], h_lc[jnp.clip(lag_ts, 0, l - 1)], 0.0)
  y = jnp.einsum("tsc,bsc->btc", toeplitz_tsc, u_blc.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return y.astype(u_blc.dtype)


def causal_conv_fft(u_blc: jax.Array, h_lc: jax.Array) -> jax.Array:
  _check(u_blc, h_lc)
  l = u_blc.shape[1]
  n = 2 * l
  u_f = jnp.fft.rfft(u_blc.astype(jnp.float32), n=n, axis=1)
  h_f = jnp.fft.rfft(h_lc.astype(jnp.float32), n=n, axis=0)
  y = jnp.fft.irfft(u_f * h_f[None], n=n, axis=1)[:, :l]
  return y.astype(u_blc.dtype)


def causal_conv(u_blc: jax.Array, h_lc: jax.Array, *, implementation: Implementation | None = None) -> jax.Array:
  """Depthwise causal convolution of u (b, l, c) with h (l_h <= l, c); output dtype follows u."""
  if implementation is None:
    implementation = "xla"
  if implementation == "reference":
    return causal_conv_reference(u_blc, h_lc)
  if implementation == "xla":
    return causal_conv_fft(u_blc, h_lc)
  raise ValueError(f"implementation must be one of None, 'reference', 'xla'; got {implementation!r}")
