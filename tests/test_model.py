"""Spec of the language model (`zoo_jax.model`): tokens (b, l) -> logits (b, l, v).

- `logits_at(tokens, positions)` is the full logits gathered at `positions`, in float32 whatever the
  compute dtype;
- the LM head is tied: logits = hidden · Eᵀ with E the token embedding, and the model has no other
  (v, d) parameter;
- the model is causal: hidden[t] does not depend on the token at any s > t (checked by gradient);
- blocks follow the equations of `model.py`: prenorm x + mixer(LN1 x) (+ state_mixer(LN2 ·)); zoology
  adds LN2(x) instead when there is no state mixer, and is otherwise the same block;
- initialisation is Zoology's (`layers.py`): linears and embeddings N(0, 0.02), output projections
  N(0, 0.02 / sqrt(2 n_layers)), biases 0, LayerNorms (1, 0), depthwise convs U(±1/sqrt(k)), explicit
  long filters N(0, 1);
- `ModelConfig.from_config` is strict: unknown keys and bad values are one-line ValueErrors naming the key;
- the model's state size is the sum of its layers' mixer state sizes.
"""

import math

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import mixers
from zoo_jax.model import LanguageModel, ModelConfig

V, L, D, N_LAYERS = 37, 12, 16, 2  # V differs from every other dimension, so a (V, ·) param is a head
ATTENTION = {"name": "attention", "num_heads": 2}
BASE_CONV = {"name": "base_conv", "kernel_size": [3, -1]}  # layer 1: a long implicit conv, by FFT


def make_model(mixer=ATTENTION, seed=0, **options) -> LanguageModel:
  cfg = ModelConfig.from_config(dict(d_model=D, n_layers=N_LAYERS, mixer=mixer, **options), vocab_size=V,
                                seq_len=L)
  return LanguageModel(cfg, rngs=nnx.Rngs(seed))


def _tokens(batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (batch, L)), jnp.int32)


# ------------------------------------------------------------------------------------- the LM head


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_at_is_the_full_logits_gathered(dtype):
  model = make_model(BASE_CONV, dtype=dtype)
  tokens = _tokens()
  positions = jnp.asarray([[0, 5, 5, L - 1], [L - 1, 3, 0, 7]], jnp.int32)  # repeats, both ends
  full, at = nnx.jit(lambda m, t, p: (m(t), m.logits_at(t, p)))(model, tokens, positions)
  chex.assert_shape([full, at], [(2, L, V), (2, 4, V)])
  chex.assert_type([full, at], jnp.float32)  # the head promises float32 logits in any compute dtype
  gathered = np.take_along_axis(np.asarray(full), np.asarray(positions)[..., None], axis=1)
  # The same hidden states through the same head, gathered before or after it: equal up to the matmul's
  # accumulation order (float32: ~1e-7 relative), bfloat16: the head's inputs are identical bf16 arrays.
  np.testing.assert_allclose(np.asarray(at), gathered, rtol=1e-5, atol=1e-6 * np.abs(gathered).max())


def test_head_is_tied_to_the_token_embedding():
  model = make_model()
  vocab_params = [path for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)) if V in p.shape]
  assert vocab_params == [("embed", "embedding")], vocab_params

  tokens = _tokens()
  hidden_and_logits = nnx.jit(lambda m, t: (m.hidden(t), m(t)))
  hidden, logits = map(np.asarray, hidden_and_logits(model, tokens))
  embedding = np.asarray(model.embed.embedding[...])
  np.testing.assert_allclose(logits, hidden @ embedding.T, rtol=1e-5, atol=1e-6 * np.abs(logits).max())

  # Changing the embedding of a token the input does not contain changes that token's logit only,
  # to hidden · E'[token]: the head reads the embedding, there is no separate copy.
  unused = int(np.setdiff1d(np.arange(V), np.asarray(tokens))[0])
  new_row = np.random.default_rng(1).standard_normal(D).astype(np.float32)
  model.embed.embedding[...] = model.embed.embedding[...].at[unused].set(new_row)
  new_hidden, new_logits = map(np.asarray, hidden_and_logits(model, tokens))
  chex.assert_trees_all_equal(new_hidden, hidden)
  others = np.arange(V) != unused
  chex.assert_trees_all_equal(new_logits[..., others], logits[..., others])
  np.testing.assert_allclose(new_logits[..., unused], hidden @ new_row, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- causality

# FFT convolutions leak the future into the past by float32 round-off only (~1e-7 of the output scale,
# see tests/test_long_conv.py; measured ~1e-11 of the Jacobian's largest entry here, where the implicit
# filter is ~1e-3 at init). A dependence counts when it is 10x above the allowance (as in test_mixers.py).
FFT_LEAK_RTOL = 1e-6


@pytest.mark.parametrize("mixer,options,leak_rtol", [
    pytest.param(ATTENTION, dict(learned_positions=True), 0.0, id="attention,zoology,positions"),
    pytest.param(BASE_CONV, dict(block="prenorm", state_mixer="mlp"), FFT_LEAK_RTOL, id="base_conv,prenorm,mlp"),
])
def test_causal_by_gradient_through_the_model(mixer, options, leak_rtol):
  # Distinct tokens: row tokens[s] of the embedding enters the model at position s only, so
  # d hidden[t] / d E[tokens[s]] is the dependence of position t on the input at s.
  model = make_model(mixer, **options)
  tokens = jnp.asarray(np.random.default_rng(0).permutation(V)[None, :L], jnp.int32)
  graphdef, embed_state, rest = nnx.split(model, nnx.PathContains("embed"), ...)

  def hidden_of_embedding(embedding_vd):
    embed_state_ = jax.tree.map(lambda _: embedding_vd, embed_state)
    return nnx.merge(graphdef, embed_state_, rest).hidden(tokens)[0]

  jac_tdvd = jax.jit(jax.jacrev(hidden_of_embedding))(model.embed.embedding[...])
  jac_ts = np.abs(np.asarray(jac_tdvd, np.float64)[:, :, np.asarray(tokens[0])]).max(axis=(1, 3))
  scale = jac_ts.max()
  future = np.triu(jac_ts, k=1)
  assert future.max() <= leak_rtol * scale, f"the future reaches the past: {future.max():.3g} / {scale:.3g}"
  depends = jac_ts > 10 * leak_rtol * scale
  assert depends.diagonal().all() and np.tril(depends, k=-1)[1:].any(axis=1).all(), depends.astype(int)


# ------------------------------------------------------------------------------------------ blocks


@pytest.mark.parametrize("state_mixer", ["none", "mlp", "glu"])
@pytest.mark.parametrize("block", ["zoology", "prenorm"])
def test_block_follows_its_equations(block, state_mixer):
  model = make_model(BASE_CONV, block=block, state_mixer=state_mixer, state_mixer_hidden_mult=2)
  layer = model.blocks[1]
  if state_mixer == "mlp":
    chex.assert_shape([layer.state_mixer.fc1.kernel[...], layer.state_mixer.fc2.kernel[...]],
                      [(D, 2 * D), (2 * D, D)])
  elif state_mixer == "glu":  # Zoology's GLU: fc3(fc1(x) * gelu(fc2(x)))
    chex.assert_shape([layer.state_mixer.fc1.kernel[...], layer.state_mixer.fc2.kernel[...],
                       layer.state_mixer.fc3.kernel[...]], [(D, 2 * D), (D, 2 * D), (2 * D, D)])
  else:
    assert layer.state_mixer is None
  assert (layer.norm2 is None) == (block == "prenorm" and state_mixer == "none")

  def both(layer_, x):
    y = x + layer_.mixer(layer_.norm1(x))
    if state_mixer != "none":
      expected = y + layer_.state_mixer(layer_.norm2(y))
    else:
      expected = y + layer_.norm2(y) if block == "zoology" else y
    return layer_(x), expected

  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, L, D)), jnp.float32)
  out, expected = nnx.jit(both)(layer, x)
  chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-6)


def test_mamba_block_is_one_rmsnorm_branch():
  model = make_model({"name": "mamba"}, block="mamba")
  layer = model.blocks[1]
  assert isinstance(layer.norm1, nnx.RMSNorm) and layer.norm2 is None and layer.state_mixer is None

  def both(layer_, x):
    return layer_(x), x + layer_.mixer(layer_.norm1(x))

  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, L, D)), jnp.float32)
  out, expected = nnx.jit(both)(layer, x)
  chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"^model\.state_mixer must be 'none' with model\.block='mamba'"):
    make_model({"name": "mamba"}, block="mamba", state_mixer="mlp")


@pytest.mark.parametrize("state_mixer", ["none", "mlp"])
def test_zoology_and_prenorm_blocks_differ_only_without_a_state_mixer(state_mixer):
  zoology = make_model(block="zoology", state_mixer=state_mixer)
  prenorm = make_model(block="prenorm", state_mixer=state_mixer)
  # The same parameters (nnx.LayerNorm draws from the rngs, so the extra norm2 of zoology/none shifts the
  # later inits): only the blocks' equations differ.
  nnx.update(prenorm, nnx.state(zoology, nnx.Not(nnx.PathContains("norm2"))))
  tokens = _tokens()
  logits = {name: np.asarray(nnx.jit(lambda m: m(tokens))(model))
            for name, model in (("zoology", zoology), ("prenorm", prenorm))}
  diff = np.abs(logits["zoology"] - logits["prenorm"]).max()
  if state_mixer == "none":  # zoology adds LN2(x) at every layer: an O(1) change of the residual
    assert diff > 1e-2 * np.abs(logits["prenorm"]).max(), diff
  else:  # the same block
    assert diff == 0.0, diff


# ---------------------------------------------------------------------------------- initialisation

# One model holding every kind of parameter: attention, short conv, explicit and implicit long convs,
# MLP state mixers, learned positions. Large enough for the statistics below.
INIT_N_LAYERS, INIT_D, INIT_L, INIT_V = 4, 64, 64, 256
INIT_MIXER = {"name": "hybrid", "mixers": [
    {"name": "attention"}, {"name": "base_conv", "kernel_size": 3},
    {"name": "base_conv", "kernel_size": -1, "implicit_long_conv": False},
    {"name": "base_conv", "kernel_size": -1}]}


def documented_init(path: tuple[str, ...]) -> tuple[str, float]:
  """(distribution, its scale) for the parameter at `path`, as `layers.py` documents it."""
  name, parent = path[-1], path[-2]
  if parent == "conv" and name in ("w_kc", "b_c"):  # PyTorch's Conv1d default, kept by Zoology
    return "uniform", 1 / math.sqrt(3)  # k = 3
  if name == "h_lc":  # Zoology's LongConvolution: torch.randn
    return "normal", 1.0
  if name == "scale":  # LayerNorm
    return "constant", 1.0
  if name == "bias":  # linears and LayerNorms
    return "constant", 0.0
  if name == "embedding" or (name == "kernel" and parent in ("qkv_proj", "projection", "fc1")):
    return "normal", 0.02
  if name == "kernel" and parent in ("out_proj", "fc2"):
    # Residual-stream output projections are rescaled. The implicit filter's MLP is not one: in Zoology
    # it is an nn.Sequential (`mlp.2.weight`), which the `out_proj`/`fc2` rescaling does not reach.
    return "normal", 0.02 if "conv" in path else 0.02 / math.sqrt(2 * INIT_N_LAYERS)
  raise AssertionError(f"no documented initialisation for {path}")


def test_initialisation_statistics():
  cfg = ModelConfig(vocab_size=INIT_V, d_model=INIT_D, n_layers=INIT_N_LAYERS, seq_len=INIT_L,
                    mixer=INIT_MIXER, state_mixer="mlp", learned_positions=True)
  params = nnx.state(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  seen = set()
  for path, value in nnx.to_flat_state(params):
    kind, scale = documented_init(path)
    seen.add((path[-1], kind, scale))
    w = np.asarray(value[...], np.float64).ravel()
    n = w.size
    if kind == "constant":
      assert (w == scale).all(), path
      continue
    # Sample moments of n iid draws: the mean's standard error is sd/sqrt(n); the sd's is sd/sqrt(2n) for
    # a normal and sd*sqrt(0.2/n) for a uniform. 6 standard errors: a correct init never fails (and the
    # seed is fixed); a wrong scale (0.02 vs 0.0071, 1/sqrt(3) vs 1) is > 10 standard errors off here.
    sd = scale if kind == "normal" else scale / math.sqrt(3)
    sd_se = sd / math.sqrt(2 * n) if kind == "normal" else sd * math.sqrt(0.2 / n)
    assert abs(w.mean()) <= 6 * sd / math.sqrt(n), (path, w.mean())
    assert abs(w.std() - sd) <= 6 * sd_se, (path, w.std(), sd)
    if kind == "uniform":
      assert np.abs(w).max() <= scale and np.abs(w).max() > 0.9 * scale, (path, np.abs(w).max())
  rescaled = 0.02 / math.sqrt(2 * INIT_N_LAYERS)
  assert {("embedding", "normal", 0.02), ("kernel", "normal", rescaled), ("h_lc", "normal", 1.0),
          ("w_kc", "uniform", 1 / math.sqrt(3)), ("scale", "constant", 1.0)} <= seen, seen


# ----------------------------------------------------------------------------------------- config

BAD_MODEL_OPTIONS = [  # (options, the key its one-line error must name)
    (dict(d_modle=16), "model.d_modle"),
    (dict(d_model=0), "model.d_model"),
    (dict(d_model=16.0), "model.d_model"),
    (dict(n_layers=True), "model.n_layers"),
    (dict(n_layers=-1), "model.n_layers"),
    (dict(state_mixer="swiglu"), "model.state_mixer"),
    (dict(state_mixer_hidden_mult=0), "model.state_mixer_hidden_mult"),
    (dict(block="postnorm"), "model.block"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(mixer={"name": "no_such_mixer"}), "model.mixer.name"),
    (dict(mixer={"name": "attention", "heads": 2}), "model.mixer.heads"),
    (dict(learned_positions="yes"), "model.learned_positions"),
    (dict(remat="all"), "model.remat"),
    (dict(scan_layers=1), "model.scan_layers"),
    (dict(loss_chunk=-1), "model.loss_chunk"),
    (dict(mixer={"name": "base_conv", "kernel_size": [3]}), "model.mixer.kernel_size"),  # 1 entry, 2 layers
]


def test_from_config_names_a_missing_required_key():
  with pytest.raises(ValueError, match=r"^model\.d_model is missing"):
    ModelConfig.from_config(dict(n_layers=N_LAYERS, mixer=ATTENTION), vocab_size=V, seq_len=L)


@pytest.mark.parametrize("options,key", BAD_MODEL_OPTIONS, ids=[key for _, key in BAD_MODEL_OPTIONS])
def test_from_config_raises_one_line_value_errors_naming_the_key(options, key):
  model_cfg = dict(d_model=D, n_layers=N_LAYERS, mixer=ATTENTION) | options
  with pytest.raises(ValueError) as err:
    ModelConfig.from_config(model_cfg, vocab_size=V, seq_len=L)
  message = str(err.value)
  assert message.startswith(key) and "\n" not in message, message


@pytest.mark.parametrize("vocab_size,seq_len,key", [(0, L, "model.vocab_size"), (V, 0, "model.seq_len")])
def test_from_config_checks_the_sizes_it_is_given(vocab_size, seq_len, key):
  with pytest.raises(ValueError, match=rf"^{key}"):
    ModelConfig.from_config(dict(d_model=D, n_layers=N_LAYERS, mixer=ATTENTION), vocab_size=vocab_size,
                            seq_len=seq_len)


# ------------------------------------------------------------------------------------- state size


@pytest.mark.parametrize("mixer,n_layers,expected", [
    (ATTENTION, 2, 2 * (2 * D * L)),  # a KV cache per layer
    (BASE_CONV, 2, D * (3 - 1) + D * L),  # short conv k=3, then a long conv
    ({"name": "hybrid"}, 4, 2 * D * (3 - 1) + 2 * (2 * D * L)),  # [base_conv k=3, attention] × 2
])
def test_state_size_is_the_sum_of_the_layers(mixer, n_layers, expected):
  cfg = ModelConfig.from_config(dict(d_model=D, n_layers=n_layers, mixer=mixer), vocab_size=V, seq_len=L)
  per_layer = [mixers.state_size(mixer, d_model=D, seq_len=L, layer_idx=i) for i in range(n_layers)]
  assert cfg.state_size() == sum(per_layer) == expected, per_layer
