"""Multi-scale retention (`zoo_jax.mixers.retnet`) against a naive float64 token loop.

The shared spec (tests/test_mixers.py) checks shapes, dtypes, causality, gradients and recurrent ≡ parallel
at the defaults (one chunk: L = 12 < 64); here: the whole mixer against the paper's definition written
independently (complex rotation, explicit sums of decayed scores), the parallel, chunkwise and recurrent
forms agreeing at lengths the chunk size does not divide, the chunkwise kernel at extreme decays, the
per-head decays, bfloat16 over many chunks, the state size and the hyperparameter errors. State passing
(prefill → decode): both forms, prefilled over x[:, :t] and continued from their state, give the whole
sequence's output and the recurrence's state (positions too), and rows at different positions continue
each from its own.
"""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_mixer_mamba2_gla import assert_bfloat16_state_is_init_states, assert_prefill_continues
from test_mixers import functional, run_recurrent  # the shared spec's pure apply and scanned steps
from zoo_jax import mixers
from zoo_jax.mixers import retnet

D, N_LAYERS = 16, 2
# Float32 forms against each other and against the float64 loop: round-off ~3e-7 of the output scale
# (measured); 1e-5 catches a lag off by one or a decay applied once too often (O(1/32) changes at least).
RTOL = 1e-5
# (num_heads, chunk_size, length): one chunk, chunks that do not divide L, chunks of 1, L = 1.
FORM_CASES = [(2, 64, 12), (2, 5, 13), (4, 3, 7), (1, 1, 6), (2, 5, 1)]


def build(length: int, dtype=jnp.float32, **hparams) -> nnx.Module:
  return mixers.build({"name": "retnet", **hparams}, d_model=D, seq_len=length, layer_idx=0,
                      n_layers=N_LAYERS, rngs=nnx.Rngs(0), dtype=dtype)


def with_random_norm_affine(module: nnx.Module) -> nnx.Module:
  """GroupNorm's scale and bias start at 1 and 0; random values show they are applied where they should."""
  rng = np.random.default_rng(7)
  module.norm_scale.value = jnp.asarray(rng.uniform(0.5, 1.5, D), jnp.float32)
  module.norm_bias.value = jnp.asarray(rng.uniform(-0.5, 0.5, D), jnp.float32)
  return module


def naive(module: nnx.Module, num_heads: int, x_bld) -> np.ndarray:
  """Eq. 1–8 of the paper by definition, float64: positions as complex rotations of channel pairs,
  o_t = Σ_{s<=t} γ_h^(t−s) (q_t · k_s / sqrt(d_k)) v_s, GroupNorm per head, swish gate, W_O."""
  f64 = lambda a: np.asarray(a, np.float64)
  x = f64(x_bld)
  b, l, d = x.shape
  dk = d // num_heads
  q, k, v, g = np.split(x @ f64(module.in_proj.kernel[...]).reshape(d, 4 * d), 4, axis=-1)
  heads = lambda a: a.reshape(b, l, num_heads, dk)
  theta = 10000.0 ** -(np.arange(dk // 2) / max(dk // 2 - 1, 1))
  phase = np.exp(1j * np.arange(l)[:, None] * theta)[None, :, None]  # (1, l, 1, dk/2)

  def rotate(a):
    z = (a[..., 0::2] + 1j * a[..., 1::2]) * phase
    return np.stack([z.real, z.imag], axis=-1).reshape(a.shape)

  q, k, v = rotate(heads(q)), rotate(heads(k)) / np.sqrt(dk), heads(v)
  gamma = 1 - 2.0 ** (-5 - np.arange(num_heads))
  o = np.zeros((b, l, num_heads, dk))
  for t in range(l):
    for s in range(t + 1):
      score = np.einsum("bhk,bhk->bh", q[:, t], k[:, s]) * gamma ** (t - s)
      o[:, t] += score[..., None] * v[:, s]
  normed = (o - o.mean(-1, keepdims=True)) / np.sqrt(o.var(-1, keepdims=True) + retnet.GROUP_NORM_EPS)
  normed = normed.reshape(b, l, d) * f64(module.norm_scale[...]) + f64(module.norm_bias[...])
  return (g / (1 + np.exp(-g)) * normed) @ f64(module.out_proj.kernel[...])


def apply_parallel(module, x):
  apply, params = functional(module)
  return jax.jit(apply)(params, x)


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def assert_close_to_scale(actual, expected, rtol=RTOL, msg=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  chex.assert_equal_shape([actual, expected])
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= rtol * scale, f"{msg}: max abs err {err:.3g} > {rtol} * {scale:.3g}"


@pytest.mark.parametrize("num_heads,chunk_size,length", FORM_CASES,
                         ids=[f"h={h},c={c},L={l}" for h, c, l in FORM_CASES])
def test_parallel_chunkwise_and_recurrent_forms_are_the_definition(num_heads, chunk_size, length):
  x = _normal((2, length, D), seed=length)
  chunkwise = with_random_norm_affine(build(length, num_heads=num_heads, chunk_size=chunk_size))
  parallel = with_random_norm_affine(build(length, num_heads=num_heads, form="parallel"))
  expected = naive(chunkwise, num_heads, x)
  assert_close_to_scale(apply_parallel(chunkwise, x), expected, msg="chunkwise")
  assert_close_to_scale(apply_parallel(parallel, x), expected, msg="parallel")
  assert_close_to_scale(run_recurrent(chunkwise, x), expected, msg="recurrent")


@pytest.mark.parametrize("log_gamma", [np.log(0.5), np.log1p(-2.0 ** -12)],
                         ids=["gamma=0.5", "gamma=1-2^-12"])
def test_chunkwise_retention_is_the_parallel_one_at_extreme_decays(log_gamma):
  """The kernels alone, on unit-scale q, k, v over 5 chunks of 8 (the last one partial): a fast decay
  (γ^8 = 4e-3 across a chunk) and a slow one (the state keeps ~all 37 tokens)."""
  q, k, v = (_normal((2, 37, 2, 4), seed) for seed in range(3))
  log_gamma_h = jnp.asarray([log_gamma, np.log1p(-1 / 32)], jnp.float32)
  parallel = jax.jit(retnet.retention_parallel)(q, k, v, log_gamma_h)
  chunkwise = jax.jit(retnet.retention_chunkwise, static_argnums=4)(q, k, v, log_gamma_h, 8)
  assert_close_to_scale(chunkwise, parallel)


@pytest.mark.parametrize("form,chunk_size", [("chunkwise", 5), ("chunkwise", 3), ("chunkwise", 1),
                                             ("parallel", 64)])
def test_prefill_then_the_rest_from_its_state_is_the_whole_sequence(form, chunk_size):
  """Prefix lengths 1, a chunk boundary, one past it and one short of the end, L = 13 (no chunk divides
  the rest): outputs, S and the position counter."""
  module = with_random_norm_affine(build(13, num_heads=4, form=form, chunk_size=chunk_size))
  assert_prefill_continues(module, _normal((2, 13, D), seed=9), (1, 5, 6, 12), RTOL)
  assert_bfloat16_state_is_init_states({"name": "retnet", "form": form, "chunk_size": chunk_size})


@pytest.mark.parametrize("form", ["chunkwise", "parallel"])
def test_rows_at_different_positions_continue_each_from_its_own(form):
  """A batch whose rows have seen 2 and 7 tokens (states stacked): the parallel form rotates each row
  from its own counter and decays its own S, as each row's token recurrence does."""
  module = build(13, form=form, chunk_size=4)
  seen, rest = (2, 7), _normal((2, 6, D), seed=11)
  prefix = [_normal((1, t, D), seed=t) for t in seen]

  def run(prefix, rest):
    states = [jax.lax.scan(module.step, module.init_state(1), jnp.swapaxes(x, 0, 1))[0] for x in prefix]
    state = jax.tree.map(lambda *rows: jnp.concatenate(rows), *states)
    _, y_recurrent = jax.lax.scan(module.step, state, jnp.swapaxes(rest, 0, 1))
    return module(rest, state=state), jnp.swapaxes(y_recurrent, 0, 1)

  y, y_recurrent = jax.jit(run)(prefix, rest)
  assert_close_to_scale(y, y_recurrent, msg=form)


def test_head_decays_are_the_papers():
  expected = 1 - np.array([1 / 32, 1 / 64, 1 / 128, 1 / 256])
  np.testing.assert_allclose(np.exp(retnet.head_log_decays(4)), expected, rtol=1e-7)


def test_bfloat16_over_many_chunks_is_close_to_float32():
  """L = 256 in chunks of 64: the state is carried across chunks in float32; bfloat16 stays within the
  shared spec's 2% of the output scale (measured ~1%: the q·k scores' rounding, which GroupNorm passes
  through at full relative size)."""
  x = _normal((2, 256, D), seed=4)
  out32 = apply_parallel(build(256), x)
  out16 = apply_parallel(build(256, jnp.bfloat16), x.astype(jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(out16, np.float32)).all()
  assert_close_to_scale(out16, out32, rtol=2e-2, msg="bfloat16")


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_state_size_is_d_squared_over_heads_and_the_recurrent_state(num_heads):
  cfg = {"name": "retnet", "num_heads": num_heads}
  for d_model, seq_len in [(16, 12), (64, 300)]:
    size = mixers.state_size(cfg, d_model=d_model, seq_len=seq_len, layer_idx=0)
    assert size == d_model * d_model // num_heads, (d_model, seq_len, size)
  state = build(12, num_heads=num_heads).init_state(1)
  floats = sum(leaf.size for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating))
  assert floats == D * D // num_heads


@pytest.mark.parametrize("cfg,field", [
    ({"form": "recurrent"}, "model.mixer.form"),
    ({"form": 1}, "model.mixer.form"),
    ({"chunk_size": 0}, "model.mixer.chunk_size"),
    ({"chunk_size": 8.5}, "model.mixer.chunk_size"),
    ({"num_heads": 0}, "model.mixer.num_heads"),
    ({"gamma": 0.9}, "model.mixer.gamma"),
], ids=str)
def test_bad_hparams_are_one_line_value_errors_naming_the_field(cfg, field):
  with pytest.raises(ValueError) as err:
    mixers.parse({"name": "retnet", **cfg})
  assert str(err.value).startswith(field) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("num_heads", [3, 16], ids=["not_dividing_d", "odd_head_width"])
def test_heads_that_leave_no_even_head_width_fail_at_build(num_heads):
  with pytest.raises(ValueError, match=r"^model\.mixer\.num_heads[^\n]*$"):
    build(12, num_heads=num_heads)
