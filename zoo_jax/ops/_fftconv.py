"""The FFT convolution shared by `ops.long_conv` and `ops.gated_conv`: the FFT of length N = 2L as
two stages of small dense DFT matmuls (a Monarch factorisation), in plain XLA and as one fused Pallas
kernel with its custom VJP.

Math. The causal convolution y[t] = Σ_{s<=t} h[t-s] v[s] (t < L) equals the first L outputs of the
circular convolution of h and v zero-padded to N = 2L, i.e. IDFT_N(DFT_N(h) ⊙ DFT_N(v))[:L]. Write
N = N1·N2 with N2 = 2m even, and index time n = n1 + N1·n2 and frequency k = N2·k1 + k2 (Cooley–Tukey;
FlashFFTConv, Fu et al. 2023, Section 3.1, eq. for the order-2 Monarch decomposition F_N = P (I ⊗ F_N1)
P' T (I ⊗ F_N2) P):

    X[N2·k1 + k2] = Σ_{n1} F_N1[k1, n1] · ω_N^{n1·k2} · Σ_{n2} F_N2[k2, n2] · x[n1 + N1·n2],   ω_N = e^{-2πi/N}

so a length-N DFT is a matmul by F_N2 (N2×N2) over n2, an elementwise twiddle ω_N^{n1·k2}, and a matmul
by F_N1 (N1×N1) over n1, costing O(N·(N1 + N2)) instead of O(N²), all on matrix units. The spectrum is
kept in the (k2, k1) order it comes out in (the filter's spectrum is computed in the same order), and the
inverse runs the stages backwards with conjugate matrices, so no permutation is ever applied.

Real input, handled sensibly: the zero-padded half of v is never built. x[n] = 0 for n >= L is exactly
n2 >= m, so stage one multiplies by the first m columns of F_N2 only, on the real input (two real matmuls
instead of four); likewise the inverse computes only the rows n2 < m (outputs t < L) and only the real
part. Complex numbers are (real, imaginary) float32 pairs throughout, because Pallas's GPU backends and
Mosaic TPU have no complex dtype. An L without a balanced factorisation (a large prime) is padded up to
at most the next multiple of 32 (zero padding of both u and h leaves the first L outputs unchanged).

Pallas kernel and backend. One program per (batch row, block of channels) loads the block of u, the
gates and the filter spectrum, computes out_gate ⊙ (conv(h, in_gate ⊙ u) + D ⊙ in_gate ⊙ u) in float32
entirely on chip, and writes the block of y: the gates, the 2L padding and the spectrum of u never touch
HBM. It is a plain `pl.pallas_call` over a grid with `BlockSpec`s and no backend-specific primitives, so
one kernel serves TPU (Mosaic TPU) and GPU. On GPU it is lowered by the Triton backend, selected
explicitly by `compiler_params=pallas.triton.CompilerParams(...)`: jax 0.10 already defaults
`pallas_call` to Mosaic GPU and 0.11 deprecates Triton, but Mosaic GPU kernels are a different
programming model (`plgpu.kernel`, warpgroups, explicit SMEM/TMA pipelines; `pallas_call` on it is itself
deprecated) that shares nothing with the TPU kernel and could not be validated without a GPU in this
session, while the Triton lowering of a grid + BlockSpec kernel exists unchanged in 0.10.2 and 0.11.x.
A Mosaic GPU port is the next step when a GPU is available to test it; until then the GPU path is
experimental (never a default, `_dispatch.EXPERIMENTAL`), unsupported where the installed jax has no
Triton backend, and `experiments/accelerator_check.py` records whether it compiles and matches. Triton
needs power-of-two block shapes and 2-D dots with every dimension >= 16, so on GPU the Pallas path takes
power-of-two L >= 256 (`pallas_supported`; the dispatchers fall back to the XLA Monarch path otherwise).
Both lowerings were checked without hardware (`jax.jit(...).trace(...).lower(lowering_platforms=('tpu',) / ('cuda',))` with
interpret off: Mosaic TPU and Triton IR are produced); neither was compiled or run on a device here.

Expected performance, unmeasured: one program holds a whole (L, block) tile of every intermediate on
chip, which suits TPU VMEM (block 128 lanes) at moderate L; on GPU the tile lives in registers/shared
memory, so the default GPU block is 16 channels and long L (8K, 16K) will spill. FlashFFTConv reaches its
figures with a (b, c, l) layout (contiguous sequences), fp16/bf16 tensor-core matmuls and an
order-3/4 decomposition for long L; this kernel reads (b, l, c), strided per channel.

Backward (`jax.custom_vjp`; autodiff does not go through `pallas_call`). With v = g_in ⊙ u,
z = h ∗ v + D ⊙ v, y = g_out ⊙ z and cotangent ȳ:
    z̄ = ȳ ⊙ g_out,   v̄[s] = Σ_{t>=s} h[t-s] z̄[t] + D ⊙ z̄[s]   (a correlation: the same kernel with the
                                                               conjugate filter spectrum, in-gate g_out)
    ū = v̄ ⊙ g_in,   ḡ_in = v̄ ⊙ u,   ḡ_out = ȳ ⊙ z   (z recomputed by the kernel, not stored)
    h̄[τ] = Σ_b Σ_t z̄[b, t] v[b, t-τ]   (a correlation of v with z̄, summed over the batch: XLA rfft),
    D̄ = Σ_{b,t} z̄ ⊙ v.
The conjugate spectrum gives a correlation, not a circular wrap-around, because t - s < 0 lands in the
zero-padded half of h.
"""

import dataclasses
import functools

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from zoo_jax.ops import _dispatch


@dataclasses.dataclass(frozen=True)
class Plan:
  """L (the sequence), Lp >= L (the padded length the transform runs at), N = 2·Lp = n1·n2, n2 = 2m."""
  length: int
  padded: int
  n1: int
  n2: int

  @property
  def m(self) -> int:
    return self.n2 // 2


def _best_split(lp: int) -> tuple[int, int]:
  """(n1, n2) with n1·n2 = 2·lp, n2 even, n1 and n2 as balanced as the divisors of lp allow."""
  best = None
  for m in range(1, lp + 1):
    if lp % m == 0:
      n1, n2 = lp // m, 2 * m
      if best is None or n1 + n2 <= sum(best):  # ties: the larger m (Triton's dot wants K >= 16)
        best = (n1, n2)
  return best


@functools.lru_cache(maxsize=None)
def plan(length: int) -> Plan:
  """The factorisation for sequence length L: the padded length in [L, roundup(L, 32)] with the cheapest
  two stages (work ∝ Lp·(n1 + n2))."""
  if length < 1:
    raise ValueError(f"sequence length must be >= 1, got {length}")
  candidates = range(length, max(length, -(-length // 32) * 32) + 1)
  lp = min(candidates, key=lambda p: p * sum(_best_split(p)))
  return Plan(length, lp, *_best_split(lp))


@functools.lru_cache(maxsize=None)
def _constants(p: Plan) -> tuple[np.ndarray, ...]:
  """float32 (real, imag) pairs, computed in float64: F_N2[:, :m] (n2, m), the twiddles ω_N^{n1·k2}
  (n2, n1) and F_N1 (n1, n1)."""
  n = p.n1 * p.n2
  f2 = np.exp(-2j * np.pi * np.outer(np.arange(p.n2), np.arange(p.m)) / p.n2)
  tw = np.exp(-2j * np.pi * np.outer(np.arange(p.n2), np.arange(p.n1)) / n)
  f1 = np.exp(-2j * np.pi * np.outer(np.arange(p.n1), np.arange(p.n1)) / p.n1)
  return tuple(a.astype(np.float32) for z in (f2, tw, f1) for a in (z.real, z.imag))


def _dot(a, b, precision):
  return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def precision_for(dtype) -> jax.lax.Precision:
  """float32 inputs: HIGHEST (exact float32 matmuls, float32-level agreement with the reference). bfloat16
  inputs: DEFAULT, i.e. TF32 (GPU) or bfloat16 passes (TPU) with float32 accumulation, as FlashFFTConv's
  half-precision matmuls; on CPU both are exact float32."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


# The transforms work on one (L, c) block with 2-D matmuls, reshapes and transposes only, the operations
# every Pallas backend lowers (Triton's dot takes 2-D operands and no batch dimensions); the XLA path vmaps
# them over the batch. Spectra are laid out (n2, c, n1): k2, channel, k1.


def forward_dft(v: jax.Array, consts, p: Plan, precision=jax.lax.Precision.HIGHEST):
  """DFT_N of real v (L, c) zero-padded to N = 2·Lp: (re, im), each (n2, c, n1), [k2, c, k1]."""
  f2r, f2i, twr, twi, f1r, f1i = consts
  c = v.shape[-1]
  v = v.astype(jnp.float32)
  if p.padded > p.length:
    v = jnp.concatenate([v, jnp.zeros((p.padded - p.length, c), jnp.float32)], axis=0)
  a = v.reshape(p.m, p.n1 * c)  # [n2 < m, (n1, c)]: the zero half (n2 >= m) is never built
  # Stage one over n2 (real input: two real matmuls), then [k2, c, n1] and the twiddle ω_N^{n1·k2}.
  br = jnp.transpose(_dot(f2r, a, precision).reshape(p.n2, p.n1, c), (0, 2, 1))
  bi = jnp.transpose(_dot(f2i, a, precision).reshape(p.n2, p.n1, c), (0, 2, 1))
  br, bi = br * twr[:, None, :] - bi * twi[:, None, :], br * twi[:, None, :] + bi * twr[:, None, :]
  br, bi = br.reshape(p.n2 * c, p.n1), bi.reshape(p.n2 * c, p.n1)
  # Stage two over n1.
  xr = _dot(br, f1r, precision) - _dot(bi, f1i, precision)
  xi = _dot(br, f1i, precision) + _dot(bi, f1r, precision)
  return xr.reshape(p.n2, c, p.n1), xi.reshape(p.n2, c, p.n1)


def inverse_dft(yr: jax.Array, yi: jax.Array, consts, p: Plan, precision=jax.lax.Precision.HIGHEST):
  """The real part of IDFT_N of a spectrum (n2, c, n1) from `forward_dft`, outputs t < L only: (L, c)."""
  f2r, f2i, twr, twi, f1r, f1i = consts
  c = yr.shape[1]
  yr, yi = yr.reshape(p.n2 * c, p.n1), yi.reshape(p.n2 * c, p.n1)
  # conj(F_N1) over k1 (F_N1 is symmetric), then the conjugate twiddle, then [k2, (n1, c)].
  dr = (_dot(yr, f1r, precision) + _dot(yi, f1i, precision)).reshape(p.n2, c, p.n1)
  di = (_dot(yi, f1r, precision) - _dot(yr, f1i, precision)).reshape(p.n2, c, p.n1)
  dr, di = dr * twr[:, None, :] + di * twi[:, None, :], di * twr[:, None, :] - dr * twi[:, None, :]
  dr = jnp.transpose(dr, (0, 2, 1)).reshape(p.n2, p.n1 * c)
  di = jnp.transpose(di, (0, 2, 1)).reshape(p.n2, p.n1 * c)
  # Re(conj(F_N2)[n2 < m, :] @ D) = F_N2r^T D_r + F_N2i^T D_i: only the rows of outputs t < Lp.
  x = (_dot(f2r.T, dr, precision) + _dot(f2i.T, di, precision)).reshape(p.padded, c)
  x = x * (1.0 / (p.n1 * p.n2))
  return x if p.padded == p.length else x[:p.length]


def filter_spectrum(h_lc: jax.Array, p: Plan) -> tuple[jax.Array, jax.Array]:
  """The spectrum of h (l_h <= L, c), zero-padded to N, laid out as `forward_dft` gives: (n2, c, n1)."""
  h_lc = jnp.pad(h_lc.astype(jnp.float32), ((0, p.length - h_lc.shape[0]), (0, 0)))
  return forward_dft(h_lc, _constants(p), p)


def _core(v, hr, hi, d, consts, p, precision):
  """h ∗ v (+ D ⊙ v) for one float32 block v (L, c), in the Monarch form."""
  xr, xi = forward_dft(v, consts, p, precision)
  z = inverse_dft(xr * hr - xi * hi, xr * hi + xi * hr, consts, p, precision)
  return z if d is None else z + d * v


def monarch_gated(u, h_lc, in_gate, out_gate, d):
  """The XLA Monarch path: out_gate ⊙ (h ∗ (in_gate ⊙ u) + D ⊙ in_gate ⊙ u), each gate optional; float32
  inside, output in u's dtype."""
  p = plan(u.shape[1])
  v = _gated_input(u, in_gate)
  hr, hi = filter_spectrum(h_lc, p)
  consts = tuple(jnp.asarray(c) for c in _constants(p))
  d = None if d is None else d.astype(jnp.float32)
  z = jax.vmap(lambda v_: _core(v_, hr, hi, d, consts, p, precision_for(u.dtype)))(v)
  return _gated_output(z, out_gate, u.dtype)


def _gated_input(u, in_gate):
  v = u.astype(jnp.float32)
  return v if in_gate is None else in_gate.astype(jnp.float32) * v


def _gated_output(z, out_gate, dtype):
  return (z if out_gate is None else out_gate.astype(jnp.float32) * z).astype(dtype)


# ----------------------------------------------------------------------------------------------- Pallas


def _pallas_forward(u, g_in, g_out, hr, hi, d, *, block_c: int | None, out_dtype):
  """The fused kernel: out_gate ⊙ (h ∗ (in_gate ⊙ u) + D ⊙ in_gate ⊙ u); g_in, g_out, d may be None."""
  b, l, c = u.shape
  p = plan(l)
  cb = _dispatch.channel_block(c, block_c)
  consts = _constants(p)
  has = (g_in is not None, g_out is not None, d is not None)
  precision = precision_for(u.dtype)
  seq_spec = pl.BlockSpec((None, l, cb), lambda i, j: (i, 0, j))
  spec_spec = pl.BlockSpec((p.n2, cb, p.n1), lambda i, j: (0, j, 0))
  const_specs = [pl.BlockSpec(x.shape, lambda i, j: (0, 0)) for x in consts]
  operands = [u] + [x for x, present in zip((g_in, g_out), has[:2]) if present] + [hr, hi]
  in_specs = [seq_spec] * (1 + sum(has[:2])) + [spec_spec, spec_spec]
  if has[2]:
    operands.append(d.astype(jnp.float32).reshape(1, c))
    in_specs.append(pl.BlockSpec((1, cb), lambda i, j: (0, j)))
  operands += [jnp.asarray(x) for x in consts]
  in_specs += const_specs

  def kernel(*refs):
    refs = list(refs)
    u_ref = refs.pop(0)
    g_in_ref = refs.pop(0) if has[0] else None
    g_out_ref = refs.pop(0) if has[1] else None
    hr_ref, hi_ref = refs.pop(0), refs.pop(0)
    d_ref = refs.pop(0) if has[2] else None
    const_refs, (y_ref,) = refs[:6], refs[6:]
    v = _gated_input(u_ref[...], None if g_in_ref is None else g_in_ref[...])
    z = _core(v, hr_ref[...], hi_ref[...], None if d_ref is None else d_ref[...],
              tuple(r[...] for r in const_refs), p, precision)
    y_ref[...] = _gated_output(z, None if g_out_ref is None else g_out_ref[...], y_ref.dtype)

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((b, l, c), out_dtype), grid=(b, pl.cdiv(c, cb)),
      in_specs=in_specs, out_specs=seq_spec, interpret=_dispatch.interpret(),
      compiler_params=_dispatch.compiler_params(), name="gated_fftconv")(*operands)


def _correlate_filter_grad(v, zbar, l_h):
  """h̄[τ] = Σ_b Σ_t z̄[b, t] v[b, t-τ] for τ < l_h, by rfft with n = 2L (float32)."""
  n = 2 * v.shape[1]
  v_f = jnp.fft.rfft(v, n=n, axis=1)
  z_f = jnp.fft.rfft(zbar, n=n, axis=1)
  return jnp.fft.irfft(jnp.sum(jnp.conj(v_f) * z_f, axis=0), n=n, axis=0)[:l_h]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def pallas_gated(u, h_lc, in_gate, out_gate, d, block_c=None):
  """The Pallas path: out_gate ⊙ (h ∗ (in_gate ⊙ u) + D ⊙ in_gate ⊙ u), each of in_gate, out_gate, d
  optional (None); float32 inside, output in u's dtype; differentiable by a custom VJP."""
  hr, hi = filter_spectrum(h_lc, plan(u.shape[1]))
  return _pallas_forward(u, in_gate, out_gate, hr, hi, d, block_c=block_c, out_dtype=u.dtype)


def _pallas_gated_fwd(u, h_lc, in_gate, out_gate, d, block_c):
  return pallas_gated(u, h_lc, in_gate, out_gate, d, block_c), (u, h_lc, in_gate, out_gate, d)


def _pallas_gated_bwd(block_c, residuals, ybar):
  u, h_lc, in_gate, out_gate, d = residuals
  hr, hi = filter_spectrum(h_lc, plan(u.shape[1]))
  ybar = ybar.astype(jnp.float32)
  # v̄ = corr(h, g_out ⊙ ȳ) + D ⊙ g_out ⊙ ȳ: the forward kernel with the conjugate spectrum.
  vbar = _pallas_forward(ybar, out_gate, None, hr, -hi, d, block_c=block_c, out_dtype=jnp.float32)
  v = _gated_input(u, in_gate)
  zbar = ybar if out_gate is None else ybar * out_gate.astype(jnp.float32)
  ubar = vbar if in_gate is None else vbar * in_gate.astype(jnp.float32)
  g_in_bar = None if in_gate is None else (vbar * u.astype(jnp.float32)).astype(in_gate.dtype)
  g_out_bar = None
  if out_gate is not None:
    z = _pallas_forward(u, in_gate, None, hr, hi, d, block_c=block_c, out_dtype=jnp.float32)
    g_out_bar = (ybar * z).astype(out_gate.dtype)
  h_bar = _correlate_filter_grad(v, zbar, h_lc.shape[0]).astype(h_lc.dtype)
  d_bar = None if d is None else jnp.sum(zbar * v, axis=(0, 1)).astype(d.dtype)
  return ubar.astype(u.dtype), h_bar, g_in_bar, g_out_bar, d_bar


pallas_gated.defvjp(_pallas_gated_fwd, _pallas_gated_bwd)


def pallas_supported(length: int, channels: int, block_c: int | None = None) -> bool:
  """Whether the compiled Pallas path takes this shape on the current backend: anything in interpret mode.
  On TPU (Mosaic): a channel block of a multiple of 128 lanes or all channels. On GPU (Triton, experimental,
  see `_dispatch`): this jax still has Pallas's Triton backend, power-of-two L >= 256 (so that both DFT
  stages are matmuls with every dimension >= 16, as Triton's dot requires) and a power-of-two channel
  block."""
  backend, cb = jax.default_backend(), _dispatch.channel_block(channels, block_c)
  if backend == "tpu":
    return cb % 128 == 0 or cb == channels
  if backend != "gpu":
    return True
  if _dispatch.pallas_gpu_backend() is None:
    return False
  p = plan(length)
  return _power_of_two(length) and _power_of_two(cb) and min(p.m, p.n1) >= 16


def check_pallas_supported(length: int, channels: int, block_c: int | None = None) -> None:
  if jax.default_backend() == "gpu" and _dispatch.pallas_gpu_backend() is None:
    raise ValueError(f"the pallas path on gpu needs Pallas's Triton backend, which jax {jax.__version__} does "
                     "not have; use implementation='xla' (the default)")
  if not pallas_supported(length, channels, block_c):
    raise ValueError(f"the pallas path on {jax.default_backend()} cannot take length {length} with channel "
                     f"block {_dispatch.channel_block(channels, block_c)} (see _fftconv.pallas_supported)")


def _power_of_two(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0
