"""The convolution mixers (BaseConv, H3, Hyena, S4D) call the kernel dispatchers: their outputs must not
depend (beyond float32 round-off) on which `conv_implementation` runs, and the hyperparameter must not
change the parameter tree (old checkpoints load whatever the implementation).
"""

import functools

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import mixers

B, L, D, N_LAYERS = 2, 12, 8, 2
RTOL = 1e-5  # float32 FFT / DFT-matmul round-off against the Toeplitz reference, relative to the scale

CONFIGS = {
    "base_conv_short": ({"name": "base_conv", "kernel_size": 3}, 0),
    "base_conv_implicit": ({"name": "base_conv", "kernel_size": [3, -1]}, 1),
    "base_conv_explicit": ({"name": "base_conv", "kernel_size": -1, "implicit_long_conv": False}, 0),
    "base_conv_use_act": ({"name": "base_conv", "kernel_size": -1, "use_act": True}, 0),
    "h3": ({"name": "h3", "d_state": 8}, 0),
    "h3_head_dim_2": ({"name": "h3", "d_state": 8, "head_dim": 2}, 0),
    "hyena": ({"name": "hyena", "filter_order": 8}, 0),
    "s4d": ({"name": "s4d", "d_state": 8}, 0),
}
# Every (mixer, path) is a compile, and interpreted Pallas compiles slowly: the default suite checks each
# gated-core mixer (BaseConv's explicit filter, H3 with head_dim 1, Hyena) on xla and on one other path;
# every other pair (S4D's included) runs with -m slow.
DEFAULT_PAIRS = {("base_conv_explicit", "pallas"), ("h3", "monarch"), ("hyena", "pallas"),
                 ("base_conv_explicit", "xla"), ("h3", "xla"), ("hyena", "xla")}
CASES = [pytest.param(name, impl, marks=[] if (name, impl) in DEFAULT_PAIRS else [pytest.mark.slow])
         for name in CONFIGS for impl in ("xla", "monarch", "pallas")]


def _build(name: str, implementation: str | None | type = ...) -> nnx.Module:
  cfg, layer_idx = CONFIGS[name]
  if implementation is not ...:
    cfg = cfg | {"conv_implementation": implementation}
  return mixers.build(cfg, d_model=D, seq_len=L, layer_idx=layer_idx, n_layers=N_LAYERS, rngs=nnx.Rngs(0))


@functools.cache
def _output_of(name: str, implementation: str | None) -> np.ndarray:
  return _output(_build(name, implementation))


def _output(module: nnx.Module) -> np.ndarray:
  graphdef, state = nnx.split(module)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((B, L, D)), jnp.float32)
  return np.asarray(jax.jit(lambda s, x_: nnx.merge(graphdef, s)(x_))(state, x), np.float64)


@pytest.mark.parametrize("name,implementation", CASES)
def test_output_does_not_depend_on_the_implementation(name, implementation):
  expected = _output_of(name, "reference")
  actual = _output_of(name, implementation)
  scale = np.abs(expected).max()
  assert scale > 0
  err = np.abs(actual - expected).max()
  assert err <= RTOL * scale, f"{name} {implementation}: max err {err:.3g} > {RTOL} * {scale:.3g}"


@pytest.mark.parametrize("name", ["base_conv_explicit", "hyena"])
def test_default_implementation_is_xla_on_cpu(name):
  chex.assert_trees_all_equal(_output(_build(name)), _output_of(name, "xla"))


def _param_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  return {"/".join(map(str, path)): v.shape for path, v in nnx.state(module, nnx.Param).flat_state()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_tree_does_not_depend_on_the_implementation(name):
  tree = _param_shapes(_build(name))
  for implementation in (None, "pallas"):
    assert _param_shapes(_build(name, implementation)) == tree, implementation


def test_base_conv_long_parameter_names_are_the_checkpointed_ones():
  assert _param_shapes(_build("base_conv_explicit", "pallas")) == {
      "conv/h_lc": (L, D), "projection/kernel": (D, D), "projection/bias": (D,)}


@pytest.mark.parametrize("name", ["base_conv_short", "h3", "hyena", "s4d"])
def test_unknown_conv_implementation_is_a_one_line_value_error(name):
  with pytest.raises(ValueError, match=r"model\.mixer\.conv_implementation must be None or one of"):
    _build(name, "cuda")


@pytest.mark.slow
def test_hyena_parameter_gradients_through_pallas_match_xla():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((B, L, D)), jnp.float32)

  def grads(implementation):
    graphdef, params, rest = nnx.split(_build("hyena", implementation), nnx.Param, ...)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)
    return jax.jit(jax.grad(loss))(params)

  for a, e in zip(jax.tree.leaves(grads("pallas")), jax.tree.leaves(grads("xla"))):
    scale = float(jnp.abs(e).max())
    assert float(jnp.abs(a - e).max()) <= 1e-4 * scale + 1e-12
