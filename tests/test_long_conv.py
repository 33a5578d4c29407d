"""Spec of the causal long convolution op (zoo_jax/ops/long_conv), y[t] = sum_{s<=t} h[t-s] * u[s] (+ D u[t])
per channel.

Shapes: u (b, l, c), h (l_h <= l, c), D (c,) optional; the output has u's shape and u's dtype. The
`reference` path (an O(l^2) Toeplitz matmul in float32) is the ground truth; the `xla` (rfft, n = 2l),
`monarch` (DFT matmuls) and `pallas` (the fused kernel, interpreted on CPU) paths must match it in value
and gradient, for odd and power-of-two lengths and for filters shorter than the sequence. The Pallas path
is slow interpreted, so it runs on fewer shapes here (its gated form is swept in test_kernels_gated_conv).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax.ops import long_conv

B, C = 3, 5
IMPLEMENTATIONS = ["reference", "xla", "monarch", "pallas"]  # None (the default) is checked below
FAST = ["xla", "monarch"]  # swept over every shape; pallas over PALLAS_SHAPES

# (l, l_h): odd and power-of-two sequence lengths, full-length and shorter filters.
SHAPES = [(7, 7), (7, 3), (16, 16), (16, 5), (33, 33), (33, 10)]
PALLAS_SHAPES = [(33, 10)]  # interpreted Pallas compiles slowly; tests/test_kernels_gated_conv sweeps it
MONARCH_SHAPES = [(7, 3), (33, 33)]  # each compile takes ~1 s; the rest run with -m slow
FAST_CASES = ([("xla", *s) for s in SHAPES] + [("monarch", *s) for s in MONARCH_SHAPES]
              + [pytest.param("monarch", *s, marks=pytest.mark.slow) for s in SHAPES if s not in MONARCH_SHAPES]
              + [("pallas", *s) for s in PALLAS_SHAPES])

# float32 FFT vs float32 Toeplitz matmul: both are float32 sums of O(l) terms; the FFT's round-off is
# ~eps * log2(2l) * scale (measured <= 4e-7 of max|y| at l = 33). 1e-5 of the output scale leaves >10x
# headroom while still catching any indexing or padding error (those are O(1) of the scale).
FWD_RTOL = 1e-5
GRAD_RTOL = 1e-4

# Everything numeric runs under jit: op-by-op dispatch of the Toeplitz/FFT code and its VJP is ~10x
# slower on CPU than compiling it once.
conv = jax.jit(long_conv.causal_conv, static_argnames="implementation")
conv_reference = jax.jit(long_conv.causal_conv_reference)


def _inputs(l, l_h, seed=0, dtype=jnp.float32):
    # numpy draws: eager jax.random would compile a kernel per shape.
    rng = np.random.default_rng(seed)
    u = jnp.asarray(rng.standard_normal((B, l, C)), jnp.float32).astype(dtype)
    h = jnp.asarray(rng.standard_normal((l_h, C)), jnp.float32)
    return u, h


def _assert_close_to_scale(actual, expected, rtol, msg=""):
    """max |actual - expected| <= rtol * max |expected|: relative to the output scale, not elementwise
    (an elementwise relative bound is meaningless at outputs that cancel to ~0)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    chex.assert_equal_shape([actual, expected])
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"{msg} max abs err {err:.3g} > {rtol} * scale {scale:.3g}"


def _naive(u, h):
    """Direct numpy double loop of the definition, in float64."""
    u = np.asarray(u, np.float64)
    h = np.asarray(h, np.float64)
    b, l, c = u.shape
    y = np.zeros((b, l, c))
    for t in range(l):
        for s in range(max(0, t - h.shape[0] + 1), t + 1):
            y[:, t] += h[t - s] * u[:, s]
    return y


@pytest.mark.parametrize("l,l_h", [(7, 3), (16, 16)])
def test_reference_matches_the_definition(l, l_h):
    u, h = _inputs(l, l_h)
    y = conv_reference(u, h)
    chex.assert_shape(y, (B, l, C))
    chex.assert_type(y, jnp.float32)
    np.testing.assert_allclose(np.asarray(y), _naive(u, h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["reference", *FAST])
def test_delta_filter_is_identity_and_shifted_delta_is_a_delay(implementation):
    u, _ = _inputs(9, 1)
    identity = np.ones((1, C), np.float32)
    y = np.asarray(conv(u, identity, implementation=implementation))
    u = np.asarray(u)
    chex.assert_trees_all_close(y, u, atol=1e-6)

    delay = np.zeros((3, C), np.float32)
    delay[1] = 1.0  # h[1] = 1: y[t] = u[t-1], y[0] = 0
    y = np.asarray(conv(u, delay, implementation=implementation))
    chex.assert_trees_all_close(y[:, 1:], u[:, :-1], atol=1e-6)
    chex.assert_trees_all_close(y[:, 0], np.zeros((B, C), np.float32), atol=1e-6)


def _value_and_grads(implementation, u, h, d, w):
    """y and d(sum(y * w))/d(u, h, D), in one compiled call (one compile per path and shape)."""
    def loss(u_, h_, d_):
        y = long_conv.causal_conv(u_, h_, d_, implementation=implementation)
        return jnp.sum(y * w), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(u, h, d)
    return y, grads


@functools.cache
def _value_and_grads_at(implementation, l, l_h):
    u, h = _inputs(l, l_h)
    d = jnp.asarray(np.random.default_rng(3).standard_normal(C), jnp.float32)
    w = jnp.asarray(np.random.default_rng(7).standard_normal((B, l, C)), jnp.float32)  # a cotangent
    return _value_and_grads(implementation, u, h, d, w)


@pytest.mark.parametrize("implementation,l,l_h", FAST_CASES)
def test_fast_paths_match_reference_value_and_gradients(implementation, l, l_h):
    h_shape = (l_h, C)
    y_ref, (gu_ref, gh_ref, gd_ref) = _value_and_grads_at("reference", l, l_h)  # computed once per shape
    y, (gu, gh, gd) = _value_and_grads_at(implementation, l, l_h)
    chex.assert_shape([y_ref, y, gu, gu_ref], (B, l, C))
    chex.assert_shape([gh_ref, gh], h_shape)
    chex.assert_type([y_ref, y], jnp.float32)
    _assert_close_to_scale(y, y_ref, FWD_RTOL, f"{implementation} vs reference")
    _assert_close_to_scale(gu, gu_ref, GRAD_RTOL, "d/du")
    _assert_close_to_scale(gh, gh_ref, GRAD_RTOL, "d/dh")
    _assert_close_to_scale(gd, gd_ref, GRAD_RTOL, "d/dD")


@pytest.mark.parametrize("implementation", FAST)
def test_fast_paths_without_skip(implementation):
    u, h = _inputs(16, 5)
    _assert_close_to_scale(conv(u, h, implementation=implementation), conv_reference(u, h), FWD_RTOL)


def test_skip_adds_d_times_u():
    u, h = _inputs(16, 5)
    d = np.arange(1, C + 1, dtype=np.float32)
    y = np.asarray(conv(u, h, d, implementation="reference"))
    np.testing.assert_allclose(y - np.asarray(conv(u, h, implementation="reference")), d * np.asarray(u),
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("l,l_h", SHAPES)
def test_default_implementation_is_xla_on_cpu(l, l_h):
    u, h = _inputs(l, l_h)
    chex.assert_trees_all_equal(conv(u, h), conv(u, h, implementation="xla"))


@pytest.mark.parametrize("implementation", ["reference", *FAST])
@pytest.mark.parametrize("l,l_h", [(7, 7), (33, 33)])
def test_future_inputs_do_not_reach_the_past(implementation, l, l_h):
    u, h = _inputs(l, l_h)
    y = np.asarray(conv(u, h, implementation=implementation))
    t = l // 2
    u2 = np.array(u)
    u2[:, t + 1:] += 100.0
    y2 = np.asarray(conv(u2, h, implementation=implementation))
    # The reference is a masked matmul: exactly causal. The FFT mixes every position into every
    # frequency, so the past moves by round-off only: <= 1e-6 of the output scale (measured ~1e-7).
    tol = 0.0 if implementation == "reference" else 1e-6 * np.abs(y2).max()
    assert np.abs(y2[:, :t + 1] - y[:, :t + 1]).max() <= tol
    assert np.abs(y2[:, t + 1:] - y[:, t + 1:]).max() > 1.0  # and the future does move


@pytest.mark.parametrize("implementation,l,l_h",
                         [(i, *s) for i in ["reference", *FAST] for s in [(7, 3), (33, 10)]] + [("pallas", 16, 5)])
def test_bfloat16_input_with_float32_filter(implementation, l, l_h):
    u, h = _inputs(l, l_h, dtype=jnp.bfloat16)
    y = conv(u, h, implementation=implementation)
    chex.assert_shape(y, (B, l, C))
    chex.assert_type(y, jnp.bfloat16)
    ref = np.asarray(conv_reference(u.astype(jnp.float32), h), np.float64)
    err = np.abs(np.asarray(y, np.float64) - ref)
    # The computation is float32 inside; only the final cast to bfloat16 rounds, by at most half an ulp:
    # 2^-8 of |y| (8 significand bits). Plus the float32 FFT round-off (<= 1e-5 of the scale, above).
    # Every path, Monarch and Pallas included, meets this on CPU (float32 matmuls there are exact float32).
    bound = 2.0**-8 * np.abs(ref) + 1e-5 * np.abs(ref).max()
    assert (err <= bound).all(), f"max excess {np.max(err - bound):.3g}"
    # Against the float32 computation on the unrounded input, the input's bfloat16 rounding adds
    # sum_s |h||u| 2^-8 of error; measured <= 0.6% of max|y| here, bound 2% of the scale.
    u32, _ = _inputs(l, l_h)
    _assert_close_to_scale(y, conv_reference(u32, h), 2e-2, "bf16 vs f32")


def test_float32_input_with_bfloat16_filter_gives_float32():
    u, h = _inputs(16, 4)
    y = conv(u, h.astype(jnp.bfloat16))
    chex.assert_type(y, jnp.float32)


BAD_SHAPES = [
    pytest.param((16, C), (16, C), id="u_2d"),
    pytest.param((B, 16, C, 1), (16, C), id="u_4d"),
    pytest.param((B, 16, C), (16,), id="h_1d"),
    pytest.param((B, 16, C), (16, C, 1), id="h_3d"),
    pytest.param((B, 16, C), (16, C + 1), id="channel_mismatch"),
    pytest.param((B, 16, C), (17, C), id="filter_longer_than_sequence"),
]
BAD_MESSAGES = "causal_conv expects|exceeds sequence length|d must have shape"


@pytest.mark.parametrize("implementation", [None, *IMPLEMENTATIONS])
@pytest.mark.parametrize("u_shape,h_shape", BAD_SHAPES)
def test_bad_shapes_raise_value_error(implementation, u_shape, h_shape):
    with pytest.raises(ValueError, match=BAD_MESSAGES):
        long_conv.causal_conv(np.zeros(u_shape, np.float32), np.zeros(h_shape, np.float32),
                              implementation=implementation)


@pytest.mark.parametrize("implementation", [None, *IMPLEMENTATIONS])
def test_skip_of_the_wrong_shape_raises_value_error(implementation):
    u, h = _inputs(8, 8)
    with pytest.raises(ValueError, match="d must have shape"):
        long_conv.causal_conv(u, h, np.zeros((C + 1,), np.float32), implementation=implementation)


@pytest.mark.parametrize("name", ["triton", "XLA", "", "fft"])
def test_unknown_implementation_raises_value_error(name):
    u, h = _inputs(8, 8)
    with pytest.raises(ValueError, match="implementation must be one of None, 'reference', 'xla', 'monarch'"):
        long_conv.causal_conv(u, h, implementation=name)
