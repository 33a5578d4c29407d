"""Blockwise (FlashAttention-2 style) causal attention, `zoo_jax.ops.attention`, and the attention mixers'
`implementation` switch.

The op against the plain-jnp masked softmax (`attention_reference`): outputs and gradients in q, k, v, for
lengths the block divides and not, several heads, windows from 0 to past the sequence, bf16 inputs; that
no l×l array appears in the forward or the backward; that a window costs O(l·w); and each mixer
(attention, sliding_window, blocked) with implementation 'blockwise' against 'xla' (today's path).

Tolerances. Float32: max |error| <= 1e-5 × max(max |expected|, 1) (the floor for window 0, whose q and k
gradients are exactly 0 in the reference and round-off here; inputs are O(1)) (the same softmax summed in another order:
round-off is ~1e-7 of the scale; a wrong mask or a wrong rescale is an O(1) change). bf16 inputs: 2e-2 of
the scale against the float32 reference of the same bf16 values (bf16 has 8 bits of mantissa, and the
probabilities are rounded to bf16 before the matmul with v, as in FlashAttention).
"""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import model as model_lib
from zoo_jax import mixers
from zoo_jax.ops import attention as attention_ops

RTOL = 1e-5
BF16_RTOL = 2e-2


def _qkv(b, l, h, k, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((b, l, h, k)), dtype) for _ in range(3))


def assert_close_to_scale(actual, expected, rtol=RTOL):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  chex.assert_equal_shape([actual, expected])
  err, scale = np.abs(actual - expected).max(), max(np.abs(expected).max(), 1.0)
  assert err <= rtol * scale, f"max abs err {err:.3g} > {rtol} * {scale:.3g}"


def _value_and_grads(fn, q, k, v):
  """The output and the gradients of a fixed, position-dependent linear readout of it in (q, k, v)."""
  weights = jnp.sin(jnp.arange(q.shape[1] * q.shape[3], dtype=jnp.float32)).reshape(1, q.shape[1], 1, -1)
  loss = lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_).astype(jnp.float32) * weights)
  return jax.jit(lambda q_, k_, v_: (fn(q_, k_, v_), jax.grad(loss, argnums=(0, 1, 2))(q_, k_, v_)))(q, k, v)


# (batch, length, heads, head width, block, window): the block divides the length or not, one block or
# many, windows of 0, inside a block, across blocks, and past the sequence; each of the op's three layouts
# (rows: full attention over <= 4 blocks; offsets: more blocks; band: a window).
# The default suite keeps three (each compiles a forward and a backward); the rest run with the slow tests.
slow = lambda *case: pytest.param(*case, marks=pytest.mark.slow)
CASES = [
    (2, 48, 1, 8, 8, None),  # 6 blocks: offsets 1..2 paired with 5..4 in a loop, offset 3 alone
    (1, 37, 3, 8, 8, None),  # 5 blocks, the last padded: offsets paired (1, 4), (2, 3)
    (2, 30, 1, 8, 8, None),  # 4 blocks, the last padded: the rows path
    slow(2, 29, 2, 4, 32, None),
    (1, 40, 2, 8, 8, 0),
    slow(2, 37, 1, 8, 8, 5),
    (1, 50, 2, 8, 16, 17),  # the band: 2 key blocks before each query block, ragged end
    slow(1, 30, 1, 8, 8, 100),
]


@pytest.mark.parametrize("b,l,h,k,block,window", CASES)
def test_blockwise_output_and_gradients_are_the_masked_softmax(b, l, h, k, block, window):
  q, kk, v = _qkv(b, l, h, k)
  ref_out, ref_grads = _value_and_grads(
      lambda *a: attention_ops.attention_reference(*a, window=window), q, kk, v)
  out, grads = _value_and_grads(
      lambda *a: attention_ops.causal_attention(*a, window=window, implementation="blockwise", block=block),
      q, kk, v)
  assert_close_to_scale(out, ref_out)
  for grad, ref_grad in zip(grads, ref_grads):
    assert_close_to_scale(grad, ref_grad)


@pytest.mark.parametrize("window", [None, pytest.param(6, marks=pytest.mark.slow)])
def test_blockwise_bfloat16_inputs_give_bfloat16_close_to_float32(window):
  q, kk, v = _qkv(1, 45, 2, 8, seed=1, dtype=jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)
  ref_out, ref_grads = _value_and_grads(
      lambda *a: attention_ops.attention_reference(*map(f32, a), window=window), q, kk, v)
  out, grads = _value_and_grads(
      lambda *a: attention_ops.causal_attention(*a, window=window, implementation="blockwise", block=16),
      q, kk, v)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  assert_close_to_scale(out, ref_out, BF16_RTOL)
  for grad, ref_grad in zip(grads, ref_grads):
    assert_close_to_scale(grad, ref_grad, BF16_RTOL)


@pytest.mark.parametrize("window", [None, 20] + [pytest.param(w, marks=pytest.mark.slow) for w in (1, 8, 63, 64, 500)])
def test_blockwise_equals_todays_xla_path_for_windows(window):
  q, kk, v = _qkv(2, 64, 2, 8, seed=2)
  expected = attention_ops.causal_attention(q, kk, v, window=window, implementation="xla")
  assert_close_to_scale(attention_ops.causal_attention(q, kk, v, window=window, implementation="blockwise"),
                        expected)


def _largest_intermediate(fn, *args) -> int:
  """Elements of the largest array any equation of fn's jaxpr (sub-jaxprs included) produces."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        yield int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
            yield from walk(getattr(sub, "jaxpr", sub))
  return max(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_no_l_by_l_array_in_the_forward_or_the_backward():
  l, block = 256, 32
  q, kk, v = _qkv(1, l, 1, 8)
  def grads(implementation):
    loss = lambda *a: jnp.sum(attention_ops.causal_attention(*a, implementation=implementation, block=block))
    return jax.grad(loss, argnums=(0, 1, 2))
  # The check sees an l×l array where there is one (today's path), and none in the blockwise one, whose
  # largest are the first offset's n (c×c) scores: n·c² = l·c.
  assert _largest_intermediate(grads("xla"), q, kk, v) >= l * l
  assert _largest_intermediate(grads("blockwise"), q, kk, v) <= l * block


def test_compiled_temporaries_grow_linearly_in_the_length():
  """XLA's buffer assignment of the compiled forward + backward: blockwise temporaries double with l (no
  l×l array, and the block pairs of different offsets do not all live at once); the masked path's grow 4x."""
  def temps(implementation, l):
    loss = lambda *a: jnp.sum(attention_ops.causal_attention(*a, implementation=implementation, block=32))
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return step.lower(*_qkv(1, l, 2, 8)).compile().memory_analysis().temp_size_in_bytes
  assert temps("blockwise", 512) < 2.5 * temps("blockwise", 256)
  assert temps("xla", 512) > 3.5 * temps("xla", 256)


def _flops(fn, *args) -> float:
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_a_window_costs_linear_time_in_the_length():
  """Doubling l doubles the blockwise sliding window's FLOPs (O(l·w)); the masked path's quadruple."""
  def ratio(implementation):
    fn = lambda *a: attention_ops.causal_attention(*a, window=16, implementation=implementation)
    return _flops(fn, *_qkv(1, 512, 1, 16)) / _flops(fn, *_qkv(1, 256, 1, 16))
  assert ratio("blockwise") < 2.2
  assert ratio("xla") > 3.5


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 100])
def test_blockwise_at_lm_shapes_is_the_masked_softmax(window):
  q, kk, v = _qkv(2, 1000, 4, 64, seed=3)
  ref_out, ref_grads = _value_and_grads(
      lambda *a: attention_ops.attention_reference(*a, window=window), q, kk, v)
  out, grads = _value_and_grads(
      lambda *a: attention_ops.causal_attention(*a, window=window, implementation="blockwise"), q, kk, v)
  assert_close_to_scale(out, ref_out)
  for grad, ref_grad in zip(grads, ref_grads):
    assert_close_to_scale(grad, ref_grad)


# ----- the mixers' `implementation` -----

D = 16
MIXER_CASES = [
    slow({"name": "attention", "num_heads": 2}, 37),
    ({"name": "attention", "num_heads": 2, "rotary": True}, 37),
    ({"name": "sliding_window", "window_size": 3, "num_heads": 2}, 37),
    slow({"name": "sliding_window", "window_size": 20}, 20),  # w >= L: full attention
    ({"name": "blocked", "block_size": 5, "num_heads": 4}, 35),
    slow({"name": "blocked", "block_size": 40}, 40),  # b = L
]


def _build(cfg, seq_len, dtype=jnp.float32):
  return mixers.build(cfg, d_model=D, seq_len=seq_len, layer_idx=0, n_layers=2, rngs=nnx.Rngs(0), dtype=dtype)


def _mixer_value_and_grad(module, x):
  graphdef, params = nnx.split(module)
  apply = lambda p, x_: nnx.merge(graphdef, p)(x_)
  return jax.jit(lambda p, x_: (apply(p, x_), jax.grad(lambda x__: jnp.sum(apply(p, x__) ** 2))(x_)))(params, x)


@pytest.mark.parametrize("cfg,length", MIXER_CASES, ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_each_mixer_blockwise_equals_xla(cfg, length):
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, length, D)), jnp.float32)
  out_xla, grad_xla = _mixer_value_and_grad(_build({**cfg, "implementation": "xla"}, length), x)
  out, grad = _mixer_value_and_grad(_build({**cfg, "implementation": "blockwise"}, length), x)
  assert_close_to_scale(out, out_xla)
  assert_close_to_scale(grad, grad_xla)


@pytest.mark.parametrize("name", ["attention", "sliding_window", "blocked"])
def test_an_unknown_implementation_is_a_one_line_error_naming_the_field(name):
  with pytest.raises(ValueError) as err:
    mixers.parse({"name": name, "implementation": "flash"})
  assert str(err.value).startswith("model.mixer.implementation") and "\n" not in str(err.value)
  assert "'blockwise'" in str(err.value)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN exists on GPU")
def test_cudnn_off_gpu_is_a_one_line_error_at_build():
  with pytest.raises(ValueError, match=r"^model\.mixer\.implementation='cudnn' needs a GPU[^\n]*$"):
    _build({"name": "attention", "implementation": "cudnn"}, 8, jnp.bfloat16)


def test_the_default_is_the_measured_fastest_for_the_backend():
  expected = attention_ops.FASTEST.get(jax.default_backend(), "xla")
  assert attention_ops.default_implementation(jnp.float32) == expected
  assert attention_ops.resolve(None, jnp.float32) == expected


# ----- the dispatch table (zoo_jax/mixers/attention.py's docstring) -----


@pytest.mark.parametrize("backend,dtype,expected", [
    ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float16, "cudnn"), ("gpu", jnp.float32, "blockwise"),
    ("cpu", jnp.bfloat16, "blockwise"), ("cpu", jnp.float32, "blockwise"), ("tpu", jnp.bfloat16, "blockwise"),
])
def test_the_default_by_backend_and_dtype_is_the_table(monkeypatch, backend, dtype, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert attention_ops.default_implementation(dtype) == expected


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN exists on GPU")
@pytest.mark.parametrize("name", ["attention", "sliding_window", "blocked"])
def test_cudnn_off_gpu_is_refused_when_a_hybrid_config_is_parsed_naming_its_field(name):
  with pytest.raises(ValueError) as err:
    mixers.parse({"name": "hybrid", "mixers": [{"name": "base_conv"}, {"name": name, "implementation": "cudnn"}]})
  assert str(err.value).startswith("model.mixer.mixers[1].implementation='cudnn' needs a GPU")
  assert "\n" not in str(err.value)


def test_explicit_cudnn_on_gpu_refuses_float32_and_runs_blockwise_on_the_float32_cache_paths(monkeypatch):
  """Built (no compute) under a GPU backend: a float32 model with 'cudnn' is one line naming the fields; a
  bf16 one keeps cuDNN for bf16 activations and runs blockwise for the float32 cache buffer; None stays None."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError) as err:
    _build({"name": "sliding_window", "window_size": 4, "implementation": "cudnn"}, 16, jnp.float32)
  assert str(err.value).startswith("model.mixer.implementation='cudnn' takes model.dtype bfloat16")
  assert "\n" not in str(err.value)
  mixer = _build({"name": "sliding_window", "window_size": 4, "implementation": "cudnn"}, 16, jnp.bfloat16)
  assert mixer.implementation_for(jnp.bfloat16) == "cudnn"
  assert mixer.implementation_for(jnp.float32) == "blockwise"
  assert _build({"name": "attention"}, 16, jnp.float32).implementation_for(jnp.float32) is None


@pytest.mark.skipif(attention_ops.default_implementation(jnp.float32) != "blockwise",
                    reason="the default path is blockwise on this backend")
def test_a_prefill_from_position_0_takes_the_training_path_with_no_l_by_l_array():
  """`generate`'s prefill (return_state, no state) runs the default (blockwise) path: no equation produces an
  l×l array, while the same prefill on 'xla' has one (the check can fail). Compiled temporaries of this
  prefill (d 16, one head) measured at l 512 / 1,024 / 2,048: default 1.0 / 1.9 / 3.7 MB (linear), 'xla'
  and a prefill from a state (`extend_cache`, XLA whatever the implementation) 2.1 / 8.4 / 33.6 MB (l²)."""
  l = 256
  x = jnp.zeros((1, l, D), jnp.float32)
  def largest(implementation):
    graphdef, params = nnx.split(_build({"name": "attention", "implementation": implementation}, l))
    return _largest_intermediate(lambda p, x_: nnx.merge(graphdef, p)(x_, return_state=True), params, x)
  assert largest("xla") >= l * l
  assert largest(None) <= l * attention_ops.block_len(l)


@pytest.mark.parametrize("name", ["attention", "sliding_window", "blocked"])
def test_cudnn_with_float32_is_refused_when_the_model_config_is_parsed_naming_a_hybrids_field(monkeypatch, name):
  """Under a GPU backend (nothing built): 'cudnn' in a float32 model is one line naming mixers[i], from the
  model config's validation; the same hybrid in bfloat16 passes."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  sizes = {"blocked": {"block_size": 16}, "sliding_window": {"window_size": 8}}
  sub = {"name": name, "implementation": "cudnn", **sizes.get(name, {})}
  mixer = {"name": "hybrid", "mixers": [{"name": "base_conv"}, sub]}
  with pytest.raises(ValueError) as err:
    model_lib.ModelConfig(vocab_size=32, d_model=16, n_layers=2, seq_len=32, mixer=mixer).validate()
  assert str(err.value).startswith("model.mixer.mixers[1].implementation='cudnn' takes model.dtype bfloat16")
  assert "\n" not in str(err.value)
  model_lib.ModelConfig(vocab_size=32, d_model=16, n_layers=2, seq_len=32, mixer=mixer, dtype="bfloat16").validate()
