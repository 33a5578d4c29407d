"""Spec of the gated convolution core (kernels/gated_conv) and of the Monarch FFT under it (kernels/_fftconv).

    y = out_gate ⊙ (h ∗ (in_gate ⊙ u) + D ⊙ in_gate ⊙ u),   ∗ the causal long convolution

u, in_gate, out_gate (b, l, c), h (l_h <= l, c) float32, D (c,); the gates and D are optional. Every path
(`xla` rfft, `monarch` DFT matmuls, `pallas` the fused kernel, interpreted on CPU, with its custom VJP)
must match the `reference` (Toeplitz, float32) in value and in the gradients with respect to u, h, both
gates and D, for odd and power-of-two lengths and a channel count the Pallas channel block does not divide.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import _fftconv, gated_conv

B, C = 2, 5
BLOCK_C = 4  # does not divide C: the last channel block is partial
FWD_RTOL = 1e-5  # float32 FFT round-off, measured <= 1e-6 of the output scale at these lengths
GRAD_RTOL = 1e-4

PATHS = {
    "xla": gated_conv.gated_conv_fft,
    "monarch": gated_conv.gated_conv_monarch,
    "pallas": lambda *a: gated_conv.gated_conv_pallas(*a, block_c=BLOCK_C),
}
# (path, l, l_h): odd and power-of-two lengths, a filter shorter than the sequence.
# pallas at l = 16 runs in the optional-operand and bfloat16 tests below.
CASES = [(p, l, l_h) if (p, l) != ("pallas", 16) else pytest.param(p, l, l_h, marks=pytest.mark.slow)
         for p in PATHS for l, l_h in [(7, 7), (16, 5), (33, 33)]]


def _rand(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32).astype(dtype)


def _operands(l, l_h, dtype=jnp.float32, c=C):
  """u, h, in_gate, out_gate, d (u and the gates in `dtype`; h and d float32)."""
  return (_rand((B, l, c), 0, dtype), _rand((l_h, c), 1), _rand((B, l, c), 2, dtype),
          _rand((B, l, c), 3, dtype), _rand((c,), 4))


def _assert_close_to_scale(actual, expected, rtol, msg=""):
  """max |actual - expected| <= rtol * max |expected| (elementwise relative errors blow up where y ~ 0)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  chex.assert_equal_shape([actual, expected])
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= rtol * scale, f"{msg}: max abs err {err:.3g} > {rtol} * scale {scale:.3g}"


def _value_and_grads(fn, operands, present=(True, True, True)):
  """y and the gradients of sum(y * w) with respect to u, h and the present ones of (in_gate, out_gate, d),
  in one compiled call."""
  w = _rand(operands[0].shape, 9)

  def loss(u, h, *optional):
    optional = iter(optional)
    extra = [next(optional) if p else None for p in present]
    y = fn(u, h, *extra)
    return jnp.sum(y.astype(jnp.float32) * w), y

  args = operands[:2] + tuple(x for x, p in zip(operands[2:], present) if p)
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
  return y, grads


@pytest.mark.parametrize("path,l,l_h", CASES)
def test_paths_match_reference_value_and_gradients(path, l, l_h):
  operands = _operands(l, l_h)
  y_ref, g_ref = _value_and_grads(gated_conv.gated_conv_reference, operands)
  y, g = _value_and_grads(PATHS[path], operands)
  chex.assert_shape(y, (B, l, C))
  chex.assert_type(y, jnp.float32)
  _assert_close_to_scale(y, y_ref, FWD_RTOL, f"{path} y")
  for name, a, e in zip(["d/du", "d/dh", "d/d in_gate", "d/d out_gate", "d/dD"], g, g_ref):
    chex.assert_equal_shape([a, e])
    _assert_close_to_scale(a, e, GRAD_RTOL, f"{path} {name}")


# Gates and D absent: the kernel and its VJP take a different set of operands.
@pytest.mark.parametrize("present", [(False, True, False), (True, False, True)],
                         ids=["out_gate_only", "in_gate_and_d"])
def test_pallas_with_optional_operands_absent(present):
  operands = _operands(16, 16)
  y_ref, g_ref = _value_and_grads(gated_conv.gated_conv_reference, operands, present)
  y, g = _value_and_grads(PATHS["pallas"], operands, present)
  _assert_close_to_scale(y, y_ref, FWD_RTOL, "y")
  assert len(g) == len(g_ref) == 2 + sum(present)
  for a, e in zip(g, g_ref):
    _assert_close_to_scale(a, e, GRAD_RTOL, "grad")


# bfloat16 u and gates, float32 filter and D: every path computes in float32 and rounds once at the end,
# so against the reference on the same (bfloat16) inputs the output differs by the final rounding only,
# half an ulp (2^-8 relative, 8 significand bits) plus float32 FFT round-off (<= 1e-5 of the scale);
# measured <= 2^-9 of |y| + 3e-7 of the scale here. The gradients of u and the gates are rounded once
# too, from float32 values that already differ by round-off, so they may land one ulp (2^-7) apart.
@pytest.mark.parametrize("path,l,l_h", [pytest.param("xla", 33, 10, marks=pytest.mark.slow),
                                        ("monarch", 33, 10), ("pallas", 16, 16)])
def test_bfloat16_inputs_with_float32_filter(path, l, l_h):
  operands = _operands(l, l_h, jnp.bfloat16)
  y_ref, g_ref = _value_and_grads(gated_conv.gated_conv_reference, operands)
  y, g = _value_and_grads(PATHS[path], operands)
  chex.assert_type([y, g[0], g[2], g[3]], jnp.bfloat16)
  chex.assert_type([g[1], g[4]], jnp.float32)
  y_exact = np.asarray(_value_and_grads(gated_conv.gated_conv_reference,
                                        tuple(x.astype(jnp.float32) for x in operands))[0], np.float64)
  err = np.abs(np.asarray(y, np.float64) - y_exact)
  bound = 2.0**-8 * np.abs(y_exact) + 1e-5 * np.abs(y_exact).max()
  assert (err <= bound).all(), f"max excess {np.max(err - bound):.3g}"
  _assert_close_to_scale(y, y_ref, 2.0**-8 + 1e-5, "y vs reference")
  for name, a, e in zip(["d/du", "d/dh", "d/d in_gate", "d/d out_gate", "d/dD"], g, g_ref):
    _assert_close_to_scale(a, e, 2.0**-7 + 1e-4, name)


def test_default_is_xla_on_cpu_and_gates_do_what_they_say():
  u, h, g_in, g_out, d = _operands(16, 16)
  chex.assert_trees_all_equal(gated_conv.gated_conv(u, h, in_gate=g_in, out_gate=g_out, d_c=d),
                              gated_conv.gated_conv_fft(u, h, g_in, g_out, d))
  # out_gate multiplies the output, in_gate the input; with neither it is the plain convolution.
  plain = np.asarray(gated_conv.gated_conv(u, h, implementation="reference"))
  gated = np.asarray(gated_conv.gated_conv(u, h, out_gate=g_out, implementation="reference"))
  np.testing.assert_allclose(gated, plain * np.asarray(g_out), rtol=1e-6, atol=1e-6)
  pre = np.asarray(gated_conv.gated_conv(u * g_in, h, implementation="reference"))
  np.testing.assert_allclose(np.asarray(gated_conv.gated_conv(u, h, in_gate=g_in, implementation="reference")),
                             pre, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(implementation="fused"), "implementation must be one of None, 'reference', 'xla', 'monarch', 'pallas'"),
    (dict(in_gate=np.zeros((B, 16, C + 1), np.float32)), "in_gate must have u's shape"),
    (dict(out_gate=np.zeros((B, 15, C), np.float32)), "out_gate must have u's shape"),
    (dict(d_c=np.zeros((C, 1), np.float32)), "d must have shape"),
])
def test_bad_arguments_are_one_line_value_errors(kwargs, message):
  u, h = np.zeros((B, 16, C), np.float32), np.zeros((16, C), np.float32)
  with pytest.raises(ValueError, match=message):
    gated_conv.gated_conv(u, h, **kwargs)


# ------------------------------------------------------------------------------------------- Monarch FFT


@pytest.mark.parametrize("l", [1, 7, 16, 33, 97, 1000, 1024, 8192])
def test_plan_factorises_2l_with_little_padding(l):
  p = _fftconv.plan(l)
  assert p.n1 * p.n2 == 2 * p.padded and p.n2 % 2 == 0
  assert l <= p.padded <= max(l, -(-l // 32) * 32)
  # Balanced for lengths with a good factorisation: O(sqrt(N)) per stage, not a dense DFT.
  if l in (1000, 1024, 8192):
    assert max(p.n1, p.n2) <= 2 * np.sqrt(2 * p.padded)


@pytest.mark.parametrize("l", [7, 16, 33, 100])
def test_forward_dft_is_the_zero_padded_fft_in_k2_k1_order(l):
  p = _fftconv.plan(l)
  x = _rand((l, 3), 5)
  xr, xi = _fftconv.forward_dft(x, _fftconv._constants(p), p)
  chex.assert_shape([xr, xi], (p.n2, p.n1, 3))
  full = np.fft.fft(np.asarray(x, np.float64), n=2 * p.padded, axis=0)  # X[k], k = n2·k1 + k2
  expected = full.reshape(p.n1, p.n2, 3).transpose(1, 0, 2)  # [k2, k1]
  scale = np.abs(full).max()
  assert np.abs(np.asarray(xr) - expected.real).max() <= 1e-5 * scale
  assert np.abs(np.asarray(xi) - expected.imag).max() <= 1e-5 * scale


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("l,l_h,c", [(64, 64, 130), (100, 37, 9), (128, 128, 7)])
def test_paths_match_reference_on_larger_shapes(path, l, l_h, c):
  operands = _operands(l, l_h, c=c)
  fn = PATHS[path] if path != "pallas" else gated_conv.gated_conv_pallas  # default channel block (128)
  y_ref, g_ref = _value_and_grads(gated_conv.gated_conv_reference, operands)
  y, g = _value_and_grads(fn, operands)
  _assert_close_to_scale(y, y_ref, FWD_RTOL, "y")
  for a, e in zip(g, g_ref):
    _assert_close_to_scale(a, e, GRAD_RTOL, "grad")
