"""Short depthwise causal convolution of width k (2–4 in practice), fused with its activation:

    y[t] = act(b + Σ_{j<k} w[j] ⊙ u[t - (k-1) + j]),   act ∈ {identity, SiLU}

the front end of BaseConv, H3, Hyena, Based and Mamba (a depthwise `Conv1d` padded by k-1 and cut to l,
as in Zoology's `ShortConvolution` and mamba_ssm's `causal_conv1d_fn(..., activation='silu')`). The last
tap w[k-1] multiplies the current token. Inputs u (b, l, c), w (k, c), optional b (c,).

Paths:
  reference  the sum over taps in float32, output in the promoted dtype of u and w.
  xla        the sum of k shifted copies in the inputs' own dtype (exactly what `layers.ShortConvolution`
             has always computed: its numerics, bf16 included, are unchanged).
  pallas     one kernel per (batch row, channel block): taps, bias and activation on chip in float32, one
             read of u and one write of y; backward by `jax.custom_vjp` (ū is the same kernel on the
             time-reversed cotangent, w̄ and b̄ are reductions in XLA).
The Pallas kernel lowers to Mosaic TPU (checked by lowering for 'tpu' without hardware); on GPU
'pallas' runs `xla`, because Pallas's Triton lowering has no slice for the k shifted copies.
The default is `xla` on every backend: XLA already fuses the k shifted multiply-adds and the activation
into one loop, and on CPU the interpreted Pallas path is for tests only.
"""

import functools

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from zoo_jax.ops import _dispatch

IMPLEMENTATIONS = ("reference", "xla", "pallas")
FASTEST = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}
ACTIVATIONS = (None, "silu")


def _check(u, w_kc, b_c, activation):
  if u.ndim != 3 or w_kc.ndim != 2 or w_kc.shape[1] != u.shape[2]:
    raise ValueError(f"short_conv expects u (b, l, c) and w (k, c); got {u.shape} and {w_kc.shape}")
  if b_c is not None and b_c.shape != (u.shape[2],):
    raise ValueError(f"short_conv: b must have shape ({u.shape[2]},), got {b_c.shape}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"short_conv: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _act(y, activation):
  return jax.nn.silu(y) if activation == "silu" else y


def _taps(u, w_kc):
  k, length = w_kc.shape[0], u.shape[1]
  padded = jnp.pad(u, ((0, 0), (k - 1, 0), (0, 0)))
  return sum(padded[:, j:j + length] * w_kc[j] for j in range(k))


def short_conv_reference(u, w_kc, b_c=None, activation=None):
  _check(u, w_kc, b_c, activation)
  y = _taps(u.astype(jnp.float32), w_kc.astype(jnp.float32))
  if b_c is not None:
    y = y + b_c.astype(jnp.float32)
  return _act(y, activation).astype(_out_dtype(u, w_kc, b_c))


def short_conv_xla(u, w_kc, b_c=None, activation=None):
  _check(u, w_kc, b_c, activation)
  y = _taps(u, w_kc)
  return _act(y if b_c is None else y + b_c, activation)


def _out_dtype(u, w_kc, b_c):
  return jnp.result_type(u, w_kc, *(() if b_c is None else (b_c,)))


def _pallas_forward(u, w_kc, b_c, activation, block_c, out_dtype):
  b, l, c = u.shape
  k = w_kc.shape[0]
  cb = _dispatch.channel_block(c, block_c)
  bias = jnp.zeros((1, c), jnp.float32) if b_c is None else b_c.astype(jnp.float32).reshape(1, c)
  seq_spec = pl.BlockSpec((None, l, cb), lambda i, j: (i, 0, j))

  def kernel(u_ref, w_ref, b_ref, y_ref):
    x = u_ref[...].astype(jnp.float32)
    w = w_ref[...].astype(jnp.float32)
    y = b_ref[...] + x * w[k - 1]
    for lag in range(1, min(k, l)):  # u[t - lag] · w[k-1-lag], zeros before the sequence starts
      shifted = jnp.concatenate([jnp.zeros((lag, x.shape[1]), jnp.float32), x[:l - lag]], axis=0)
      y = y + shifted * w[k - 1 - lag]
    y_ref[...] = _act(y, activation).astype(y_ref.dtype)

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((b, l, c), out_dtype), grid=(b, pl.cdiv(c, cb)),
      in_specs=[seq_spec, pl.BlockSpec((k, cb), lambda i, j: (0, j)),
                pl.BlockSpec((1, cb), lambda i, j: (0, j))],
      out_specs=seq_spec, interpret=_dispatch.interpret(), compiler_params=_dispatch.compiler_params(),
      name="short_conv")(u, w_kc, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pallas(u, w_kc, b_c, activation, block_c):
  return _pallas_forward(u, w_kc, b_c, activation, block_c, _out_dtype(u, w_kc, b_c))


def _pallas_fwd(u, w_kc, b_c, activation, block_c):
  return _pallas(u, w_kc, b_c, activation, block_c), (u, w_kc, b_c)


def _pallas_bwd(activation, block_c, residuals, ybar):
  u, w_kc, b_c = residuals
  k, l = w_kc.shape[0], u.shape[1]
  g = ybar.astype(jnp.float32)
  if activation == "silu":  # silu'(x) = σ(x) (1 + x (1 - σ(x))), at the recomputed pre-activation
    pre = _pallas_forward(u, w_kc, b_c, None, block_c, jnp.float32)
    sig = jax.nn.sigmoid(pre)
    g = g * sig * (1 + pre * (1 - sig))
  # ū[s] = Σ_j w[j] g[s + k-1-j]: the causal kernel (no bias) on the time-reversed g.
  ubar = _pallas_forward(g[:, ::-1], w_kc, None, None, block_c, jnp.float32)[:, ::-1]
  x = jnp.pad(u.astype(jnp.float32), ((0, 0), (k - 1, 0), (0, 0)))
  wbar = jnp.stack([jnp.sum(g * x[:, j:j + l], axis=(0, 1)) for j in range(k)])
  bbar = None if b_c is None else jnp.sum(g, axis=(0, 1)).astype(b_c.dtype)
  return ubar.astype(u.dtype), wbar.astype(w_kc.dtype), bbar


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def pallas_supported(channels: int, block_c: int | None = None) -> bool:
  """Interpreted (CPU): always. TPU: a channel block of a multiple of 128 lanes or all channels. GPU:
  never (the shifts are slices, which Pallas's Triton lowering does not have)."""
  backend, cb = jax.default_backend(), _dispatch.channel_block(channels, block_c)
  return backend == "cpu" or (backend == "tpu" and (cb % 128 == 0 or cb == channels))


def short_conv_pallas(u, w_kc, b_c=None, activation=None, *, block_c=None):
  _check(u, w_kc, b_c, activation)
  if not pallas_supported(u.shape[-1], block_c):
    raise ValueError(f"the short_conv pallas path on {jax.default_backend()} cannot take channel block "
                     f"{_dispatch.channel_block(u.shape[-1], block_c)} (see short_conv.pallas_supported)")
  return _pallas(u, w_kc, b_c, activation, block_c)


def short_conv(u_blc: jax.Array, w_kc: jax.Array, b_c: jax.Array | None = None, *,
               activation: str | None = None, implementation: str | None = None) -> jax.Array:
  """act(b + Σ_j w[j] ⊙ u[t-(k-1)+j]) for u (b, l, c), w (k, c), b (c,) or None; act None or 'silu'."""
  implementation = _dispatch.resolve("short_conv", implementation, IMPLEMENTATIONS, FASTEST)
  if implementation == "pallas" and not pallas_supported(u_blc.shape[-1]):
    implementation = "xla"
  return {"reference": short_conv_reference, "xla": short_conv_xla,
          "pallas": short_conv_pallas}[implementation](u_blc, w_kc, b_c, activation)
