"""RWKV-4 time mixing (`zoo_jax.mixers.rwkv`) against naive float64 references.

The shared spec (tests/test_mixers.py) checks shapes, dtypes, causality, gradients and recurrent ≡ parallel
at the defaults; here: the WKV formula itself, its stability for large keys in float32 and bfloat16, the
whole mixer against a token-by-token float64 reference, Zoology's init, both parallel forms, prefill in
pieces from the state (WKV sums and token shift) against one pass, the state size and the hyperparameter
errors.
"""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import mixers
from zoo_jax.mixers import rwkv

IMPLEMENTATIONS = rwkv.IMPLEMENTATIONS


def naive_wkv(w_d, u_d, k_bld, v_bld) -> np.ndarray:
  """The RWKV-4 WKV by its definition, O(l²), float64, no stabilisation."""
  w_d, u_d, k_bld, v_bld = (np.asarray(a, np.float64) for a in (w_d, u_d, k_bld, v_bld))
  y = np.zeros_like(v_bld)
  for t in range(k_bld.shape[1]):
    lags = (t - 1 - np.arange(t))[:, None]  # (i < t, 1)
    past = np.exp(lags * w_d + k_bld[:, :t])  # (b, t, d)
    now = np.exp(u_d + k_bld[:, t])
    y[:, t] = ((past * v_bld[:, :t]).sum(1) + now * v_bld[:, t]) / (past.sum(1) + now)
  return y


def random_wkv_inputs(b, l, d, *, k_scale, seed=0):
  rng = np.random.default_rng(seed)
  w = -np.exp(rng.uniform(-5, 3, d))  # the range of Zoology's init of time_decay
  u = rng.uniform(-2, 1, d)
  k = rng.uniform(-k_scale, k_scale, (b, l, d))
  v = rng.standard_normal((b, l, d))
  return w, u, k, v


_wkv = jax.jit(rwkv.wkv, static_argnames="implementation")
WKV_SHAPE = (2, 19, 8)  # one shape for every WKV test: one compilation per implementation and dtype


def _f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_wkv_is_the_naive_formula(implementation):
  w, u, k, v = random_wkv_inputs(*WKV_SHAPE, k_scale=3)
  y = _wkv(*_f32(w, u, k, v), implementation=implementation)
  chex.assert_trees_all_close(np.asarray(y, np.float64), naive_wkv(w, u, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_wkv_is_stable_for_large_keys(implementation, dtype):
  """Keys in ±60: e^k reaches 1e26 (far past bfloat16's and float16's range); the sums stay finite and
  exact, because WKV runs in float32 with a running maximum. The reference is fed the same rounded keys."""
  w, u, k, v = random_wkv_inputs(*WKV_SHAPE, k_scale=60, seed=1)
  k, v = (np.asarray(jnp.asarray(a, dtype), np.float64) for a in (k, v))  # round to the input dtype
  y = _wkv(*_f32(w, u), jnp.asarray(k, dtype), jnp.asarray(v, dtype), implementation=implementation)
  assert y.dtype == jnp.float32
  assert np.isfinite(np.asarray(y)).all()
  chex.assert_trees_all_close(np.asarray(y, np.float64), naive_wkv(w, u, k, v), atol=1e-5, rtol=1e-5)


def softmax_wkv(w_d, u_d, k_bld, v_bld):
  """WKV written as causal softmax attention over per-channel logits, plain jnp (differentiable):
  logit[t, i] = (t-1-i)·w + k_i for i < t, u + k_t for i = t."""
  l = k_bld.shape[1]
  t, i = np.arange(l)[:, None], np.arange(l)[None, :]
  logits_blld = jnp.where((i < t)[None, :, :, None],
                          (t - 1 - i)[None, :, :, None] * w_d + k_bld[:, None], u_d + k_bld[:, :, None])
  logits_blld = jnp.where((i <= t)[None, :, :, None], logits_blld, -jnp.inf)
  return jnp.einsum("btid,bid->btd", jax.nn.softmax(logits_blld, axis=2), v_bld)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_wkv_gradients_match_a_softmax_reference(implementation):
  """Gradients w.r.t. w, u, k and v; the associative form stops the gradient of its running maximum,
  which is right only because the result does not depend on it."""
  inputs = _f32(*random_wkv_inputs(*WKV_SHAPE, k_scale=3, seed=3))
  cotangent = jnp.asarray(np.random.default_rng(4).standard_normal(WKV_SHAPE), jnp.float32)
  grads = [jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=(0, 1, 2, 3)))(*inputs)
           for fn in (lambda *a: rwkv.wkv(*a, implementation), softmax_wkv)]
  chex.assert_trees_all_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_wkv_and_its_gradient_ignore_a_huge_shift_of_every_key(implementation):
  """WKV is invariant to k -> k + c (numerator and denominator both scale by e^c); at c = 1000, e^k
  overflows even float64, so this holds only if no unnormalised exponential is ever formed."""
  w, u, k, v = _f32(*random_wkv_inputs(1, 17, 4, k_scale=5, seed=2))
  loss = lambda k_, v_: jnp.sum(rwkv.wkv(w, u, k_, v_, implementation) ** 2)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  (value, grads), (value_shifted, grads_shifted) = grad(k, v), grad(k + 1000, v)
  assert np.isfinite(value_shifted) and all(np.isfinite(g).all() for g in grads_shifted)
  # float32 keys near 1000 carry an absolute rounding of 6e-5: the shifted keys differ by that much.
  chex.assert_trees_all_close((value_shifted, grads_shifted), (value, grads), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_wkv_continues_from_the_sums_of_a_prefix(implementation):
  """Keys in ±60: the WKV of x[:, 7:] from the sums after x[:, :7] is the whole WKV's tail, and the sums
  after both pieces are the one-pass sums (the same running maximum, so the same (a, b, p))."""
  w, u, k, v = _f32(*random_wkv_inputs(*WKV_SHAPE, k_scale=60, seed=5))
  run = jax.jit(rwkv.wkv_from, static_argnames="implementation")
  y_head, sums_head = run(w, u, k[:, :7], v[:, :7], implementation=implementation)
  y_tail, sums = run(w, u, k[:, 7:], v[:, 7:], implementation=implementation, initial_sums=sums_head)
  y_all, sums_all = run(w, u, k, v, implementation="scan")  # the token recurrence `step` runs
  chex.assert_trees_all_close(np.concatenate([y_head, y_tail], axis=1), naive_wkv(w, u, k, v), atol=1e-5,
                              rtol=1e-5)
  chex.assert_trees_all_close(y_tail, y_all[:, 7:], atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(sums, sums_all, atol=1e-5, rtol=1e-5)


def _build(layer_idx=0, n_layers=2, d_model=8, seq_len=16, **hparams):
  return mixers.build({"name": "rwkv", **hparams}, d_model=d_model, seq_len=seq_len, layer_idx=layer_idx,
                      n_layers=n_layers, rngs=nnx.Rngs(3))


def naive_time_mixing(module, x_bld) -> np.ndarray:
  """The whole mixer token by token in float64 from the module's parameters: token shift, k/v/r, WKV."""
  p = {name: np.asarray(getattr(module, name)[...], np.float64) for name in
       ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r")}
  kernel = {name: np.asarray(getattr(module, name).kernel[...], np.float64)
            for name in ("key", "value", "receptance", "output")}
  x = np.asarray(x_bld, np.float64)
  x_prev = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
  mixed = {c: x * p[f"time_mix_{c}"] + x_prev * (1 - p[f"time_mix_{c}"]) for c in "kvr"}
  k, v, r = mixed["k"] @ kernel["key"], mixed["v"] @ kernel["value"], mixed["r"] @ kernel["receptance"]
  wkv_ = naive_wkv(-np.exp(p["time_decay"]), p["time_first"], k, v)
  return (wkv_ / (1 + np.exp(-r))) @ kernel["output"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_parallel_and_recurrent_forms_are_the_naive_time_mixing(implementation):
  """A later layer (its own init), 37 positions."""
  module = _build(layer_idx=2, n_layers=4, seq_len=37, parallel_implementation=implementation)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 37, 8)) * 3, jnp.float32)

  def recurrent(m, x_bld):
    _, y_lbd = jax.lax.scan(m.step, m.init_state(x_bld.shape[0]), jnp.swapaxes(x_bld, 0, 1))
    return jnp.swapaxes(y_lbd, 0, 1)

  out, out_recurrent = nnx.jit(lambda m, x_: (m(x_), recurrent(m, x_)))(module, x)
  expected = naive_time_mixing(module, x)
  atol = 1e-5 * np.abs(expected).max()
  chex.assert_trees_all_close(np.asarray(out, np.float64), expected, atol=atol)
  chex.assert_trees_all_close(np.asarray(out_recurrent, np.float64), expected, atol=atol)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_prefill_in_pieces_is_the_whole_sequence(implementation):
  """The parallel form over x[:, :1], x[:, 1:15], x[:, 15:] (each from the state the previous returned)
  is one pass over x, and its final state (last input, sums) is the token recurrence's."""
  module = _build(layer_idx=1, n_layers=3, seq_len=37, parallel_implementation=implementation)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 37, 8)) * 3, jnp.float32)

  def run(m, x_bld):
    state, ys = None, []
    for start, stop in [(0, 1), (1, 15), (15, 37)]:
      y, state = m(x_bld[:, start:stop], state=state, return_state=True)
      ys.append(y)
    steps_state = jax.lax.scan(m.step, m.init_state(x_bld.shape[0]), jnp.swapaxes(x_bld, 0, 1))[0]
    return jnp.concatenate(ys, axis=1), state, m(x_bld), steps_state

  y, state, out, steps_state = nnx.jit(run)(module, x)
  chex.assert_trees_all_close(y, out, atol=1e-5 * float(np.abs(out).max()))
  chex.assert_trees_all_equal_shapes_and_dtypes(state, steps_state)
  chex.assert_trees_all_close(state, steps_state, atol=1e-5, rtol=1e-5)


def test_zoology_fancy_init():
  d = 8
  first_layer, last_layer = _build(0, 3, d), _build(2, 3, d)
  c = np.arange(d)
  first_layer_decay = np.asarray(first_layer.time_decay[...])
  # time_decay spans [-5, 3], convex in the channel, more so in later layers.
  np.testing.assert_allclose(first_layer_decay[[0, -1]], [-5, 3], atol=1e-6)
  np.testing.assert_allclose(first_layer_decay, -5 + 8 * (c / 7) ** 0.7, rtol=1e-6)
  np.testing.assert_allclose(last_layer.time_decay[...], -5 + 8 * (c / 7) ** 2.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(first_layer.time_first[...])[:4] - np.log(0.3), [0, 0.5, -0.5, 0], atol=1e-6)
  # Layer 0: r1 = 1, r0 = 0, so μ_k = μ_v = c/d and μ_r = sqrt(c/d).
  np.testing.assert_allclose(first_layer.time_mix_k[...], c / d, atol=1e-7)
  np.testing.assert_allclose(first_layer.time_mix_v[...], c / d, atol=1e-7)
  np.testing.assert_allclose(first_layer.time_mix_r[...], np.sqrt(c / d), atol=1e-7)
  # Layer 2 of 3: r1 = 1/3, r0 = 1.
  np.testing.assert_allclose(last_layer.time_mix_v[...], (c / d) ** (1 / 3) + 0.3, atol=1e-6)
  # Projections: PyTorch's nn.Linear default, U(±1/sqrt(d)), no bias.
  kernel = np.asarray(first_layer.key.kernel[...])
  assert first_layer.key.bias is None and np.abs(kernel).max() <= 1 / np.sqrt(d)
  assert np.abs(kernel).max() > 0.8 / np.sqrt(d)


def test_bfloat16_mixer_is_finite_and_close_on_large_inputs():
  """Inputs scaled so the keys reach tens: the bfloat16 mixer stays finite and near the float32 one
  (measured 1.7% of max|out|: bfloat16 rounds the keys by up to 2^-9 relative before e^k)."""
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 16, 8)) * 30, jnp.float32)
  outs = [nnx.jit(lambda m, x_: m(x_))(
      mixers.build({"name": "rwkv"}, d_model=8, seq_len=16, layer_idx=0, n_layers=2, rngs=nnx.Rngs(3),
                   dtype=dtype), x.astype(dtype)) for dtype in (jnp.float32, jnp.bfloat16)]
  out32, out16 = (np.asarray(o, np.float64) for o in outs)
  assert np.isfinite(out16).all()
  assert np.abs(out16 - out32).max() <= 0.05 * np.abs(out32).max()


def test_state_size_is_4d():
  for d_model, seq_len in [(16, 12), (48, 100)]:
    assert mixers.state_size({"name": "rwkv"}, d_model=d_model, seq_len=seq_len, layer_idx=0) == 4 * d_model
  state = _build(d_model=48).init_state(3)
  assert {k: v.shape for k, v in state.items()} == {k: (3, 48) for k in ("x_prev", "num", "den", "max")}


@pytest.mark.parametrize("cfg,field", [
    ({"parallel_implementation": "cuda"}, "model.mixer.parallel_implementation"),
    ({"parallel_implementation": 1}, "model.mixer.parallel_implementation"),
    ({"time_decay": 1.0}, "model.mixer.time_decay"),
])
def test_bad_hparams_are_one_line_value_errors(cfg, field):
  with pytest.raises(ValueError) as err:
    mixers.parse({"name": "rwkv", **cfg})
  assert str(err.value).startswith(field) and "\n" not in str(err.value), str(err.value)
