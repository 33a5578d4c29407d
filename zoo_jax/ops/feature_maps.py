"""Feature maps for linear attention: φ such that φ(q)·φ(k) approximates a softmax kernel exp(q·k/√f).

Dimension legend: f the feature (key) width, e the expanded width of φ.

Taylor-2 (Based, Arora et al. 2024, Section 3; Zoology's `feature_maps/taylor.py`): the second-order
Taylor expansion of exp(q·k/√f),

    φ(q)·φ(k) = 1 + q·k/√f + (q·k)² / (2f).

Zoology's `TaylorExp.forward` builds it as φ(x) = [1, x/f^{1/4}, vec(x xᵀ)/(√2·√f)], e = 1 + f + f²; its
`forward_mem_save` drops the repeated half of the symmetric x xᵀ, which gives the same inner products with
e = 1 + f + f(f+1)/2 = `taylor_exp_dim(f)`, the size Zoology's `Based.state_size` counts. zoo_jax uses the
compact form everywhere a state is kept: [1, x/f^{1/4}, x_i²/(√2·√f) (i = j), x_i x_j/√f (i > j)].
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def taylor_exp_dim(feature_dim: int) -> int:
  """e = 1 + f + f(f+1)/2: the constant, the linear terms and the upper triangle of x xᵀ."""
  return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2


def taylor_exp(x_nf: jax.Array) -> jax.Array:
  """The compact Taylor-2 feature map (..., f) -> (..., e), e = `taylor_exp_dim(f)`."""
  f = x_nf.shape[-1]
  rows, cols = np.tril_indices(f)  # i >= j, the diagonal included
  weight = np.where(rows == cols, 1 / math.sqrt(2), 1.0) / math.sqrt(f)
  x2 = x_nf[..., rows] * x_nf[..., cols] * weight.astype(x_nf.dtype)
  return jnp.concatenate([jnp.ones_like(x_nf[..., :1]), x_nf / f**0.25, x2], axis=-1)


def taylor_exp_kernel(q_nf: jax.Array, k_mf: jax.Array) -> jax.Array:
  """φ(q)·φ(k) for every pair, (..., n, f) x (..., m, f) -> (..., n, m), without expanding φ: O(f), not O(f²)."""
  s_nm = jnp.einsum("...nf,...mf->...nm", q_nf, k_mf) / math.sqrt(q_nf.shape[-1])
  return 1 + s_nm + 0.5 * s_nm * s_nm
