"""Mamba (`zoo_jax.mixers.mamba`) against naive float64 references.

The shared spec (tests/test_mixers.py) checks shapes, dtypes, causality, gradients and recurrent ≡ parallel
at the defaults; here: the selective scan against a token loop, the whole mixer against a float64 token
loop written from its parameters, recurrent ≡ parallel at other lengths and hyperparameters, mamba_ssm's
init, the state size, bfloat16 stability and the hyperparameter errors.
"""

import math

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import layers, mixers
from zoo_jax.mixers import mamba

SCANS = mamba.SCANS
N_LAYERS = 2
# Non-default hyperparameters with every optional piece switched on. Modules are built eagerly, which
# compiles each init op once per parameter shape: the tests share a few shape sets to stay fast.
OTHER = dict(bias=True, d_conv=2, d_state=3, expand=1, dt_rank=3)


def build(d_model=16, seq_len=24, dtype=jnp.float32, seed=0, **hparams):
  return mixers.build({"name": "mamba", **hparams}, d_model=d_model, seq_len=seq_len, layer_idx=0,
                      n_layers=N_LAYERS, rngs=nnx.Rngs(seed), dtype=dtype)


def build_abstract(d_model, seq_len, **hparams):
  """The module with ShapeDtypeStruct parameters (no init compute), for shapes and state sizes."""
  return nnx.eval_shape(lambda: build(d_model, seq_len, **hparams))


def randomize(module: mamba.Mamba, seed: int = 7) -> mamba.Mamba:
  """Parameters at the scale of a trained model: at init x, B and C are small and Δ ~ 0.01, so the SSM
  path is a small part of the output next to the skip D·x, and a test of the output would barely see it.
  Here x, z, B, C ~ 1, Δ in [0.05, 1.3], D and A spread per channel, biases nonzero."""
  rng = np.random.default_rng(seed)
  e, n = module.A_log.shape
  module.in_proj.kernel[...] = module.in_proj.kernel[...] * 10
  module.x_proj.kernel[...] = module.x_proj.kernel[...] * 10
  module.dt_proj.bias[...] = jnp.asarray(rng.uniform(-3, 1, e), jnp.float32)
  module.A_log[...] = module.A_log[...] + jnp.asarray(rng.uniform(-1, 1, (e, 1)), jnp.float32)
  module.D[...] = jnp.asarray(rng.standard_normal(e), jnp.float32)
  for proj in (module.in_proj, module.out_proj):
    if proj.bias is not None:
      proj.bias[...] = jnp.asarray(0.1 * rng.standard_normal(proj.bias.shape), jnp.float32)
  return module


def apply(module, u_bld):
  return jax.jit(lambda m, u: m(u))(module, u_bld)


def _normal(shape, seed=0, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def softplus(v):
  return np.logaddexp(0.0, v)


def silu(v):
  return v / (1.0 + np.exp(-v))


# ------------------------------------------------------------------------------------ selective scan


def naive_selective_scan(x_ble, dt_ble, a_en, b_bln, c_bln, d_e):
  """h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_t, y_t = h_t C_t + D x_t, one token at a time, float64."""
  x_ble, dt_ble, a_en, b_bln, c_bln, d_e = _f64((x_ble, dt_ble, a_en, b_bln, c_bln, d_e))
  b, l, e = x_ble.shape
  h = np.zeros((b, e, a_en.shape[1]))
  y = np.zeros((b, l, e))
  for t in range(l):
    for i in range(b):
      h[i] = np.exp(dt_ble[i, t][:, None] * a_en) * h[i] + np.outer(dt_ble[i, t] * x_ble[i, t], b_bln[i, t])
      y[i, t] = h[i] @ c_bln[i, t] + d_e * x_ble[i, t]
  return y


def random_scan_inputs(b, l, e, n, seed=0):
  """Inputs spanning the regimes of training: Δ from 1e-3 to 3 and A = -(1..n) scaled by e^-2..e^1 per
  channel, so Δ·A runs from ~-1e-4 (no decay) to ~-200 (instant decay); x, B, C of unit scale."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, l, e))
  dt = softplus(rng.uniform(-7, 3, (b, l, e)))
  a = -np.arange(1, n + 1)[None, :] * np.exp(rng.uniform(-2, 1, (e, 1)))
  return x, dt, a, rng.standard_normal((b, l, n)), rng.standard_normal((b, l, n)), rng.standard_normal(e)


_scan = jax.jit(mamba.selective_scan, static_argnames="scan")


@pytest.mark.parametrize("scan", SCANS)
def test_selective_scan_is_the_token_loop(scan):
  inputs = random_scan_inputs(2, 37, 6, 5)
  y = _scan(*(jnp.asarray(a, jnp.float32) for a in inputs), scan=scan)
  assert y.dtype == jnp.float32
  expected = naive_selective_scan(*inputs)
  chex.assert_trees_all_close(np.asarray(y, np.float64), expected, atol=2e-5, rtol=1e-5)


def test_selective_scan_keeps_float32_for_bfloat16_inputs():
  """bfloat16 x, Δ, B, C (as the mixer's bfloat16 projections give them) are scanned in float32: the
  result equals the float64 loop on the same rounded inputs, over 256 tokens of accumulation."""
  x, dt, a, b, c, d = random_scan_inputs(1, 256, 4, 16, seed=1)
  x, dt, b, c = (np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64) for v in (x, dt, b, c))
  x_, dt_, b_, c_ = (jnp.asarray(v, jnp.bfloat16) for v in (x, dt, b, c))
  y = _scan(x_, dt_, jnp.asarray(a, jnp.float32), b_, c_, jnp.asarray(d, jnp.float32), scan="sequential")
  assert y.dtype == jnp.float32
  chex.assert_trees_all_close(np.asarray(y, np.float64), naive_selective_scan(x, dt, a, b, c, d),
                              atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------- whole mixer


def naive_mamba(module: mamba.Mamba, u_bld) -> np.ndarray:
  """The mixer written out from its parameters, token by token in float64 (Algorithm 2 of the paper)."""
  p = _f64(nnx.state(module, nnx.Param).to_pure_dict())
  u_bld = np.asarray(u_bld, np.float64)
  b, l, _ = u_bld.shape
  e, n = p["A_log"].shape
  r, k = module.rank, p["conv"]["w_kc"].shape[0]
  bias = lambda name: p[name].get("bias", 0.0)
  d = u_bld.shape[-1]  # in_proj's kernel is (d, 2, e) (layers.FusedLinear): as (d, 2e), x then z
  xz = u_bld @ p["in_proj"]["kernel"].reshape(d, -1) + np.reshape(bias("in_proj"), -1)
  x, z = xz[..., :e], xz[..., e:]
  x_pad = np.concatenate([np.zeros((b, k - 1, e)), x], axis=1)
  a_en = -np.exp(p["A_log"])
  out = np.zeros_like(u_bld)
  h = np.zeros((b, e, n))
  for t in range(l):
    xc = silu((x_pad[:, t:t + k] * p["conv"]["w_kc"]).sum(1) + p["conv"]["b_c"])  # taps t-k+1 .. t
    proj = xc @ p["x_proj"]["kernel"]
    delta, b_bn, c_bn = proj[:, :r], proj[:, r:r + n], proj[:, r + n:]
    dt = softplus(delta @ p["dt_proj"]["kernel"] + p["dt_proj"]["bias"])
    h = np.exp(dt[..., None] * a_en) * h + (dt * xc)[..., None] * b_bn[:, None, :]
    y = np.einsum("ben,bn->be", h, c_bn) + p["D"] * xc
    out[:, t] = (y * silu(z[:, t])) @ p["out_proj"]["kernel"] + bias("out_proj")
  return out


@pytest.mark.parametrize("hparams", [dict(), dict(OTHER, scan="associative")],
                         ids=["defaults", "associative,bias,k=2,n=3,expand=1,rank=3"])
def test_mixer_is_the_naive_token_loop(hparams):
  module = randomize(build(**hparams))
  u = _normal((2, 13, 16), seed=1)
  out = np.asarray(apply(module, u), np.float64)
  expected = naive_mamba(module, u)
  chex.assert_trees_all_close(out, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


def run_recurrent(module, u_bld):
  def scan(m, u):
    _, y_lbd = jax.lax.scan(m.step, m.init_state(u.shape[0]), jnp.swapaxes(u, 0, 1))
    return jnp.swapaxes(y_lbd, 0, 1)

  return jax.jit(scan)(module, u_bld)


# Measured <= 1.4e-7 of max|out| here and at L = 256 (float32 round-off: batched vs one-token matmuls);
# 1e-5 as in tests/test_mixers.py.
RECURRENT_RTOL = 1e-5


@pytest.mark.parametrize("hparams,length", [
    (dict(), 1),
    (dict(), 19),  # not a multiple of the scan's unroll
    (dict(scan="associative"), 33),
    (dict(d_conv=1), 17),  # no conv window at all
    (OTHER, 21),
], ids=["defaults,L=1", "defaults,L=19", "associative,L=33", "k=1,L=17",
        "bias,k=2,n=3,expand=1,rank=3,L=21"])
def test_recurrent_form_equals_parallel_form(hparams, length):
  module = randomize(build(seq_len=length, **hparams))
  u = _normal((2, length, 16), seed=2)
  parallel = apply(module, u)
  recurrent = run_recurrent(module, u)
  scale = float(jnp.abs(parallel).max())
  chex.assert_trees_all_close(recurrent, parallel, atol=RECURRENT_RTOL * scale, rtol=0)


# ----------------------------------------------------------------------------------- init and shapes


def test_parameters_have_zoology_shapes():
  d = 40  # dt_rank 'auto' = ceil(40/16) = 3
  module = build_abstract(d, 24)
  e, r, n, k = 2 * d, 3, 16, 4
  shapes = jax.tree.map(jnp.shape, nnx.state(module, nnx.Param).to_pure_dict())
  assert shapes == {
      "in_proj": {"kernel": (d, 2, e)}, "conv": {"w_kc": (k, e), "b_c": (e,)},
      "x_proj": {"kernel": (e, r + 2 * n)}, "dt_proj": {"kernel": (r, e), "bias": (e,)},
      "A_log": (e, n), "D": (e,), "out_proj": {"kernel": (e, d)},
  }, shapes


def test_init_a_d_and_projections():
  module = build(d_model=64, dtype=jnp.bfloat16)
  params = nnx.state(module, nnx.Param).to_pure_dict()
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  a_en = -np.exp(np.asarray(params["A_log"]))  # S4D-real: A = -(1, 2, ..., n) in every channel
  np.testing.assert_allclose(a_en, -np.tile(np.arange(1, 17), (128, 1)), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(params["D"]), 1.0)
  assert abs(np.std(params["in_proj"]["kernel"]) / layers.INIT_STD - 1) < 0.05
  assert abs(np.std(params["out_proj"]["kernel"]) / layers.out_proj_std(N_LAYERS) - 1) < 0.05


@pytest.mark.parametrize("dt_min,dt_max", [(1e-3, 1e-1), (1e-2, 0.5)])
def test_dt_bias_init_is_log_uniform_in_range(dt_min, dt_max):
  module = build(d_model=64, dt_min=dt_min, dt_max=dt_max)
  dt = softplus(np.asarray(module.dt_proj.bias[...], np.float64))
  assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5), (dt.min(), dt.max())
  # log-uniform: on 4096 draws of the same initialiser, log Δ₀ has the mean and spread of
  # U(log dt_min, log dt_max): the sample mean's std is 0.45% of the range and the sample std's relative
  # std 0.7%, so the bounds below are 4-5 of them.
  init = mamba._dt_bias_init(mamba.MambaConfig(dt_min=dt_min, dt_max=dt_max))
  dt = softplus(np.asarray(init(jax.random.key(0), (4096,)), np.float64))
  lo, hi = math.log(dt_min), math.log(dt_max)
  assert abs(np.log(dt).mean() - (lo + hi) / 2) < 0.02 * (hi - lo)
  assert abs(np.log(dt).std() / ((hi - lo) / math.sqrt(12)) - 1) < 0.03


def test_dt_init_floor_and_weight_init():
  module = build(d_model=64, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
  np.testing.assert_allclose(softplus(np.asarray(module.dt_proj.bias[...], np.float64)), 1e-4, rtol=1e-3)
  bound = 2.0 / math.sqrt(4)  # dt_scale / sqrt(dt_rank), dt_rank = ceil(64/16) = 4
  w = np.asarray(build(d_model=64, dt_scale=2.0).dt_proj.kernel[...])
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
  np.testing.assert_array_equal(np.asarray(build(d_model=64, dt_init="constant").dt_proj.kernel[...]), 0.5)


# ------------------------------------------------------------------------------------- state size


@pytest.mark.parametrize("hparams", [dict(), OTHER, dict(d_conv=1)])
def test_state_size_is_the_formula_and_the_recurrent_state(hparams):
  cfg = mamba.MambaConfig(**hparams)
  for d_model, seq_len in [(16, 12), (48, 100)]:
    e = cfg.expand * d_model
    expected = e * (cfg.d_conv - 1) + e * cfg.d_state
    size = mixers.state_size({"name": "mamba", **hparams}, d_model=d_model, seq_len=seq_len, layer_idx=0)
    assert type(size) is int and size == expected, (hparams, d_model, size)
    state = build_abstract(d_model, seq_len, **hparams).init_state(1)
    assert sum(leaf.size for leaf in jax.tree.leaves(state)) == expected
    assert {leaf.dtype for leaf in jax.tree.leaves(state)} <= {jnp.dtype(jnp.float32)}
  assert mixers.state_size({"name": "mamba"}, d_model=64, seq_len=1024, layer_idx=0) == 128 * (3 + 16)


# ---------------------------------------------------------------------------------------- bfloat16


def test_bfloat16_mixer_is_stable_over_long_sequences_and_fast_decay():
  """L = 512 in bfloat16, with Δ pushed up to ~50 (exp(Δ A) underflows to 0) and inputs of scale 10:
  finite, within 2% of the float32 mixer (the shared spec's bound) on the same input."""
  u = _normal((1, 512, 16), seed=4, scale=10.0)
  outs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    module = build(seq_len=512, dtype=dtype, dt_min=1e-3, dt_max=50.0)
    outs[dtype] = np.asarray(apply(module, u.astype(dtype)).astype(jnp.float32), np.float64)
  assert np.isfinite(outs[jnp.bfloat16]).all()
  err, scale = np.abs(outs[jnp.bfloat16] - outs[jnp.float32]).max(), np.abs(outs[jnp.float32]).max()
  assert err <= 2e-2 * scale, (err, scale)


def test_bfloat16_recurrent_form_keeps_a_float32_state():
  module = build(dtype=jnp.bfloat16)
  state, y = jax.jit(lambda m, u: m.step(m.init_state(2), u))(module, _normal((2, 16)).astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}


# ----------------------------------------------------------------------------------- hyperparameters


BAD_HPARAMS = [
    ({"d_state": 0}, "d_state"),
    ({"d_state": 16.0}, "d_state"),
    ({"d_conv": 0}, "d_conv"),
    ({"expand": 0}, "expand"),
    ({"expand": 1.5}, "expand"),
    ({"dt_rank": "full"}, "dt_rank"),
    ({"dt_rank": 0}, "dt_rank"),
    ({"dt_rank": True}, "dt_rank"),
    ({"dt_min": 0.0}, "dt_min"),
    ({"dt_min": 0.2}, "dt_min"),  # > dt_max = 0.1
    ({"dt_max": -1.0}, "dt_max"),
    ({"dt_init": "uniform"}, "dt_init"),
    ({"dt_scale": 0.0}, "dt_scale"),
    ({"dt_init_floor": -1e-4}, "dt_init_floor"),
    ({"bias": 0}, "bias"),
    ({"scan": "parallel"}, "scan"),
    ({"conv_bias": False}, "conv_bias"),  # Zoology's option, not one here
]


@pytest.mark.parametrize("hparams,key", BAD_HPARAMS, ids=[str(h) for h, _ in BAD_HPARAMS])
def test_bad_hparams_are_one_line_value_errors_naming_the_field(hparams, key):
  with pytest.raises(ValueError) as err:
    mixers.parse({"name": "mamba", **hparams})
  message = str(err.value)
  assert message.startswith(f"model.mixer.{key}") and "\n" not in message, message


def test_dt_rank_accepts_auto_and_integers():
  assert mixers.parse({"name": "mamba", "dt_rank": 5})[1].rank(64) == 5
  assert mixers.parse({"name": "mamba", "dt_rank": "auto"})[1].rank(17) == 2
