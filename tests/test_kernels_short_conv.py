"""Spec of the short depthwise causal convolution (zoo_jax/ops/short_conv) and of `layers.ShortConvolution`.

    y[t] = act(b + Σ_{j<k} w[j] ⊙ u[t - (k-1) + j]),   act ∈ {None, 'silu'}

u (b, l, c), w (k, c), b (c,) optional. The `xla` and `pallas` (interpreted on CPU, custom VJP) paths must
match the float32 `reference` in value and in the gradients with respect to u, w and b; the layer must
compute exactly what it computed before it went through the dispatcher (other mixers depend on it).
"""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax.ops import _dispatch, short_conv
from zoo_jax import layers

B, C = 2, 5
BLOCK_C = 4  # does not divide C
RTOL = 1e-6  # k float32 products and a bias: a few ulps of the scale


def _rand(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32).astype(dtype)


def _assert_close_to_scale(actual, expected, rtol, msg=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  chex.assert_equal_shape([actual, expected])
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= rtol * scale, f"{msg}: max abs err {err:.3g} > {rtol} * scale {scale:.3g}"


PATHS = {
    "xla": short_conv.short_conv_xla,
    "pallas": lambda *a: short_conv.short_conv_pallas(*a, block_c=BLOCK_C),
}


def _value_and_grads(fn, u, w, b, activation):
  cot = _rand(u.shape, 9)

  def loss(u_, w_, b_):
    y = fn(u_, w_, b_, activation)
    return jnp.sum(y.astype(jnp.float32) * cot), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(u, w, b)
  return y, grads


# (k, l): Zoology's and Mamba's widths, odd and power-of-two lengths, and a kernel wider than the sequence.
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("k,l,activation", [(2, 7, None), (3, 16, "silu"), (4, 3, "silu"),
                                            pytest.param(4, 33, None, marks=pytest.mark.slow)])
def test_paths_match_reference_value_and_gradients(path, k, l, activation):
  if path == "pallas" and not short_conv.pallas_supported(C, BLOCK_C):
    pytest.skip(f"the compiled Pallas short conv on {jax.default_backend()} does not take this block")
  u, w, b = _rand((B, l, C), 0), _rand((k, C), 1), _rand((C,), 2)
  y_ref, g_ref = _value_and_grads(short_conv.short_conv_reference, u, w, b, activation)
  y, g = _value_and_grads(PATHS[path], u, w, b, activation)
  chex.assert_type(y, jnp.float32)
  _assert_close_to_scale(y, y_ref, RTOL, "y")
  for name, a, e in zip(["d/du", "d/dw", "d/db"], g, g_ref):
    _assert_close_to_scale(a, e, 10 * RTOL, name)


def test_pallas_kernel_and_its_vjp_lower_for_tpu(monkeypatch):
  """Lowering only, no TPU needed: Mosaic for the forward and the two backward kernel calls (SiLU's
  pre-activation and ū). Triton has no slice, so on GPU 'pallas' runs 'xla' (see zoo_jax/ops/short_conv)."""
  monkeypatch.setattr(_dispatch, "interpret", lambda: False)
  u = jax.ShapeDtypeStruct((2, 64, 256), jnp.bfloat16)
  w, b = jax.ShapeDtypeStruct((4, 256), jnp.float32), jax.ShapeDtypeStruct((256,), jnp.float32)
  loss = lambda *a: jnp.sum(short_conv.short_conv_pallas(*a, "silu").astype(jnp.float32))
  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(u, w, b).lower(
      lowering_platforms=("tpu",)).as_text()
  assert text.count("custom_call @tpu_custom_call") == 3


def test_reference_matches_the_definition():
  u, w, b = _rand((B, 9, C), 0), _rand((3, C), 1), _rand((C,), 2)
  un, wn, bn = (np.asarray(x, np.float64) for x in (u, w, b))
  expected = np.zeros((B, 9, C)) + bn
  for t in range(9):
    for j in range(3):
      if t - 2 + j >= 0:
        expected[:, t] += wn[j] * un[:, t - 2 + j]
  np.testing.assert_allclose(np.asarray(short_conv.short_conv_reference(u, w, b)), expected, rtol=1e-5,
                             atol=1e-6)
  silu = expected / (1 + np.exp(-expected))
  np.testing.assert_allclose(np.asarray(short_conv.short_conv_reference(u, w, b, "silu")), silu, rtol=1e-5,
                             atol=1e-6)


def _layer_before_the_dispatcher(conv: layers.ShortConvolution, u_bld):
  """ShortConvolution.__call__ as it was written before zoo_jax/ops/short_conv existed."""
  k = conv.kernel_size
  w_kc = conv.w_kc[...].astype(conv.dtype)
  padded = jnp.pad(u_bld, ((0, 0), (k - 1, 0), (0, 0)))
  y_bld = sum(padded[:, j:j + u_bld.shape[1]] * w_kc[j] for j in range(k))
  return y_bld + conv.b_c[...].astype(conv.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_default_is_bit_identical_to_its_old_numerics_and_keeps_its_parameters(dtype):
  conv = layers.ShortConvolution(C, 4, rngs=nnx.Rngs(0), dtype=dtype)
  u = _rand((B, 11, C), 3, dtype)
  chex.assert_trees_all_equal(conv(u), _layer_before_the_dispatcher(conv, u))
  params = nnx.state(conv, nnx.Param).flat_state()
  assert {"/".join(map(str, path)): v.shape for path, v in params} == {"w_kc": (4, C), "b_c": (C,)}


@pytest.mark.parametrize("implementation", ["reference", "pallas"])
def test_layer_implementations_agree(implementation):
  fast = layers.ShortConvolution(C, 3, rngs=nnx.Rngs(0), activation="silu")
  other = layers.ShortConvolution(C, 3, rngs=nnx.Rngs(0), activation="silu", implementation=implementation)
  u = _rand((B, 10, C), 4)
  _assert_close_to_scale(jax.jit(other.__call__)(u), fast(u), RTOL, implementation)


def test_layer_step_applies_the_fused_activation():
  conv = layers.ShortConvolution(C, 3, rngs=nnx.Rngs(0), activation="silu")
  u = _rand((B, 6, C), 5)
  state = conv.init_state(B)
  steps = []
  for t in range(6):
    state, y = conv.step(state, u[:, t])
    steps.append(y)
  _assert_close_to_scale(jnp.stack(steps, axis=1), conv(u), RTOL, "step vs call")
  assert float(jnp.min(conv(u))) >= -0.2785  # SiLU's minimum: the activation is there


@pytest.mark.parametrize("kwargs,message", [
    (dict(implementation="monarch"), "implementation must be one of None, 'reference', 'xla', 'pallas'"),
    (dict(activation="gelu"), "activation must be one of"),
    (dict(b_c=np.zeros((C + 1,), np.float32)), "b must have shape"),
    (dict(w_kc=np.zeros((3, C + 1), np.float32)), "short_conv expects"),
])
def test_bad_arguments_are_one_line_value_errors(kwargs, message):
  args = dict(u_blc=np.zeros((B, 8, C), np.float32), w_kc=np.zeros((3, C), np.float32)) | kwargs
  with pytest.raises(ValueError, match=message):
    short_conv.short_conv(**args)
