"""Local softmax attentions (`zoo_jax.mixers.sliding_window`, `zoo_jax.mixers.blocked`) against a naive
float64 reference.

The shared spec (tests/test_mixers.py) checks shapes, dtypes, causality, gradients and recurrent ≡ parallel
at the defaults (where the window and the block cover the whole test sequence); here, with windows and
blocks shorter than the sequence and lengths they do not divide: each mixer against an explicit masked
softmax loop, which inputs each output depends on (by gradient: exactly the mask), recurrent ≡ parallel,
a window or block as long as the sequence = full attention, the state size and the hyperparameter errors.
"""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_mixers import functional, run_recurrent  # the shared spec's pure apply and scanned steps
from zoo_jax import mixers

D, N_LAYERS = 16, 2
# The examples: (config, sequence length). Windows and blocks of 1, shorter than and not dividing L,
# more than one head.
CASES = [
    ({"name": "sliding_window", "window_size": 1}, 9),
    ({"name": "sliding_window", "window_size": 3, "num_heads": 2}, 13),
    ({"name": "blocked", "block_size": 1}, 9),
    ({"name": "blocked", "block_size": 5, "num_heads": 4}, 13),
    ({"name": "blocked", "block_size": 4}, 12),
]
IDS = [f"{cfg['name']}/{','.join(f'{k}={v}' for k, v in cfg.items() if k != 'name')},L={l}"
       for cfg, l in CASES]
# Float32 against float64 of the same formula: round-off ~1e-7 of the output scale; 1e-5 catches any
# wrong key in or out of a mask (an O(1) change in a softmax).
RTOL = 1e-5


def visible(cfg: dict, i: int, j: int) -> bool:
  """The definition: may query i see key j?"""
  if cfg["name"] == "sliding_window":
    return i - cfg.get("window_size", 64) <= j <= i
  block = cfg.get("block_size", 64)
  return j <= i and i // block == j // block


def mask_of(cfg: dict, length: int) -> np.ndarray:
  return np.array([[visible(cfg, i, j) for j in range(length)] for i in range(length)])


def build(cfg: dict, seq_len: int, dtype=jnp.float32) -> nnx.Module:
  return mixers.build(cfg, d_model=D, seq_len=seq_len, layer_idx=0, n_layers=N_LAYERS, rngs=nnx.Rngs(0),
                      dtype=dtype)


def naive(module: nnx.Module, cfg: dict, x_bld) -> np.ndarray:
  """Projections, then per query and head a softmax over exactly the visible keys, in float64."""
  f64 = lambda a: np.asarray(a, np.float64)
  x = f64(x_bld)
  b, l, d = x.shape
  h = cfg.get("num_heads", 1)
  qkv = x @ f64(module.qkv_proj.kernel[...]).reshape(d, 3 * d) + f64(module.qkv_proj.bias[...]).reshape(-1)
  q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, l, h, d // h) for i in range(3))
  y = np.zeros((b, l, h, d // h))
  for i in range(l):
    keys = [j for j in range(l) if visible(cfg, i, j)]
    logits = np.einsum("bhk,bjhk->bhj", q[:, i], k[:, keys]) / np.sqrt(d // h)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y[:, i] = np.einsum("bhj,bjhk->bhk", weights, v[:, keys])
  return y.reshape(b, l, d) @ f64(module.out_proj.kernel[...]) + f64(module.out_proj.bias[...])


def apply_parallel(module, x):
  apply, params = functional(module)
  return jax.jit(apply)(params, x)


def _inputs(length, seed=0, batch=2):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, D)), jnp.float32)


def assert_close_to_scale(actual, expected, rtol=RTOL):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  chex.assert_equal_shape([actual, expected])
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= rtol * scale, f"max abs err {err:.3g} > {rtol} * {scale:.3g}"


@pytest.mark.parametrize("cfg,length", CASES, ids=IDS)
def test_parallel_and_recurrent_forms_are_the_masked_softmax(cfg, length):
  module, x = build(cfg, length), _inputs(length)
  expected = naive(module, cfg, x)
  assert_close_to_scale(apply_parallel(module, x), expected)
  assert_close_to_scale(run_recurrent(module, x), expected)


@pytest.mark.parametrize("cfg,length", CASES, ids=IDS)
def test_each_output_depends_on_exactly_the_visible_inputs(cfg, length):
  """d out[t] / d x[s] is exactly 0 outside the mask (and never 0 inside it)."""
  apply, params = functional(build(cfg, length))
  jac = jax.jit(jax.jacrev(lambda x_: apply(params, x_)[0]))(_inputs(length, 1, batch=1))
  depends_ts = np.abs(np.asarray(jac))[:, :, 0].max(axis=(1, 3)) > 0
  np.testing.assert_array_equal(depends_ts, mask_of(cfg, length))


@pytest.mark.parametrize("cfg", [{"name": "sliding_window", "window_size": 11}, {"name": "blocked"}],
                         ids=["sliding_window/w=L-1", "blocked/b=64>L"])
def test_a_window_or_block_covering_the_sequence_is_full_attention(cfg):
  """Same init (same projections, same rngs order) and a mask that hides nothing: `attention`'s output."""
  x = _inputs(12, 2)
  full = build({"name": "attention", "num_heads": 1}, 12)
  chex.assert_trees_all_close(apply_parallel(build(cfg, 12), x), apply_parallel(full, x), atol=1e-6, rtol=0)


def test_sliding_window_bfloat16_is_close_to_float32_past_the_window():
  cfg, length = {"name": "sliding_window", "window_size": 8}, 40
  x = _inputs(length, 3)
  out32 = apply_parallel(build(cfg, length), x)
  out16 = apply_parallel(build(cfg, length, jnp.bfloat16), x.astype(jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16
  assert_close_to_scale(out16, out32, rtol=2e-2)  # tests/test_mixers.py's BF16_RTOL


@pytest.mark.parametrize("cfg,formula", [
    ({"name": "sliding_window"}, lambda d, l: 2 * d * min(64 + 1, l)),
    ({"name": "sliding_window", "window_size": 3}, lambda d, l: 2 * d * min(3 + 1, l)),
    ({"name": "blocked"}, lambda d, l: 2 * d * min(64, l)),
    ({"name": "blocked", "block_size": 5}, lambda d, l: 2 * d * min(5, l)),
], ids=["sliding_window/defaults", "sliding_window/w=3", "blocked/defaults", "blocked/b=5"])
def test_state_size_is_the_formula_and_the_cache(cfg, formula):
  for d_model, seq_len in [(16, 12), (32, 100)]:
    assert mixers.state_size(cfg, d_model=d_model, seq_len=seq_len, layer_idx=0) == formula(d_model, seq_len)
  state = build(cfg, 12).init_state(1)
  floats = sum(leaf.size for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating))
  assert floats == formula(D, 12)


@pytest.mark.parametrize("cfg,field", [
    ({"name": "sliding_window", "window_size": 0}, "model.mixer.window_size"),
    ({"name": "sliding_window", "window_size": -1}, "model.mixer.window_size"),
    ({"name": "sliding_window", "window_size": 8.0}, "model.mixer.window_size"),
    ({"name": "sliding_window", "window_size": True}, "model.mixer.window_size"),
    ({"name": "sliding_window", "num_heads": 0}, "model.mixer.num_heads"),
    ({"name": "sliding_window", "block_size": 8}, "model.mixer.block_size"),  # Zoology's name: not ours
    ({"name": "blocked", "block_size": 0}, "model.mixer.block_size"),
    ({"name": "blocked", "block_size": "4"}, "model.mixer.block_size"),
    ({"name": "blocked", "num_heads": -2}, "model.mixer.num_heads"),
    ({"name": "blocked", "window_size": 8}, "model.mixer.window_size"),
], ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_bad_hparams_are_one_line_value_errors_naming_the_field(cfg, field):
  with pytest.raises(ValueError) as err:
    mixers.parse(cfg)
  assert str(err.value).startswith(field) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("name", ["sliding_window", "blocked"])
def test_heads_that_do_not_divide_d_model_fail_at_build(name):
  with pytest.raises(ValueError, match=r"^model\.mixer\.num_heads"):
    build({"name": name, "num_heads": 3}, 12)
