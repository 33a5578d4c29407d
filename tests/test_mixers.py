"""Spec of every registered sequence mixer (`zoo_jax.mixers`), parameterized over the registry.

A mixer maps x (b, l, d) -> (b, l, d) and:
- returns the input's shape and dtype when built with that dtype (float32, bfloat16), keeping its
  parameters in float32 (the optimizer's updates would be lost to bfloat16 rounding);
- is causal: d out[t] / d x[s] = 0 for every s > t (exactly; within float32 round-off where the path
  convolves by FFT), while out[t] does depend on x[t] and, for t > 0, on some earlier x[s];
- has finite gradients of a loss w.r.t. the input and every parameter, and every parameter gets one;
- reports `state_size` = the formula of its docstring (elements per example, one layer);
- parses its hyperparameters strictly: an unknown key, a wrong type or an out-of-range value is a
  one-line ValueError naming the field;
- is listed by `python -m zoo_jax.mixers`.

The examples come from `mixers.names()`: a newly registered mixer is tested with its default
hyperparameters without editing this file (`test_a_newly_registered_mixer_is_picked_up` shows it);
`KNOWN_EXAMPLES` adds hand-written examples, with their state sizes, for the mixers we know.
"""

from collections.abc import Callable
import dataclasses
import functools
import os
import subprocess
import sys

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import layers, mixers
from zoo_jax.mixers import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L, D, N_LAYERS = 2, 12, 16, 2

# FFT convolutions mix every position into every frequency, so the future reaches the past by float32
# round-off: measured <= 4e-8 of the Jacobian's largest entry here (and ~1e-7 in tests/test_long_conv.py).
# 1e-6 leaves 25x headroom.
FFT_LEAK_RTOL = 1e-6
# out[t] "depends" on x[s] when d out[t] / d x[s] exceeds 10x the leak allowance: above anything round-off
# can produce, and 10x below the weakest real dependence measured here, 1e-4 of the largest entry (the
# implicit long conv at init: its filter is an MLP of N(0, 0.02) weights, ~1e-3, next to the residual's 1).
DEPENDS_OVER_LEAK = 10
# bfloat16 keeps 8 significand bits: each rounding (input, matmuls' outputs, output) is <= 2^-9 relative.
# Measured <= 0.45% of max|out| against the float32 mixer; 2% allows a few roundings to add up.
BF16_RTOL = 2e-2


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, for functools.cache
class Example:
  id: str
  mixer: dict
  layer_idx: int = 0
  # (d_model, seq_len) -> elements of state, the docstring's formula; None for a mixer we don't know.
  state_size: Callable[[int, int], int] | None = None
  # Largest d out[t] / d x[s > t] allowed, relative to the Jacobian's largest entry. A mixer we don't
  # know may convolve by FFT, so it gets the FFT allowance.
  causal_rtol: float = FFT_LEAK_RTOL


def _kv_cache(d, l):
  return 2 * d * l


def _short_conv_k3(d, l):
  return d * (3 - 1)


def _long_conv(d, l):
  return d * l


BASE_CONV_K3 = {"name": "base_conv", "kernel_size": 3}
KNOWN_EXAMPLES = {
    "attention": [
        Example("attention/heads=1", {"name": "attention", "num_heads": 1}, 0, _kv_cache, 0.0),
        Example("attention/heads=2", {"name": "attention", "num_heads": 2}, 0, _kv_cache, 0.0),
    ],
    "base_conv": [
        Example("base_conv/k=3", BASE_CONV_K3, 0, _short_conv_k3, 0.0),
        Example("base_conv/k=3,use_act", {**BASE_CONV_K3, "use_act": True}, 0, _short_conv_k3, 0.0),
        Example("base_conv/k=[3,-1],layer1,implicit", {"name": "base_conv", "kernel_size": [3, -1]},
                1, _long_conv, FFT_LEAK_RTOL),
        Example("base_conv/k=[3,-1],layer1,explicit",
                {"name": "base_conv", "kernel_size": [3, -1], "implicit_long_conv": False},
                1, _long_conv, FFT_LEAK_RTOL),
    ],
    # The issue-3 zoo, at its default hyperparameters; formulas from each module's docstring.
    "sliding_window": [Example("sliding_window/w=64", {"name": "sliding_window"}, 0,
                               lambda d, l: 2 * d * min(64 + 1, l), 0.0),
                       Example("sliding_window/w=3", {"name": "sliding_window", "window_size": 3}, 0,
                               lambda d, l: 2 * d * min(3 + 1, l), 0.0)],
    "blocked": [Example("blocked/b=64", {"name": "blocked"}, 0, lambda d, l: 2 * d * min(64, l), 0.0)],
    "retnet": [Example("retnet/heads=2", {"name": "retnet"}, 0, lambda d, l: d * d // 2, 0.0),
               Example("retnet/chunk=5", {"name": "retnet", "chunk_size": 5}, 0, lambda d, l: d * d // 2, 0.0)],
    "hyena": [Example("hyena/defaults", {"name": "hyena"}, 0, lambda d, l: 3 * d * 2 + d * l, FFT_LEAK_RTOL)],
    "h3": [Example("h3/defaults", {"name": "h3"}, 0, lambda d, l: d * (min(64, l) - 1) + 64 * d, FFT_LEAK_RTOL),
           Example("h3/d_state=12,head_dim=2", {"name": "h3", "d_state": 12, "head_dim": 2}, 0,
                   lambda d, l: d * (min(12, l) - 1) + d * 2 * 12, FFT_LEAK_RTOL)],
    "s4d": [Example("s4d/defaults", {"name": "s4d"}, 0, lambda d, l: 64 * d, FFT_LEAK_RTOL)],
    "rwkv": [Example("rwkv/defaults", {"name": "rwkv"}, 0, lambda d, l: 4 * d, 0.0)],
    "based": [Example("based/f=16", {"name": "based"}, 0,
                      lambda d, l: (1 + 16 + 16 * 17 // 2) * (d + 1), 0.0),
              Example("based/f=8,linear", {"name": "based", "feature_dim": 8, "parallel_implementation": "linear",
                                           "chunk_size": 5}, 0, lambda d, l: (1 + 8 + 8 * 9 // 2) * (d + 1), 0.0)],
    "mamba": [Example("mamba/defaults", {"name": "mamba"}, 0, lambda d, l: 2 * d * (4 - 1) + 2 * d * 16, 0.0),
              Example("mamba/associative", {"name": "mamba", "scan": "associative"}, 0,
                      lambda d, l: 2 * d * (4 - 1) + 2 * d * 16, 0.0)],
    # Input-dependent sparse attention (issue 7); its own tests are in tests/test_sparse_attention.py.
    "sparse_attention": [
        Example("sparse_attention/full", {"name": "sparse_attention", "selection": "full"}, 0, _kv_cache, 0.0),
        Example("sparse_attention/random,k=5", {"name": "sparse_attention", "selection": "random", "budget": 5},
                0, lambda d, l: 2 * d * min(5, l), 0.0),
        Example("sparse_attention/programmatic,keys=all,heads=2",
                {"name": "sparse_attention", "selection": "programmatic", "budget": 6, "keys": "all",
                 "num_heads": 2}, 0, _kv_cache, 0.0),
        Example("sparse_attention/learned,k=6", {"name": "sparse_attention", "selection": "learned", "budget": 6},
                0, lambda d, l: (2 * d + 1) * min(6, l), 0.0),
        Example("sparse_attention/learned,keys=all", {"name": "sparse_attention", "selection": "learned",
                                                      "budget": 6, "keys": "all"}, 0, lambda d, l: (2 * d + 1) * l,
                0.0),
    ],
    "hybrid": [  # layer 1 of [base_conv k=3, attention] is attention (layer 0: test_hybrid_cycles_...)
        Example("hybrid/[base_conv,attention],layer1",
                {"name": "hybrid", "mixers": [BASE_CONV_K3, {"name": "attention"}]}, 1, _kv_cache, 0.0),
    ],
}


def examples() -> list[Example]:
  """One or more examples per registered mixer; its default hyperparameters if we don't know it."""
  return [example for name in mixers.names()
          for example in KNOWN_EXAMPLES.get(name, [Example(f"{name}/defaults", {"name": name})])]


def _params(examples_):
  return [pytest.param(e, id=e.id) for e in examples_]


EXAMPLES = _params(examples())
EXAMPLES_WITH_STATE_FORMULA = _params(e for e in examples() if e.state_size is not None)
DTYPES = [pytest.param(jnp.float32, id="float32"), pytest.param(jnp.bfloat16, id="bfloat16")]


def build(mixer: dict, layer_idx: int = 0, dtype=jnp.float32):
  return mixers.build(mixer, d_model=D, seq_len=L, layer_idx=layer_idx, n_layers=N_LAYERS, rngs=nnx.Rngs(0),
                      dtype=dtype)


def tokens_for(x: jax.Array) -> jax.Array:
  """Token ids (b, l) for a mixer that reads them (`uses_tokens`): a fixed draw from a vocabulary of 4, so
  that tokens repeat (sparse_attention's programmatic selection picks repeats)."""
  return jnp.asarray(np.random.default_rng(7).integers(0, 4, x.shape[:2]), jnp.int32)


def call(module: nnx.Module, x: jax.Array) -> jax.Array:
  return mixers.apply(module, x, tokens_for(x))


def functional(module: nnx.Module):
  """(apply, params): the module as a pure function apply(params, x) of its parameters."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  return (lambda params_, x: call(nnx.merge(graphdef, params_, rest), x)), params


def output_positions(module: nnx.Module, x: jax.Array) -> np.ndarray:
  """(b, l) bool: where the mixer writes an output. Every position, except for a sparse mixer
  (`selected_positions`), which outputs zero elsewhere and is checked at the positions it selects."""
  selected = getattr(module, "selected_positions", None)
  if selected is None:
    return np.ones(x.shape[:2], bool)
  return np.asarray(selected(x, tokens_for(x)))


def _normal(shape, seed=0):
  # numpy draws: eager jax.random would compile a kernel per shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.cache
def forward(example: Example, dtype) -> tuple[jax.Array, jax.Array, list]:
  """(x, out, param dtypes) for the mixer built in `dtype` on x (B, L, D) in `dtype`; cached because the
  bfloat16 check reuses both outputs."""
  module = build(example.mixer, example.layer_idx, dtype)
  apply, params = functional(module)
  x = _normal((B, L, D)).astype(dtype)
  return x, jax.jit(apply)(params, x), [p.dtype for p in jax.tree.leaves(params)]


def _dependence(example: Example) -> tuple[np.ndarray, float, np.ndarray]:
  """J[t, s] = max_ij |d out[0, t, i] / d x[0, s, j]| on one random x (1, L, D), max J, and the positions
  (L,) bool where the mixer outputs."""
  module = build(example.mixer, example.layer_idx)
  apply, params = functional(module)
  x = _normal((1, L, D), seed=1)
  jac_tisj = jax.jit(jax.jacrev(lambda x_: apply(params, x_)[0]))(x)[:, :, 0]
  jac_ts = np.abs(np.asarray(jac_tisj, np.float64)).max(axis=(1, 3))
  return jac_ts, jac_ts.max(), output_positions(module, x)[0]


# ------------------------------------------------------------------------------------ per example


def test_known_examples_name_registered_mixers():
  assert set(KNOWN_EXAMPLES) <= set(mixers.names())
  for name, examples_ in KNOWN_EXAMPLES.items():
    assert all(e.mixer["name"] == name for e in examples_), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("example", EXAMPLES)
def test_output_has_the_input_shape_and_dtype(example, dtype):
  x, out, param_dtypes = forward(example, dtype)
  chex.assert_shape(out, x.shape)
  chex.assert_type(out, dtype)
  assert param_dtypes and set(param_dtypes) == {jnp.dtype(jnp.float32)}, param_dtypes
  assert np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.parametrize("example", EXAMPLES)
def test_bfloat16_output_is_close_to_float32(example):
  _, out32, _ = forward(example, jnp.float32)
  _, out16, _ = forward(example, jnp.bfloat16)
  out32, out16 = np.asarray(out32, np.float64), np.asarray(out16, np.float64)
  err, scale = np.abs(out16 - out32).max(), np.abs(out32).max()
  assert err <= BF16_RTOL * scale, f"bf16 vs f32: max abs err {err:.3g} > {BF16_RTOL} * {scale:.3g}"


@pytest.mark.parametrize("example", EXAMPLES)
def test_causal_by_gradient(example):
  jac_ts, scale, outputs_t = _dependence(example)
  future = np.triu(jac_ts, k=1)
  t, s = np.unravel_index(future.argmax(), future.shape)
  assert future.max() <= example.causal_rtol * scale, (
      f"out[{t}] depends on the future x[{s}]: {future.max():.3g} (scale {scale:.3g})")
  # Where the mixer outputs (every position but for a sparse mixer), out[t] depends on x[t] and, after
  # the first such position, on some earlier x; a sparse mixer's other outputs are zero, so constant.
  first = np.argmax(outputs_t)
  assert outputs_t.sum() >= 2 and (jac_ts[~outputs_t] == 0).all(), outputs_t
  depends = jac_ts > DEPENDS_OVER_LEAK * example.causal_rtol * scale
  diagonal = depends.diagonal() | ~outputs_t
  assert diagonal.all(), f"out[t] does not depend on x[t] at t = {np.where(~diagonal)}"
  on_past = np.tril(depends, k=-1).any(axis=1) | ~outputs_t
  on_past[:first + 1] = True
  assert on_past.all(), f"out[t] does not depend on any earlier x at t = {np.where(~on_past)[0]}"


@pytest.mark.parametrize("example", EXAMPLES)
def test_gradients_are_finite_and_reach_every_parameter(example):
  apply, params = functional(build(example.mixer, example.layer_idx))
  x, cotangent = _normal((B, L, D), seed=2), _normal((B, L, D), seed=3)
  loss = lambda params_, x_: jnp.sum(apply(params_, x_) * cotangent)
  grad_params, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  leaves = jax.tree_util.tree_flatten_with_path(grad_params)[0]
  assert leaves, "a mixer without parameters"
  for path, g in [*leaves, (("input",), grad_x)]:
    g = np.asarray(g)
    assert np.isfinite(g).all(), f"non-finite gradient at {jax.tree_util.keystr(path)}"
    assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("example", EXAMPLES_WITH_STATE_FORMULA)
def test_state_size_is_the_documented_formula(example):
  for d_model, seq_len in [(D, L), (32, 40)]:
    size = mixers.state_size(example.mixer, d_model=d_model, seq_len=seq_len, layer_idx=example.layer_idx)
    assert type(size) is int and size == example.state_size(d_model, seq_len), (d_model, seq_len, size)


# ------------------------------------------------------------------------------- per registered name


# Recurrent ≡ parallel: the step form replays the sequence token by token in float32. Measured <= 3e-7
# of max|out| (the FFT's round-off against a direct sum); 1e-5 catches any misplaced tap or lag.
RECURRENT_RTOL = 1e-5


def has_recurrent_form(module: nnx.Module) -> bool:
  return callable(getattr(module, "step", None)) and callable(getattr(module, "init_state", None))


def run_recurrent(module: nnx.Module, x_bld: jax.Array) -> jax.Array:
  """out (b, l, d) from `init_state` and one `step` per token, scanned."""
  graphdef, state = nnx.split(module)

  def scan(x):
    m = nnx.merge(graphdef, state)
    carry, ys = jax.lax.scan(lambda c, x_bd: m.step(c, x_bd), m.init_state(x.shape[0]),
                             jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)

  return jax.jit(scan)(x_bld)


@pytest.mark.parametrize("example", EXAMPLES)
def test_recurrent_form_equals_parallel_form(example):
  module = build(example.mixer, example.layer_idx)
  if not has_recurrent_form(module):
    pytest.skip(f"{example.id} has no recurrent form (init_state/step)")
  x, out, _ = forward(example, jnp.float32)
  recurrent = run_recurrent(module, x)
  scale = float(jnp.abs(out).max())
  chex.assert_trees_all_close(recurrent, out, atol=RECURRENT_RTOL * scale, rtol=0)


@pytest.mark.parametrize("example", EXAMPLES)
def test_state_size_counts_the_recurrent_state(example):
  """`state_size` = the floating-point elements per example of `init_state` (counters excluded)."""
  module = build(example.mixer, example.layer_idx)
  if not has_recurrent_form(module):
    pytest.skip(f"{example.id} has no recurrent form (init_state/step)")
  state = module.init_state(1)
  elements = sum(leaf.size for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating))
  assert elements == mixers.state_size(example.mixer, d_model=D, seq_len=L, layer_idx=example.layer_idx)


# Prefill → decode: the parallel form returns its final state and continues from a given one (the
# state-passing contract in zoo_jax/mixers/registry.py). Prefix lengths: one token, a chunk boundary of the
# chunk-5 examples (retnet, based), a length past it, and the whole sequence (nothing left to decode).
PREFILL_LENGTHS = (1, 5, 7, L)


def _recurrence(m: nnx.Module, x: jax.Array, state=None):
  """(final state, out (b, l, d)) of `step` scanned over x from `state` (default `init_state`)."""
  state = m.init_state(x.shape[0]) if state is None else state
  state, ys = jax.lax.scan(lambda c, x_bd: m.step(c, x_bd), state, jnp.swapaxes(x, 0, 1))
  return state, jnp.swapaxes(ys, 0, 1)


def _parallel(m: nnx.Module, x: jax.Array, tokens: jax.Array, state=None):
  """(y, final state) of the parallel form on x from `state`."""
  return mixers.apply(m, x, tokens, state=state, return_state=True)


def assert_states_close(got, want, what: str) -> None:
  """Same structure, shapes and dtypes; integer leaves (positions, counters) equal; float leaves within
  RECURRENT_RTOL of the leaf's largest magnitude."""
  assert jax.tree.structure(got) == jax.tree.structure(want), (what, jax.tree.structure(got),
                                                               jax.tree.structure(want))
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    where = f"{what} state{jax.tree_util.keystr(path)}"
    assert (g.shape, g.dtype) == (w.shape, w.dtype), (where, g.shape, g.dtype, w.shape, w.dtype)
    if jnp.issubdtype(w.dtype, jnp.floating):
      scale = max(float(jnp.abs(w).max()), 1e-6)
      chex.assert_trees_all_close(g, w, atol=RECURRENT_RTOL * scale, rtol=0, custom_message=where)
    else:
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=where)


def _stateful_case(example: Example):
  """(x, m(x), tokens, merge: () -> the module, inside a jit) for a mixer with a recurrent form; skips the
  test otherwise."""
  module = build(example.mixer, example.layer_idx)
  if not has_recurrent_form(module):
    pytest.skip(f"{example.id} has no recurrent form (init_state/step)")
  x, out, _ = forward(example, jnp.float32)
  graphdef, params = nnx.split(module)
  return x, out, tokens_for(x), lambda: nnx.merge(graphdef, params)


@pytest.mark.parametrize("example", EXAMPLES)
def test_prefill_then_step_equals_the_parallel_form(example):
  """For each prefix length t: `y, s = m(x[:, :t], return_state=True)`, then `step` from s over x[:, t:]:
  the outputs are m(x)'s and the final state is the token recurrence's over all of x. (All t in one jit:
  one compilation per example.)"""
  x, out, tokens, merge = _stateful_case(example)

  def run(x):
    m = merge()
    results = []
    for t in PREFILL_LENGTHS:
      y_prefill, state = _parallel(m, x[:, :t], tokens[:, :t])
      state, y_decode = _recurrence(m, x[:, t:], state)
      results.append((jnp.concatenate([y_prefill, y_decode], axis=1), state))
    return results, _recurrence(m, x)[0]

  results, want_state = jax.jit(run)(x)
  scale = float(jnp.abs(out).max())
  for t, (y, state) in zip(PREFILL_LENGTHS, results):
    chex.assert_trees_all_close(y, out, atol=RECURRENT_RTOL * scale, rtol=0, custom_message=f"prefill {t}")
    assert_states_close(state, want_state, f"prefill {t} then decode:")


@pytest.mark.parametrize("example", EXAMPLES)
def test_parallel_form_from_a_state_equals_the_recurrence(example):
  """For each t: the token recurrence over x[:, :t] gives s; `m(x[:, t:], state=s, return_state=True)`
  gives m(x)'s outputs at t.. and the recurrence's final state (a chunked form from a non-zero state)."""
  x, out, tokens, merge = _stateful_case(example)
  starts = PREFILL_LENGTHS[:-1]

  def run(x):
    m = merge()
    results = [_parallel(m, x[:, t:], tokens[:, t:], _recurrence(m, x[:, :t])[0]) for t in starts]
    return results, _recurrence(m, x)[0]

  results, want_state = jax.jit(run)(x)
  scale = float(jnp.abs(out).max())
  for t, (y, state) in zip(starts, results):
    chex.assert_trees_all_close(y, out[:, t:], atol=RECURRENT_RTOL * scale, rtol=0, custom_message=f"from {t}")
    assert_states_close(state, want_state, f"parallel from the state at {t}:")


def test_every_foundation_mixer_has_a_recurrent_form():
  for name in ("attention", "base_conv", "hybrid"):
    for example in KNOWN_EXAMPLES[name]:
      assert has_recurrent_form(build(example.mixer, example.layer_idx)), example.id


@pytest.mark.parametrize("name", mixers.names())
def test_builds_from_defaults_with_a_positive_state_size(name):
  for layer_idx in range(N_LAYERS):
    apply, params = functional(build({"name": name}, layer_idx))
    out = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((B, L, D), jnp.float32))
    assert (out.shape, out.dtype) == ((B, L, D), jnp.float32), (layer_idx, out)
    size = mixers.state_size({"name": name}, d_model=D, seq_len=L, layer_idx=layer_idx)
    assert type(size) is int and size > 0, (layer_idx, size)


@pytest.mark.parametrize("name", mixers.names())
def test_unknown_hparam_is_a_one_line_value_error(name):
  with pytest.raises(ValueError) as err:
    mixers.parse({"name": name, "kernel_sise": 3})
  message = str(err.value)
  assert message.startswith("model.mixer.kernel_sise is not a hyperparameter") and "\n" not in message


def test_python_m_zoo_jax_mixers_lists_every_mixer():
  result = subprocess.run([sys.executable, "-m", "zoo_jax.mixers"], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=120)
  first_words = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
  for name in mixers.names():
    assert name in first_words, result.stdout
    assert mixers.get(name).state_size_formula in result.stdout, name


# ------------------------------------------------------------------------------------- known mixers

BAD_HPARAMS = [  # (config, the field its one-line error must name)
    ({"name": "attention", "num_heads": 0}, "model.mixer.num_heads"),
    ({"name": "attention", "num_heads": True}, "model.mixer.num_heads"),
    ({"name": "attention", "num_heads": 1.0}, "model.mixer.num_heads"),
    ({"name": "base_conv", "kernel_size": 0}, "model.mixer.kernel_size"),
    ({"name": "base_conv", "kernel_size": [3, -2]}, "model.mixer.kernel_size"),
    ({"name": "base_conv", "kernel_size": []}, "model.mixer.kernel_size"),
    ({"name": "base_conv", "kernel_size": "3"}, "model.mixer.kernel_size"),
    ({"name": "base_conv", "implicit_d_emb": 4}, "model.mixer.implicit_d_emb"),
    ({"name": "base_conv", "implicit_d_hidden": 0}, "model.mixer.implicit_d_hidden"),
    ({"name": "base_conv", "use_act": 1}, "model.mixer.use_act"),
    ({"name": "hybrid", "mixers": []}, "model.mixer.mixers"),
    ({"name": "hybrid", "mixers": {"name": "attention"}}, "model.mixer.mixers"),
    ({"name": "hybrid", "mixers": [{"name": "attention", "num_heads": 0}]}, "model.mixer.mixers[0].num_heads"),
    ({"name": "hybrid", "mixers": [BASE_CONV_K3, {"name": "no_such_mixer"}]}, "model.mixer.mixers[1].name"),
    ({"name": "no_such_mixer"}, "model.mixer.name"),
    ({"kernel_size": 3}, "model.mixer.name"),
]


@pytest.mark.parametrize("cfg,field", BAD_HPARAMS, ids=[str(cfg) for cfg, _ in BAD_HPARAMS])
def test_bad_hparams_are_one_line_value_errors_naming_the_field(cfg, field):
  with pytest.raises(ValueError) as err:
    mixers.parse(cfg)
  message = str(err.value)
  assert message.startswith(field) and "\n" not in message, message


@pytest.mark.parametrize("cfg,layer_idx,field", [
    ({"name": "attention", "num_heads": 3}, 0, "model.mixer.num_heads"),  # does not divide d_model = 16
    ({"name": "base_conv", "kernel_size": [3]}, 1, "model.mixer.kernel_size"),  # no entry for layer 1
])
def test_hparams_that_fail_only_at_build_are_value_errors(cfg, layer_idx, field):
  mixers.parse(cfg)  # fine on their own: the error needs d_model / the layer index
  with pytest.raises(ValueError) as err:
    build(cfg, layer_idx)
  assert str(err.value).startswith(field) and "\n" not in str(err.value)


@pytest.mark.parametrize("kernel_size,layer_idx,implicit,conv_cls,state", [
    (3, 0, True, layers.ShortConvolution, D * 2),
    (1, 0, True, layers.ShortConvolution, 0),
    ([3, -1], 0, True, layers.ShortConvolution, D * 2),
    ([3, -1], 1, True, layers.ImplicitLongConvolution, D * L),
    ([3, -1], 1, False, layers.LongConvolution, D * L),
    (L, 0, True, layers.ImplicitLongConvolution, D * L),  # a "short" conv as long as the sequence is long
])
def test_base_conv_builds_the_conv_its_state_size_describes(kernel_size, layer_idx, implicit, conv_cls,
                                                            state):
  cfg = {"name": "base_conv", "kernel_size": kernel_size, "implicit_long_conv": implicit}
  module = build(cfg, layer_idx)
  assert type(module.conv) is conv_cls
  if conv_cls is layers.ShortConvolution:
    chex.assert_shape(module.conv.w_kc[...], (state // D + 1, D))
  assert mixers.state_size(cfg, d_model=D, seq_len=L, layer_idx=layer_idx) == state


def test_hybrid_cycles_its_mixers_over_layers():
  cfg = {"name": "hybrid", "mixers": [BASE_CONV_K3, {"name": "attention"}]}
  for layer_idx in range(4):
    module = build(cfg, layer_idx)
    expected_name, expected_state = [("base_conv", D * 2), ("attention", 2 * D * L)][layer_idx % 2]
    assert module.mixer.mixer_name == expected_name, layer_idx
    assert mixers.state_size(cfg, d_model=D, seq_len=L, layer_idx=layer_idx) == expected_state


# ------------------------------------------------------------------- a mixer registered by a test


DUMMY = "test_cumulative_mean"


@dataclasses.dataclass(frozen=True)
class CumulativeMeanConfig:
  scale: float = 1.0
  reverse: bool = False  # True: anti-causal, to show the causality test fails on it


class CumulativeMean(nnx.Module):
  """y[t] = w ⊙ mean_{s<=t} x[s], w initialised to `scale`. State: the running sum, d."""

  def __init__(self, cfg, *, d_model, seq_len, layer_idx, n_layers, dtype, rngs):
    self.w_d = nnx.Param(jnp.full((d_model,), cfg.scale, jnp.float32))
    self.reverse = cfg.reverse
    self.dtype = dtype

  @staticmethod
  def state_size(cfg, d_model, seq_len, layer_idx):
    return d_model

  def __call__(self, x_bld):
    x_bld = x_bld[:, ::-1] if self.reverse else x_bld
    y_bld = jnp.cumsum(x_bld, axis=1) / jnp.arange(1, x_bld.shape[1] + 1)[:, None]
    y_bld = y_bld[:, ::-1] if self.reverse else y_bld
    return (y_bld * self.w_d[...]).astype(self.dtype)


@pytest.fixture
def registered_dummy(monkeypatch):
  """Registers `CumulativeMean` as DUMMY in a copy of the registry, restored after the test."""
  monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
  registry.register(DUMMY, hparams=CumulativeMeanConfig, state_size_formula="d (running sum)")(
      CumulativeMean)
  return DUMMY


def test_a_newly_registered_mixer_is_picked_up(registered_dummy):
  assert DUMMY not in {p.values[0].mixer["name"] for p in EXAMPLES}  # registered after collection
  found = examples()
  assert [e.id for e in found if e.mixer["name"] != DUMMY] == [p.id for p in EXAMPLES]
  (example,) = [e for e in found if e.mixer["name"] == DUMMY]
  assert example.mixer == {"name": DUMMY}
  # ... and the parameterized tests, run on it, pass.
  for dtype in (jnp.float32, jnp.bfloat16):
    test_output_has_the_input_shape_and_dtype(example, dtype)
  test_bfloat16_output_is_close_to_float32(example)
  test_causal_by_gradient(example)
  test_gradients_are_finite_and_reach_every_parameter(example)
  test_builds_from_defaults_with_a_positive_state_size(DUMMY)
  test_unknown_hparam_is_a_one_line_value_error(DUMMY)


@pytest.mark.parametrize("hparams,message", [
    pytest.param({"reverse": True}, "depends on the future", id="anti_causal"),
    pytest.param({"scale": 0.0}, "does not depend on x", id="zero_output"),
])
def test_causality_test_fails_on_a_leaky_or_dead_mixer(registered_dummy, hparams, message):
  with pytest.raises(AssertionError, match=message):
    test_causal_by_gradient(Example("bad", {"name": DUMMY, **hparams}))
