"""Based linear attention (`zoo_jax.mixers.based`) and its Taylor feature map against naive references.

The shared spec (tests/test_mixers.py) covers shapes, dtypes, causality, gradients and recurrent ≡
parallel at the defaults; here: the feature map is the Taylor-2 expansion of exp(q·k/√f) and matches
Zoology's full map, the quadratic, chunked ('linear') and recurrent forms equal a token-by-token float64
reference (other heads, feature widths, lengths not a multiple of the chunk), the state size and the
hyperparameter errors. State passing (prefill → decode): both forms, prefilled over x[:, :t] and
continued from their state, give the whole sequence's output and the recurrence's sums.
"""

import math

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_mixer_mamba2_gla import assert_bfloat16_state_is_init_states, assert_prefill_continues
from zoo_jax import mixers
from zoo_jax.mixers import based
from zoo_jax.ops import feature_maps


def zoology_full_taylor_exp(x_nf: np.ndarray) -> np.ndarray:
  """Zoology's `TaylorExp.forward`: [1, x/f^{1/4}, vec(x xᵀ)/(√2·√f)], width 1 + f + f²."""
  f = x_nf.shape[-1]
  x2 = (x_nf[..., :, None] * x_nf[..., None, :]).reshape(*x_nf.shape[:-1], f * f) / math.sqrt(2)
  return np.concatenate([np.ones_like(x_nf[..., :1]), x_nf / f**0.25, x2 / math.sqrt(f)], axis=-1)


def taylor2_of_exp(q_nf: np.ndarray, k_mf: np.ndarray) -> np.ndarray:
  s = q_nf @ k_mf.T / math.sqrt(q_nf.shape[-1])
  return 1 + s + s**2 / 2


@pytest.mark.parametrize("f", [1, 3, 16])
def test_feature_map_inner_product_is_the_taylor_expansion_of_exp(f):
  rng = np.random.default_rng(f)
  q, k = rng.standard_normal((5, f)), rng.standard_normal((7, f))
  expected = taylor2_of_exp(q, k)
  phi_q, phi_k = (np.asarray(feature_maps.taylor_exp(jnp.asarray(x, jnp.float32)), np.float64)
                  for x in (q, k))
  assert phi_q.shape == (5, 1 + f + f * (f + 1) // 2) == (5, feature_maps.taylor_exp_dim(f))
  np.testing.assert_allclose(phi_q @ phi_k.T, expected, rtol=1e-5)
  np.testing.assert_allclose(zoology_full_taylor_exp(q) @ zoology_full_taylor_exp(k).T, expected, rtol=1e-12)
  kernel = feature_maps.taylor_exp_kernel(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32))
  np.testing.assert_allclose(np.asarray(kernel, np.float64), expected, rtol=1e-5)
  # ... and it approximates exp(q·k/√f) to second order: the error is O(s³) for small s.
  s = 1e-2
  np.testing.assert_allclose(1 + s + s * s / 2, math.exp(s), rtol=s**3)


def naive_linear_attention(q_blhf, k_blhf, v_blhv, eps) -> np.ndarray:
  """y_t = Σ_{s≤t} φ(q_t)·φ(k_s) v_s / (Σ_{s≤t} φ(q_t)·φ(k_s) + eps), a loop over t, float64, with
  Zoology's full feature map."""
  q, k, v = (np.asarray(a, np.float64) for a in (q_blhf, k_blhf, v_blhv))
  phi_q, phi_k = zoology_full_taylor_exp(q), zoology_full_taylor_exp(k)
  y = np.zeros_like(v)
  for t in range(q.shape[1]):
    a_bhs = np.einsum("bhe,bshe->bhs", phi_q[:, t], phi_k[:, :t + 1])
    y[:, t] = np.einsum("bhs,bshv->bhv", a_bhs, v[:, :t + 1]) / (a_bhs.sum(-1)[..., None] + eps)
  return y


@pytest.mark.parametrize("form,chunk_size", [
    ("quadratic", None), ("linear", 1), ("linear", 5), ("linear", 16), ("linear", 64)])
def test_parallel_forms_are_the_naive_linear_attention(form, chunk_size):
  """37 positions: chunks of 5 and 16 leave a partial last chunk, 64 is longer than the sequence."""
  b, l, h, f, v_width = 2, 37, 2, 4, 3
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((b, l, h, f)), rng.standard_normal((b, l, h, f))
  v = rng.standard_normal((b, l, h, v_width))
  q_, k_, v_ = (jnp.swapaxes(jnp.asarray(x, jnp.float32), 1, 2) for x in (q, k, v))  # (b, h, l, .)
  if form == "quadratic":
    y = jax.jit(based.quadratic, static_argnums=3)(q_, k_, v_, 1e-12)
  else:
    y = jax.jit(based.chunked, static_argnums=(3, 4))(q_, k_, v_, 1e-12, chunk_size)
  chex.assert_trees_all_close(np.swapaxes(np.asarray(y, np.float64), 1, 2),
                              naive_linear_attention(q, k, v, 1e-12), atol=1e-5, rtol=1e-5)


def _build(dtype=jnp.float32, d_model=16, seq_len=13, **hparams):
  return mixers.build({"name": "based", **hparams}, d_model=d_model, seq_len=seq_len, layer_idx=1,
                      n_layers=2, rngs=nnx.Rngs(1), dtype=dtype)


def _run_all_forms(module, x_bld):
  """(parallel output, recurrent output) of one module on x."""
  def recurrent(m, x_):
    _, y_lbd = jax.lax.scan(m.step, m.init_state(x_.shape[0]), jnp.swapaxes(x_, 0, 1))
    return jnp.swapaxes(y_lbd, 0, 1)

  return nnx.jit(lambda m, x_: (m(x_), recurrent(m, x_)))(module, x_bld)


HPARAMS = [
    pytest.param(dict(num_heads=2, num_key_value_heads=2, feature_dim=4, parallel_implementation="quadratic"),
                 id="h=2,f=4,quadratic"),
    pytest.param(dict(num_heads=2, num_key_value_heads=2, feature_dim=4, parallel_implementation="linear",
                      chunk_size=5), id="h=2,f=4,linear,chunk=5"),
    pytest.param(dict(feature_dim=8, parallel_implementation="linear", chunk_size=4), id="f=8,linear,chunk=4"),
]


@pytest.mark.parametrize("hparams", HPARAMS)
def test_mixer_forms_are_the_naive_mixer(hparams):
  """Parallel and recurrent forms against the projections + the naive linear attention, 13 positions
  (not a multiple of the chunk)."""
  module = _build(**hparams)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 13, 16)) * 4, jnp.float32)
  out, out_recurrent = _run_all_forms(module, x)
  kernel = {n: np.asarray(getattr(module, n).kernel[...], np.float64)
            for n in ("proj_q", "proj_k", "proj_v", "proj_o")}
  assert all(getattr(module, n).bias is None for n in kernel)
  h = hparams.get("num_heads", 1)
  x64 = np.asarray(x, np.float64)
  q, k, v = (x64 @ kernel[n] for n in ("proj_q", "proj_k", "proj_v"))
  q, k, v = (a.reshape(2, 13, h, -1) for a in (q, k, v))
  expected = naive_linear_attention(q, k, v, 1e-12).reshape(2, 13, 16) @ kernel["proj_o"]
  scale = np.abs(expected).max()
  chex.assert_trees_all_close(np.asarray(out, np.float64), expected, atol=1e-5 * scale)
  chex.assert_trees_all_close(np.asarray(out_recurrent, np.float64), expected, atol=1e-5 * scale)


@pytest.mark.parametrize("hparams", HPARAMS + [
    pytest.param(dict(feature_dim=4, parallel_implementation="linear", chunk_size=1), id="f=4,linear,chunk=1")])
def test_prefill_then_the_rest_from_its_state_is_the_whole_sequence(hparams):
  """Prefix lengths 1, a chunk boundary, one past it and one short of the end, L = 13: outputs and the
  sums Σ φ(k) vᵀ, Σ φ(k) (the padding of a partial last chunk must not enter Σ φ(k): φ(0) is not 0)."""
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 13, 16)) * 4, jnp.float32)
  assert_prefill_continues(_build(**hparams), x, (1, 5, 6, 12))
  assert_bfloat16_state_is_init_states({"name": "based", **hparams})


def test_bfloat16_mixer_is_finite_and_close_on_large_inputs():
  """Large q·k make the Taylor kernel peaky (it grows as (q·k)²); float32 inside keeps bfloat16 close."""
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 13, 16)) * 30, jnp.float32)
  hparams = dict(parallel_implementation="linear", chunk_size=5)
  out32, _ = _run_all_forms(_build(jnp.float32, **hparams), x)
  out16, rec16 = _run_all_forms(_build(jnp.bfloat16, **hparams), x.astype(jnp.bfloat16))
  assert out16.dtype == rec16.dtype == jnp.bfloat16
  out32, out16, rec16 = (np.asarray(o, np.float64) for o in (out32, out16, rec16))
  assert np.isfinite(out16).all() and np.isfinite(rec16).all()
  assert np.abs(out16 - out32).max() <= 0.05 * np.abs(out32).max()
  assert np.abs(rec16 - out32).max() <= 0.05 * np.abs(out32).max()


@pytest.mark.parametrize("hparams,expected", [
    ({}, lambda d: (1 + 16 + 136) * (d + 1)),  # the defaults: f = 16, one head
    ({"feature_dim": 8, "num_heads": 2, "num_key_value_heads": 2}, lambda d: (1 + 8 + 36) * (d + 2)),
])
def test_state_size_is_e_times_d_plus_h(hparams, expected):
  for d_model, seq_len in [(16, 12), (64, 100)]:
    size = mixers.state_size({"name": "based", **hparams}, d_model=d_model, seq_len=seq_len, layer_idx=0)
    assert type(size) is int and size == expected(d_model)
  state = _build(d_model=64, **hparams).init_state(1)
  assert sum(leaf.size for leaf in jax.tree.leaves(state)) == expected(64)


@pytest.mark.parametrize("cfg,field", [
    ({"feature_dim": 0}, "model.mixer.feature_dim"),
    ({"feature_dim": 1.5}, "model.mixer.feature_dim"),
    ({"num_heads": 0, "num_key_value_heads": 0}, "model.mixer.num_heads"),
    ({"num_heads": 2}, "model.mixer.num_key_value_heads"),
    ({"eps": -1.0}, "model.mixer.eps"),
    ({"eps": float("nan")}, "model.mixer.eps"),
    ({"parallel_implementation": "cuda"}, "model.mixer.parallel_implementation"),
    ({"chunk_size": 0}, "model.mixer.chunk_size"),
    ({"train_view": "quadratic"}, "model.mixer.train_view"),
])
def test_bad_hparams_are_one_line_value_errors(cfg, field):
  with pytest.raises(ValueError) as err:
    mixers.parse({"name": "based", **cfg})
  assert str(err.value).startswith(field) and "\n" not in str(err.value), str(err.value)


def test_heads_must_divide_d_model_at_build():
  cfg = {"name": "based", "num_heads": 3, "num_key_value_heads": 3}
  mixers.parse(cfg)
  with pytest.raises(ValueError, match=r"^model\.mixer\.num_heads must divide"):
    _build(**{k: v for k, v in cfg.items() if k != "name"})
