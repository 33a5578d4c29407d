"""Spec of the state mixers (`zoo_jax.layers.MLP`, `GLU`): Zoology's `zoology/mixers/mlp.py`, exactly.

- 'mlp' is fc2(gelu(fc1(x))) and 'glu' is fc3(fc1(x) * gelu(fc2(x))), with the exact GELU
  x/2 (1 + erf(x / sqrt 2)) (PyTorch's `F.gelu` default), not its tanh approximation; checked against the
  formulas in float64 numpy;
- shapes: fc1 (d, m d), fc2 (m d, d) for 'mlp'; fc1, fc2 (d, m d), fc3 (m d, d) for 'glu'; (b, l, d) -> (b, l, d);
- init: weights N(0, 0.02), biases 0, except the parameter Zoology's name test (`"fc2.weight" in name`,
  `zoology/model.py` `_init_weights`) rescales to N(0, 0.02 / sqrt(2 n_layers)): the MLP's output
  projection `fc2`, the GLU's gate `fc2` (its output projection `fc3` keeps 0.02);
- `ModelConfig.state_mixer` 'mlp' / 'glu' builds these classes.
"""

import math

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import layers
from zoo_jax.model import LanguageModel, ModelConfig

B, L, D = 2, 8, 32
ATOL_SCALE = 2e-6  # of the output's largest entry
_erf = np.vectorize(math.erf)


def gelu_erf(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def f64(param) -> np.ndarray:
  return np.asarray(param[...], np.float64)


def linear64(lin: nnx.Linear, x):
  return x @ f64(lin.kernel) + f64(lin.bias)


def _inputs(seed=0):
  return np.random.default_rng(seed).standard_normal((B, L, D))


def _with_random_params(module: nnx.Module, seed=1):
  """Kernels N(0, 4 / fan_in) and biases N(0, 0.1²) instead of the init's N(0, 0.02²) and 0: the
  pre-activations then spread over |x| ~ 1-4, where the exact GELU and its tanh approximation differ most
  (at init they sit near 0, where the two agree to ~1e-6), and the reference check sees the biases."""
  rng = np.random.default_rng(seed)
  for lin in (module.fc1, module.fc2, getattr(module, "fc3", None)):
    if lin is not None:
      fan_in = lin.kernel.shape[0]
      lin.kernel[...] = jnp.asarray(2 / math.sqrt(fan_in) * rng.standard_normal(lin.kernel.shape), jnp.float32)
      lin.bias[...] = jnp.asarray(0.1 * rng.standard_normal(lin.bias.shape), jnp.float32)
  return module


def _assert_close(got, expected):
  # float32 matmuls of width <= 128 against float64: measured <= 4e-7 of the output's scale.
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-5,
                             atol=ATOL_SCALE * np.abs(expected).max())


@pytest.mark.parametrize("hidden_mult", [1, 4])
def test_mlp_is_zoologys_fc2_exact_gelu_fc1(hidden_mult):
  mlp = _with_random_params(layers.MLP(D, hidden_mult, n_layers=2, rngs=nnx.Rngs(0)))
  chex.assert_shape([mlp.fc1.kernel[...], mlp.fc2.kernel[...]], [(D, hidden_mult * D), (hidden_mult * D, D)])
  x = _inputs()
  y = mlp(jnp.asarray(x, jnp.float32))
  chex.assert_shape(y, (B, L, D))
  expected = linear64(mlp.fc2, gelu_erf(linear64(mlp.fc1, x)))
  _assert_close(y, expected)
  # The tanh approximation is another function here (measured ~1.1e-4 of the output's scale off), so the
  # check above tells the two apart.
  tanh = np.asarray(mlp.fc2(jax.nn.gelu(mlp.fc1(jnp.asarray(x, jnp.float32)), approximate=True)))
  assert np.abs(tanh - expected).max() > 10 * ATOL_SCALE * np.abs(expected).max()


@pytest.mark.parametrize("hidden_mult", [1, 4])
def test_glu_is_zoologys_fc3_of_fc1_times_exact_gelu_fc2(hidden_mult):
  glu = _with_random_params(layers.GLU(D, hidden_mult, n_layers=2, rngs=nnx.Rngs(0)))
  hidden = hidden_mult * D
  chex.assert_shape([glu.fc1.kernel[...], glu.fc2.kernel[...], glu.fc3.kernel[...]],
                    [(D, hidden), (D, hidden), (hidden, D)])
  x = _inputs()
  y = glu(jnp.asarray(x, jnp.float32))
  chex.assert_shape(y, (B, L, D))
  _assert_close(y, linear64(glu.fc3, linear64(glu.fc1, x) * gelu_erf(linear64(glu.fc2, x))))


def _assert_normal(param, std, name):
  w = f64(param).ravel()
  n = w.size
  # 6 standard errors of the sample mean and sd; 0.02 against 0.02 / sqrt(2 n_layers) = 0.005 (n_layers 8)
  # is hundreds of standard errors apart at these sizes.
  assert abs(w.mean()) <= 6 * std / math.sqrt(n), (name, w.mean())
  assert abs(w.std() - std) <= 6 * std / math.sqrt(2 * n), (name, w.std(), std)


@pytest.mark.parametrize("state_mixer", ["mlp", "glu"])
def test_state_mixer_init_rescales_the_parameter_zoology_names_fc2(state_mixer):
  n_layers = 8
  cls = {"mlp": layers.MLP, "glu": layers.GLU}[state_mixer]
  module = cls(128, 4, n_layers=n_layers, rngs=nnx.Rngs(0))
  rescaled = 0.02 / math.sqrt(2 * n_layers)
  # MLP: fc2 is the output projection. GLU: fc2 is the gate and the output projection fc3 is not rescaled,
  # as Zoology's `"fc2.weight" in name` test does it.
  expected_std = {"mlp": dict(fc1=0.02, fc2=rescaled), "glu": dict(fc1=0.02, fc2=rescaled, fc3=0.02)}
  for name, std in expected_std[state_mixer].items():
    lin = getattr(module, name)
    _assert_normal(lin.kernel, std, f"{state_mixer}.{name}")
    assert (f64(lin.bias) == 0).all(), name
  assert not hasattr(module, "fc3") or state_mixer == "glu"


@pytest.mark.parametrize("state_mixer,cls", [("mlp", layers.MLP), ("glu", layers.GLU)])
def test_model_state_mixer_names_build_zoologys_mlp_and_glu(state_mixer, cls):
  cfg = ModelConfig.from_config(
      dict(d_model=D, n_layers=2, mixer={"name": "attention"}, state_mixer=state_mixer,
           state_mixer_hidden_mult=2, block="prenorm"), vocab_size=64, seq_len=L)
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  for block in model.blocks:
    assert type(block.state_mixer) is cls
    chex.assert_shape(block.state_mixer.fc1.kernel[...], (D, 2 * D))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (B, L)), jnp.int32)
  logits = model(tokens)
  chex.assert_shape(logits, (B, L, 64))
  chex.assert_tree_all_finite(logits)
