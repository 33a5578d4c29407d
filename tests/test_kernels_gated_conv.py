"""Spec of the gated convolution core (zoo_jax/ops/gated_conv) and of the Monarch FFT under it (zoo_jax/ops/_fftconv).

    y = out_gate ⊙ (h ∗ (in_gate ⊙ u) + D ⊙ in_gate ⊙ u),   ∗ the causal long convolution

u, in_gate, out_gate (b, l, c), h (l_h <= l, c) float32, D (c,); the gates and D are optional. Every path
(`xla` rfft, `monarch` DFT matmuls, `pallas` the fused kernel, interpreted on CPU, with its custom VJP)
must match the `reference` (Toeplitz, float32) in value and in the gradients with respect to u, h, both
gates and D, for odd and power-of-two lengths and a channel count the Pallas channel block does not divide.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax.ops import _dispatch, _fftconv, gated_conv

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
# monarch and pallas at l = 16 run with -m slow (and pallas in the optional-operand test below).
CASES = [(p, l, l_h) if p == "xla" or l != 16 else pytest.param(p, l, l_h, marks=pytest.mark.slow)
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


def _skip_unless_pallas_takes(path, l):
  """On GPU the compiled kernel takes power-of-two L >= 256 only (the interpreted one takes any L)."""
  if path == "pallas" and not _fftconv.pallas_supported(l, C, BLOCK_C):
    pytest.skip(f"the compiled Pallas path on {jax.default_backend()} does not take L = {l}")


@functools.cache
def _reference(l, l_h, dtype=jnp.float32, present=(True, True, True), exact=False):
  """The reference's value and gradients, once per set of operands (`exact`: on the operands in float32)."""
  operands = _operands(l, l_h, dtype)
  if exact:
    operands = tuple(x.astype(jnp.float32) for x in operands)
  return _value_and_grads(gated_conv.gated_conv_reference, operands, present)


@pytest.mark.parametrize("path,l,l_h", CASES)
def test_paths_match_reference_value_and_gradients(path, l, l_h):
  _skip_unless_pallas_takes(path, l)
  y_ref, g_ref = _reference(l, l_h)
  y, g = _value_and_grads(PATHS[path], _operands(l, l_h))
  chex.assert_shape(y, (B, l, C))
  chex.assert_type(y, jnp.float32)
  _assert_close_to_scale(y, y_ref, FWD_RTOL, f"{path} y")
  for name, a, e in zip(["d/du", "d/dh", "d/d in_gate", "d/d out_gate", "d/dD"], g, g_ref):
    chex.assert_equal_shape([a, e])
    _assert_close_to_scale(a, e, GRAD_RTOL, f"{path} {name}")


# Gates and D absent: the kernel and its VJP take a different set of operands (no out_gate: the
# long_conv tests, which pass D and no gates).
@pytest.mark.parametrize("present", [(False, True, False),
                                     pytest.param((True, False, True), marks=pytest.mark.slow)],
                         ids=["out_gate_only", "in_gate_and_d"])
def test_pallas_with_optional_operands_absent(present):
  _skip_unless_pallas_takes("pallas", 16)
  y_ref, g_ref = _reference(16, 16, present=present)
  y, g = _value_and_grads(PATHS["pallas"], _operands(16, 16), present)
  _assert_close_to_scale(y, y_ref, FWD_RTOL, "y")
  assert len(g) == len(g_ref) == 2 + sum(present)
  for a, e in zip(g, g_ref):
    _assert_close_to_scale(a, e, GRAD_RTOL, "grad")


# bfloat16 u and gates, float32 filter and D: every path computes in float32 and rounds once at the end,
# so against the reference on the same (bfloat16) inputs the output differs by the final rounding only,
# half an ulp (<= 2^-8 of |y|, 8 significand bits) plus float32 FFT round-off (<= 1e-5 of the scale).
# Measured on CPU (L = 16, 33): |y - exact float32 result| <= 2.8e-3 of max|y|, inside 2^-8 |y|, and y
# equal to the reference's bfloat16 output bit for bit on all three paths; gradients within 2.5e-5 of
# their scale. The gradients of u and the gates are rounded once too, from float32 values that differ
# by round-off, so they may land one ulp (2^-7) apart: the bound used. On an accelerator bfloat16 inputs
# run DEFAULT-precision matmuls (TF32 / bf16 passes; see test_compiled_pallas_matches_reference).
@pytest.mark.parametrize("path,l,l_h", [pytest.param("xla", 33, 10, marks=pytest.mark.slow),
                                        pytest.param("monarch", 33, 33, marks=pytest.mark.slow),
                                        ("pallas", 33, 33)])
def test_bfloat16_inputs_with_float32_filter(path, l, l_h):
  _skip_unless_pallas_takes(path, l)
  y_ref, g_ref = _reference(l, l_h, jnp.bfloat16)
  y, g = _value_and_grads(PATHS[path], _operands(l, l_h, jnp.bfloat16))
  chex.assert_type([y, g[0], g[2], g[3]], jnp.bfloat16)
  chex.assert_type([g[1], g[4]], jnp.float32)
  y_exact = np.asarray(_reference(l, l_h, jnp.bfloat16, exact=True)[0], np.float64)
  err = np.abs(np.asarray(y, np.float64) - y_exact)
  bound = 2.0**-8 * np.abs(y_exact) + 1e-5 * np.abs(y_exact).max()
  assert (err <= bound).all(), f"max excess {np.max(err - bound):.3g}"
  _assert_close_to_scale(y, y_ref, 2.0**-8 + 1e-5, "y vs reference")
  for name, a, e in zip(["d/du", "d/dh", "d/d in_gate", "d/d out_gate", "d/dD"], g, g_ref):
    _assert_close_to_scale(a, e, 2.0**-7 + 1e-4, name)


def test_default_is_xla_on_cpu_and_gates_do_what_they_say():
  u, h, g_in, g_out, d = _operands(16, 16)
  op = jax.jit(gated_conv.gated_conv, static_argnames="implementation")
  chex.assert_trees_all_equal(op(u, h, in_gate=g_in, out_gate=g_out, d_c=d),
                              jax.jit(gated_conv.gated_conv_fft)(u, h, g_in, g_out, d))
  # out_gate multiplies the output, in_gate the input; with neither it is the plain convolution.
  plain = np.asarray(op(u, h, implementation="xla"))
  np.testing.assert_allclose(np.asarray(op(u, h, out_gate=g_out, implementation="xla")),
                             plain * np.asarray(g_out), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(op(u, h, in_gate=g_in, implementation="xla")),
                             np.asarray(op(u * g_in, h, implementation="xla")), rtol=1e-6, atol=1e-6)


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


# ----------------------------------------------------------------------------- compiled (not interpreted)


@pytest.mark.parametrize("target", ["tpu", "cuda"])
def test_pallas_kernel_and_its_vjp_lower_for_tpu_and_gpu(target, monkeypatch):
  """Lowering only, no device needed: Mosaic TPU / Triton IR for the forward and backward kernels (what
  runs on the accelerators; interpret mode never exercises these lowerings)."""
  monkeypatch.setattr(_dispatch, "interpret", lambda: False)
  if target == "cuda":
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(_dispatch, "compiler_params", lambda: pltriton.CompilerParams(num_warps=4))
  c, block_c = (256, 128) if target == "tpu" else (32, 16)  # TPU blocks: 128 lanes; Triton: powers of 2
  u = jax.ShapeDtypeStruct((2, 256, c), jnp.bfloat16)
  h = jax.ShapeDtypeStruct((256, c), jnp.float32)
  d = jax.ShapeDtypeStruct((c,), jnp.float32)

  def loss(u_, h_, gi, go, d_):
    return jnp.sum(gated_conv.gated_conv_pallas(u_, h_, gi, go, d_, block_c=block_c).astype(jnp.float32))

  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))).trace(u, h, u, u, d).lower(
      lowering_platforms=(target,)).as_text()
  # Three kernel calls: the forward, and in the backward v̄ (conjugate spectrum) and z (recomputed).
  marker = "custom_call @tpu_custom_call" if target == "tpu" else "custom_call @__gpu$xla.gpu.triton"
  assert text.count(marker) == 3, f"{text.count(marker)} kernels lowered for {target}, expected 3"


@pytest.mark.skipif(jax.default_backend() == "cpu", reason="compiled Pallas needs a GPU or TPU")
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("l", [256, 1024])
def test_compiled_pallas_matches_reference(l, dtype, rtol):
  # On an accelerator bfloat16 inputs run DEFAULT-precision matmuls (TF32 / bf16 passes): 2% of the scale.
  operands = _operands(l, l, dtype, c=32)
  y_ref, g_ref = _value_and_grads(gated_conv.gated_conv_reference, operands)
  y, g = _value_and_grads(gated_conv.gated_conv_pallas, operands)
  _assert_close_to_scale(y, y_ref, rtol, "y")
  for a, e in zip(g, g_ref):
    _assert_close_to_scale(a, e, 10 * rtol, "grad")


# ------------------------------------------------------------------------------------------- Monarch FFT


@pytest.mark.parametrize("l", [1, 7, 16, 33, 97, 1000, 1024, 8192])
def test_plan_factorises_2l_with_little_padding(l):
  p = _fftconv.plan(l)
  assert p.n1 * p.n2 == 2 * p.padded and p.n2 % 2 == 0
  assert l <= p.padded <= max(l, -(-l // 32) * 32)
  # Balanced for lengths with a good factorisation: O(sqrt(N)) per stage, not a dense DFT.
  if l in (1000, 1024, 8192):
    assert max(p.n1, p.n2) <= 2 * np.sqrt(2 * p.padded)


@pytest.mark.parametrize("l", [7, 100])
def test_forward_dft_is_the_zero_padded_fft_in_k2_c_k1_layout(l):
  p = _fftconv.plan(l)
  x = _rand((l, 3), 5)
  xr, xi = _fftconv.forward_dft(x, _fftconv._constants(p), p)
  chex.assert_shape([xr, xi], (p.n2, 3, p.n1))
  full = np.fft.fft(np.asarray(x, np.float64), n=2 * p.padded, axis=0)  # X[k], k = n2·k1 + k2
  expected = full.reshape(p.n1, p.n2, 3).transpose(1, 2, 0)  # [k2, c, k1]
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
