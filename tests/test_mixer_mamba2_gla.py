"""Mamba-2 (`zoo_jax.mixers.mamba2`), GLA (`zoo_jax.mixers.gla`) and their shared chunked gated linear
recurrence (`zoo_jax.ops.chunked_gla`) against float64 token loops.

The shared spec (tests/test_mixers.py) checks shapes, dtypes, causality, gradients and recurrent ≡ parallel
at the defaults (one chunk: L = 12); here: the chunked recurrence equals the token loop for chunk sizes
1, 4, 16, 64 at lengths they do not divide, with a scalar (SSD) and a per-channel (GLA) decay, at log-decay
−20 per step too (values and gradients); each whole mixer, chunked and stepped, equals its definition
written independently in float64; the state sizes are their formulas; bad hyperparameters are one-line
errors. State passing (prefill → decode): the chunked recurrence from a non-zero initial state returns the
token loop's outputs and final state; each mixer, prefilled over x[:, :t] and continued from its state
over x[:, t:], gives its whole-sequence output and the token recurrence's state, over several chunks and
through the short conv; in bfloat16 the state keeps `init_state`'s structure, shapes and dtypes.
"""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_mixers import functional, run_recurrent  # the shared spec's pure apply and scanned steps
from zoo_jax import mixers
from zoo_jax.ops import chunked_gla

D, N_LAYERS = 16, 2
# Float32 against the float64 loop: round-off measured <= 3e-7 of the output scale (strong decays too);
# 1e-5 is the bound and catches a lag off by one or a decay applied once too often.
RTOL = 1e-5
CHUNKS = [1, 4, 16, 64]
LENGTH = 67  # 16·4 + 3, 64 + 3: no chunk size above divides it


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def f64(a):
  return np.asarray(a, np.float64)


def assert_close_to_scale(actual, expected, rtol=RTOL, msg=""):
  actual, expected = f64(actual), f64(expected)
  chex.assert_equal_shape([actual, expected])
  assert np.isfinite(actual).all(), f"{msg}: non-finite values"
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= rtol * scale, f"{msg}: max abs err {err:.3g} > {rtol} * {scale:.3g}"


# ------------------------------------------------------------------------ the chunked recurrence


def token_loop(q, k, v, log_decay, state=None, return_state=False):
  """S_t = diag(exp(γ_t)) S_{t−1} + k_t v_tᵀ, o_t = S_tᵀ q_t, in float64, one token at a time, from
  `state` (default 0); with `return_state` also the final S."""
  q, k, v, log_decay = map(f64, (q, k, v, log_decay))
  b, l, h, dk = q.shape
  state = np.zeros((b, h, dk, v.shape[-1])) if state is None else f64(state)
  out = np.zeros((b, l, h, v.shape[-1]))
  for t in range(l):
    state = np.exp(log_decay[:, t])[..., None] * state + k[:, t, ..., None] * v[:, t, :, None, :]
    out[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], state)
  return (out, state) if return_state else out


def recurrence_inputs(decay_width, length=LENGTH, strong=False, seed=0):
  """Unit-scale q, k, v (b=2, h=2, k=4, v=3) and log-decays: U(−0.5, 0) per step, or with `strong` −20
  per step in half the channels / heads and ~0 (−1e-3) in the rest (a state that forgets everything next
  to one that keeps ~all of it)."""
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal((2, length, 2, w)), jnp.float32) for w in (4, 4, 3))
  if strong:
    log_decay = np.where(np.arange(2 * decay_width).reshape(2, decay_width) % 2 == 0, -20.0, -1e-3)
    log_decay = np.broadcast_to(log_decay, (2, length, 2, decay_width))
  else:
    log_decay = rng.uniform(-0.5, 0.0, (2, length, 2, decay_width))
  return q, k, v, jnp.asarray(log_decay, jnp.float32)


DECAYS = [pytest.param(1, id="scalar"), pytest.param(4, id="per_channel")]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("decay_width", DECAYS)
@pytest.mark.parametrize("strong", [False, True], ids=["decay<=0.5", "decay=20"])
def test_chunked_form_is_the_token_loop(decay_width, chunk, strong):
  q, k, v, log_decay = recurrence_inputs(decay_width, strong=strong)
  out = jax.jit(chunked_gla.chunked, static_argnums=4)(q, k, v, log_decay, chunk)
  assert_close_to_scale(out, token_loop(q, k, v, log_decay), msg=f"chunk {chunk}")


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("decay_width", DECAYS)
@pytest.mark.parametrize("strong", [False, True], ids=["decay<=0.5", "decay=20"])
def test_chunked_form_from_an_initial_state_is_the_token_loop(decay_width, chunk, strong):
  """fla's `initial_state` / `output_final_state`: from a unit-scale S_0 (what earlier tokens left), the
  outputs and the final state (after a partial last chunk: its padding must not decay the state)."""
  q, k, v, log_decay = recurrence_inputs(decay_width, strong=strong)
  state0 = _normal((2, 2, 4, 3), seed=3)
  out, state = jax.jit(chunked_gla.chunked, static_argnums=(4, 6))(q, k, v, log_decay, chunk, state0, True)
  expected_out, expected_state = token_loop(q, k, v, log_decay, state0, return_state=True)
  assert_close_to_scale(out, expected_out, msg=f"chunk {chunk}: outputs")
  assert_close_to_scale(state, expected_state, msg=f"chunk {chunk}: final state")


def test_recurrent_step_is_the_token_loop():
  q, k, v, log_decay = recurrence_inputs(4, length=9)

  def scan(q, k, v, log_decay):
    state = jnp.zeros((2, 2, 4, 3), jnp.float32)
    time_major = [jnp.swapaxes(a, 0, 1) for a in (q, k, v, log_decay)]
    _, out = jax.lax.scan(lambda s, x: chunked_gla.recurrent_step(s, *x), state, time_major)
    return jnp.swapaxes(out, 0, 1)

  assert_close_to_scale(jax.jit(scan)(q, k, v, log_decay), token_loop(q, k, v, log_decay))


@pytest.mark.parametrize("decay_width", DECAYS)
def test_gradients_at_strong_decays_are_finite_and_those_of_the_token_loop(decay_width):
  """d/d(q, k, v, γ) of a random projection of the output: the chunked form (chunks of 16) against the
  scanned step form, at log-decay −20 per step where exp(Σγ) underflows to 0 inside a chunk."""
  inputs = recurrence_inputs(decay_width, length=37, strong=True)
  cotangent = _normal((2, 37, 2, 3), seed=5)

  def stepped(q, k, v, log_decay):
    time_major = [jnp.swapaxes(a, 0, 1) for a in (q, k, v, log_decay)]
    _, out = jax.lax.scan(lambda s, x: chunked_gla.recurrent_step(s, *x),
                          jnp.zeros((2, 2, 4, 3), jnp.float32), time_major)
    return jnp.swapaxes(out, 0, 1)

  loss = lambda form: lambda *a: jnp.sum(form(*a) * cotangent)
  argnums = (0, 1, 2, 3)
  grads = jax.jit(jax.grad(loss(lambda *a: chunked_gla.chunked(*a, 16)), argnums))(*inputs)
  expected = jax.jit(jax.grad(loss(stepped), argnums))(*inputs)
  for name, g, e in zip("qkvγ", grads, expected):
    assert_close_to_scale(g, e, msg=f"d/d{name}")


# ----------------------------------------------------------------------------- the whole mixers


def build(cfg: dict, length: int) -> nnx.Module:
  return mixers.build(cfg, d_model=D, seq_len=length, layer_idx=0, n_layers=N_LAYERS, rngs=nnx.Rngs(0))


def _conv(u, module_conv):
  """Causal depthwise conv, y[t] = b + Σ_j w[j] u[t − (k−1) + j], float64."""
  w, bias = f64(module_conv.w_kc[...]), f64(module_conv.b_c[...])
  kernel, length = w.shape[0], u.shape[1]
  padded = np.pad(u, ((0, 0), (kernel - 1, 0), (0, 0)))
  return bias + sum(padded[:, j:j + length] * w[j] for j in range(kernel))


def silu(a):
  return a / (1 + np.exp(-a))


def rms_norm(a, scale, eps):
  return a / np.sqrt((a * a).mean(-1, keepdims=True) + eps) * scale


def mamba2_definition(m, x) -> np.ndarray:
  """Eq. 13–16 token by token in float64: conv, Δ, h_t = exp(Δ_t A) h_{t−1} + B_t (Δ_t x_t)ᵀ,
  y_t = h_tᵀ C_t + D x_t, RMSNorm per group of y ⊙ SiLU(z) (or RMSNorm(y) ⊙ SiLU(z)), out_proj."""
  x = f64(x)
  b, l, _ = x.shape
  heads, p, n, g = m.num_heads, m.head_dim, m.d_state, m.ngroups
  e = heads * p
  zxbcdt = x @ f64(m.in_proj.kernel[...])
  z, xbc, delta = zxbcdt[..., :e], zxbcdt[..., e:2 * e + 2 * g * n], zxbcdt[..., 2 * e + 2 * g * n:]
  xbc = silu(_conv(xbc, m.conv))
  xs = xbc[..., :e].reshape(b, l, heads, p)
  bs = xbc[..., e:e + g * n].reshape(b, l, g, n)
  cs = xbc[..., e + g * n:].reshape(b, l, g, n)
  dt = np.log1p(np.exp(delta + f64(m.dt_bias[...])))
  a = -np.exp(f64(m.A_log[...]))
  y = np.zeros((b, l, heads, p))
  state = np.zeros((b, heads, p, n))
  for t in range(l):
    for hd in range(heads):
      grp = hd // (heads // g)
      state[:, hd] = (np.exp(dt[:, t, hd] * a[hd])[:, None, None] * state[:, hd]
                      + (dt[:, t, hd, None] * xs[:, t, hd])[:, :, None] * bs[:, t, grp, None, :])
      y[:, t, hd] = np.einsum("bpn,bn->bp", state[:, hd], cs[:, t, grp])
  y = (y + f64(m.D[...])[:, None] * xs).reshape(b, l, g, e // g)
  scale, gate = f64(m.norm.scale[...]).reshape(g, e // g), silu(z).reshape(b, l, g, e // g)
  if m.norm_before_gate:
    y = rms_norm(y, scale, m.norm.epsilon) * gate
  else:
    y = rms_norm(y * gate, scale, m.norm.epsilon)
  return y.reshape(b, l, e) @ f64(m.out_proj.kernel[...])


def gla_definition(m, x) -> np.ndarray:
  """GLA token by token in float64: α_t = σ(x W_1 W_2 + b)^(1/τ), S_t = diag(α_t) S_{t−1} + k_tᵀ v_t,
  o_t = q_t S_t / sqrt(d_k), per-head RMSNorm, swish output gate, W_O."""
  x = f64(x)
  b, l, _ = x.shape
  h, kw, vw = m.num_heads, m.key_width, m.value_width
  qkv = x @ f64(m.qkv_proj.kernel[...])
  if m.conv is not None:
    qkv = silu(_conv(qkv, m.conv))
  q, k, v = (a.reshape(b, l, h, -1) for a in (qkv[..., :kw], qkv[..., kw:2 * kw], qkv[..., 2 * kw:]))
  logits = x @ f64(m.forget_down.kernel[...]) @ f64(m.forget_up.kernel[...]) + f64(m.forget_up.bias[...])
  alpha = (1 / (1 + np.exp(-logits))) ** (1 / m.gate_logit_normalizer)
  if m.clamp_min is not None:
    alpha = np.maximum(alpha, np.exp(m.clamp_min))
  alpha = alpha.reshape(b, l, h, -1)
  state = np.zeros((b, h, kw // h, vw // h))
  o = np.zeros((b, l, h, vw // h))
  for t in range(l):
    state = alpha[:, t, ..., None] * state + k[:, t, ..., None] * v[:, t, :, None, :]
    o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], state) / np.sqrt(kw // h)
  o = rms_norm(o, f64(m.norm.scale[...]), m.norm.epsilon).reshape(b, l, vw)
  if m.gate_proj is not None:
    o = o * silu(x @ f64(m.gate_proj.kernel[...]))
  return o @ f64(m.out_proj.kernel[...])


def randomise(module: nnx.Module) -> nnx.Module:
  """Parameters that start at constants (norm weight 1, D 1, gate bias 0) drawn at random, so the test
  sees that each is applied where it should be."""
  rng = np.random.default_rng(7)
  uniform = lambda low, high, like: jnp.asarray(rng.uniform(low, high, like.shape), jnp.float32)
  module.norm.scale.value = uniform(0.5, 1.5, module.norm.scale[...])
  if hasattr(module, "D"):
    module.D.value = uniform(0.5, 1.5, module.D[...])
  if hasattr(module, "forget_up"):
    module.forget_up.bias.value = uniform(-3.0, 3.0, module.forget_up.bias[...])
  return module


MIXER_CASES = [  # (config, definition, length): chunks that do not divide the length (chunk 1: above)
    ({"name": "mamba2", "chunk_size": 4, "ngroups": 2, "head_dim": 8, "d_state": 8}, mamba2_definition, 37),
    ({"name": "mamba2", "chunk_size": 16, "norm_before_gate": True, "head_dim": 16, "d_state": 16},
     mamba2_definition, 37),
    ({"name": "mamba2", "chunk_size": 64}, mamba2_definition, LENGTH),
    ({"name": "gla", "chunk_size": 4, "use_short_conv": True}, gla_definition, 37),
    ({"name": "gla", "chunk_size": 16, "num_heads": 2, "gate_logit_normalizer": 1, "clamp_min": -2.0},
     gla_definition, 37),
    ({"name": "gla", "chunk_size": 64, "use_output_gate": False, "expand_k": 1.0}, gla_definition, LENGTH),
]


@pytest.mark.parametrize("cfg,definition,length", MIXER_CASES,
                         ids=[",".join(f"{k}={v}" for k, v in cfg.items()) for cfg, _, _ in MIXER_CASES])
def test_chunked_and_recurrent_forms_are_the_definition(cfg, definition, length):
  module = randomise(build(cfg, length))
  x = _normal((2, length, D), seed=length)
  expected = definition(module, x)
  apply, params = functional(module)
  assert_close_to_scale(jax.jit(apply)(params, x), expected, msg="chunked")
  assert_close_to_scale(run_recurrent(module, x), expected, msg="recurrent")


def assert_prefill_continues(module: nnx.Module, x, prefix_lengths, rtol=RTOL):
  """For each t: `y, s = m(x[:, :t], return_state=True)`, then `m(x[:, t:], state=s, return_state=True)`:
  the outputs are m(x)'s and the state is the token recurrence's over all of x (float leaves within rtol of
  the leaf's scale, integer leaves equal). One jit for all t."""
  graphdef, params = nnx.split(module)

  def run(x):
    m = nnx.merge(graphdef, params)
    recurrent_state, _ = jax.lax.scan(m.step, m.init_state(x.shape[0]), jnp.swapaxes(x, 0, 1))
    results = []
    for t in prefix_lengths:
      y_prefill, state = m(x[:, :t], return_state=True)
      y_rest, state = m(x[:, t:], state=state, return_state=True)
      results.append((jnp.concatenate([y_prefill, y_rest], axis=1), state))
    return m(x), recurrent_state, results

  whole, recurrent_state, results = jax.jit(run)(x)
  for t, (y, state) in zip(prefix_lengths, results):
    assert_close_to_scale(y, whole, rtol, msg=f"prefill {t}, then the rest from its state")
    assert jax.tree.structure(state) == jax.tree.structure(recurrent_state), t
    leaves = zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(recurrent_state))
    for (path, got), want in leaves:
      where = f"prefill {t}: state{jax.tree_util.keystr(path)}"
      assert (got.shape, got.dtype) == (want.shape, want.dtype), where
      if jnp.issubdtype(want.dtype, jnp.floating):
        if want.size:  # a conv of width 1 keeps an empty window
          assert_close_to_scale(got, want, rtol, msg=where)
      else:
        np.testing.assert_array_equal(got, want, err_msg=where)


def assert_bfloat16_state_is_init_states(cfg: dict, length: int = 13) -> None:
  """In bfloat16 the state after x (from `init_state`, and from a given state) has `init_state`'s
  structure, shapes and dtypes (float32 leaves stay float32), by shape evaluation only."""
  module = mixers.build(cfg, d_model=D, seq_len=length, layer_idx=0, n_layers=N_LAYERS, rngs=nnx.Rngs(0),
                        dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, length, D), jnp.bfloat16)
  want = jax.eval_shape(lambda: module.init_state(2))
  for given in (None, want):
    y, state = jax.eval_shape(lambda x, s: module(x, state=s, return_state=True), x, given)
    assert (y.shape, y.dtype) == (x.shape, x.dtype)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == jax.tree.map(lambda a: (a.shape, a.dtype), want)


PREFILL_CASES = [  # (config, length, prefix lengths): several chunks, partial last chunks, the short conv
    ({"name": "mamba2", "chunk_size": 4, "ngroups": 2, "head_dim": 8, "d_state": 8}, 23, (1, 8, 22)),
    ({"name": "mamba2", "chunk_size": 64}, 67, (5, 64)),
    ({"name": "mamba2", "chunk_size": 4, "d_conv": 1, "d_state": 8}, 13, (6,)),  # an empty conv window
    ({"name": "gla", "chunk_size": 4, "use_short_conv": True}, 23, (1, 8, 22)),
    ({"name": "gla", "chunk_size": 16, "num_heads": 2, "gate_logit_normalizer": 1, "clamp_min": -2.0}, 37,
     (5, 16)),
]


@pytest.mark.parametrize("cfg,length,prefix_lengths", PREFILL_CASES,
                         ids=[",".join(f"{k}={v}" for k, v in cfg.items()) for cfg, _, _ in PREFILL_CASES])
def test_prefill_then_the_rest_from_its_state_is_the_whole_sequence(cfg, length, prefix_lengths):
  """Prefix lengths of one token, inside a chunk, at a chunk boundary, one short of the end; the short
  conv's window crosses every cut."""
  module = randomise(build(cfg, length))
  x = _normal((2, length, D), seed=length + 1)
  assert_prefill_continues(module, x, prefix_lengths)
  assert_bfloat16_state_is_init_states(cfg)


def test_mamba2_heads_are_mamba_ssm_s_at_zoology_widths():
  """Heads of 64 wherever expand·d >= 64 (Zoology's sweep: d = 64, 128, 256), one narrower head below."""
  for d_model, heads, head_dim in [(16, 1, 32), (64, 2, 64), (128, 4, 64), (256, 8, 64)]:
    module = nnx.eval_shape(lambda d=d_model: mixers.build({"name": "mamba2", "d_state": 16}, d_model=d,
                                                           seq_len=8, layer_idx=0, n_layers=2,
                                                           rngs=nnx.Rngs(0)))
    assert (module.num_heads, module.head_dim) == (heads, head_dim), d_model
    assert module.A_log.value.shape == (heads,), d_model


# ------------------------------------------------------------------------------------ state sizes


STATE_CASES = [  # (config, d_model, the docstring's formula evaluated by hand)
    ({"name": "mamba2"}, 16, 32 * 128 + (32 + 2 * 128) * 3),
    ({"name": "mamba2", "d_state": 16, "expand": 1, "d_conv": 2, "ngroups": 2, "head_dim": 8}, 32,
     32 * 16 + (32 + 2 * 2 * 16) * 1),
    ({"name": "gla"}, 16, 8 * 16 // 4),
    ({"name": "gla", "num_heads": 2, "use_short_conv": True, "conv_size": 3}, 64, 32 * 64 // 2 + 128 * 2),
    ({"name": "gla", "num_heads": 1, "expand_k": 1.0, "expand_v": 2.0}, 16, 16 * 32),
]


@pytest.mark.parametrize("cfg,d_model,expected", STATE_CASES, ids=[str(c) for c, _, _ in STATE_CASES])
def test_state_size_is_the_formula_and_the_recurrent_state(cfg, d_model, expected):
  assert mixers.state_size(cfg, d_model=d_model, seq_len=8, layer_idx=0) == expected
  module = nnx.eval_shape(lambda: mixers.build(cfg, d_model=d_model, seq_len=8, layer_idx=0, n_layers=2,
                                               rngs=nnx.Rngs(0)))
  state = jax.eval_shape(lambda: module.init_state(1))
  assert sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(state)) == expected


# -------------------------------------------------------------------------------- bad hparams


BAD_HPARAMS = [  # (config, the field its one-line error must name): rejected when parsed
    ({"name": "mamba2", "d_state": 0}, "model.mixer.d_state"),
    ({"name": "mamba2", "head_dim": 0}, "model.mixer.head_dim"),
    ({"name": "mamba2", "chunk_size": 0}, "model.mixer.chunk_size"),
    ({"name": "mamba2", "A_init_range": [16, 1]}, "model.mixer.A_init_range"),
    ({"name": "mamba2", "A_init_range": [0, 1]}, "model.mixer.A_init_range"),
    ({"name": "mamba2", "dt_min": 0.5}, "model.mixer.dt_min"),
    ({"name": "mamba2", "ngroups": 1.5}, "model.mixer.ngroups"),
    ({"name": "gla", "num_heads": 0}, "model.mixer.num_heads"),
    ({"name": "gla", "expand_k": 0}, "model.mixer.expand_k"),
    ({"name": "gla", "gate_logit_normalizer": -1}, "model.mixer.gate_logit_normalizer"),
    ({"name": "gla", "clamp_min": 0.5}, "model.mixer.clamp_min"),
    ({"name": "gla", "chunk_size": 0}, "model.mixer.chunk_size"),
]
BAD_AT_BUILD = [  # fine alone; the error needs d_model = 16
    ({"name": "mamba2", "head_dim": 12}, "model.mixer.head_dim"),  # 12 does not divide expand·d = 32
    ({"name": "mamba2", "head_dim": 16, "ngroups": 3}, "model.mixer.ngroups"),  # 2 heads
    ({"name": "gla", "num_heads": 3}, "model.mixer.expand_k"),  # K = 8
    ({"name": "gla", "num_heads": 2, "expand_v": 0.1}, "model.mixer.expand_v"),  # V = 1
]


def _assert_one_line_error(err, field):
  message = str(err.value)
  assert message.startswith(field) and "\n" not in message, message


@pytest.mark.parametrize("cfg,field", BAD_HPARAMS, ids=[str(c) for c, _ in BAD_HPARAMS])
def test_bad_hparams_are_one_line_value_errors(cfg, field):
  with pytest.raises(ValueError) as err:
    mixers.parse(cfg)
  _assert_one_line_error(err, field)


@pytest.mark.parametrize("cfg,field", BAD_AT_BUILD, ids=[str(c) for c, _ in BAD_AT_BUILD])
def test_hparams_that_do_not_fit_d_model_fail_at_build_and_state_size(cfg, field):
  mixers.parse(cfg)
  with pytest.raises(ValueError) as err:
    build(cfg, 8)
  _assert_one_line_error(err, field)
  with pytest.raises(ValueError) as err:
    mixers.state_size(cfg, d_model=D, seq_len=8, layer_idx=0)
  _assert_one_line_error(err, field)
