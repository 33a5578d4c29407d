"""Spec of prefill → decode at the model level (`LanguageModel.init_state / __call__(state=...) / step`) and
of generation (`zoo_jax.generate`), on 2-layer models with attention, BaseConv and a hybrid of the two:

- prefill then decode: `model(x[:, :t], return_state=True)` then `step` over the rest gives the parallel
  forward's logits (≤1e-5 of their largest magnitude), and `model(x[:, t:], state=s_t)` gives its logits
  at t.. (learned positions and rotary positions continue at t); the states have `init_state`'s structure;
- greedy `generate` is argmax by argmax of the full forward rerun on the growing sequence; top-k = 1
  sampling is greedy; sampling with a fixed rng is reproducible; it runs on parameters placed on the
  trainer's mesh and under the caller's `jax.jit`; a sequence past `seq_len` is a one-line ValueError;
- MQAR recall by generation (`zoo_jax.analysis.mqar_generation`) on a tiny trained attention model equals
  MQARTask's teacher-forced accuracy, above chance.
"""

import json
import os
import subprocess
import sys

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import checkpoint
from zoo_jax import config as config_lib
from zoo_jax import sharding
from zoo_jax import tasks
from zoo_jax import train
from zoo_jax import trainer
from zoo_jax.analysis import mqar_generation
from zoo_jax.generate import generate
from zoo_jax.model import LanguageModel, ModelConfig

V, L, D, N_LAYERS, B = 37, 12, 16, 2, 2
RTOL = 1e-5  # of the largest logit magnitude
MODELS = {
    # Learned and rotary positions together: both must continue at the state's position t.
    "attention": dict(mixer={"name": "attention", "num_heads": 2, "rotary": True}, learned_positions=True),
    "base_conv": dict(mixer={"name": "base_conv", "kernel_size": [3, -1]}),  # layer 1: long implicit conv
    "hybrid": dict(mixer={"name": "hybrid", "mixers": [{"name": "base_conv", "kernel_size": 3},
                                                       {"name": "attention", "num_heads": 2}]}),
}
PREFILL_LENGTHS = (1, 5, L)  # one token, a middle, the whole sequence (nothing left to decode)


def make_model(name: str, seed: int = 0) -> LanguageModel:
  cfg = ModelConfig.from_config(dict(d_model=D, n_layers=N_LAYERS, **MODELS[name]), vocab_size=V, seq_len=L)
  return LanguageModel(cfg, rngs=nnx.Rngs(seed))


def _tokens(batch=B, length=L, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (batch, length)), jnp.int32)


def _decode(model, state, tokens_bl):
  """(state, logits (b, l, v)) of `model.step` scanned over tokens_bl."""
  state, logits_lbv = jax.lax.scan(model.step, state, tokens_bl.T)
  return state, jnp.swapaxes(logits_lbv, 0, 1)


def assert_same_tree_type(got, want, what):
  assert jax.tree.structure(got) == jax.tree.structure(want), (what, jax.tree.structure(got))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert (g.shape, g.dtype) == (w.shape, w.dtype), (what, g.shape, g.dtype, w.shape, w.dtype)


# --------------------------------------------------------------------------------------- state passing


# base_conv (its long implicit conv) decodes by itself with -m slow (15 s at load 9): the registry's prefill test
# (tests/test_mixers.py) covers that mixer's state, and the hybrid here its short conv in a model.
@pytest.mark.parametrize("name", [n if n != "base_conv" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(MODELS)])
def test_prefill_then_decode_equals_the_parallel_forward(name):
  model = make_model(name)
  tokens = _tokens()
  graphdef, params = nnx.split(model)

  def run(params, tokens):
    m = nnx.merge(graphdef, params)
    full = m(tokens)
    decoded, continued = [], []
    for t in PREFILL_LENGTHS:
      prefill, state = m(tokens[:, :t], return_state=True)
      state_end, rest = _decode(m, state, tokens[:, t:])
      decoded.append((jnp.concatenate([prefill, rest], axis=1), state, state_end))
      if t < L:
        continued.append(m(tokens[:, t:], state=state))
    from_start = m(tokens, state=m.init_state(B))
    return full, decoded, continued, from_start, m.init_state(B)

  full, decoded, continued, from_start, init = jax.jit(run)(params, tokens)
  atol = RTOL * float(jnp.abs(full).max())
  chex.assert_shape(full, (B, L, V))
  chex.assert_trees_all_close(from_start, full, atol=atol, rtol=0)
  for t, (logits, state, state_end) in zip(PREFILL_LENGTHS, decoded):
    chex.assert_trees_all_close(logits, full, atol=atol, rtol=0, custom_message=f"prefill {t} then decode")
    assert_same_tree_type(state, init, f"state after prefill {t}")
    assert_same_tree_type(state_end, init, f"state after decoding from {t}")
    np.testing.assert_array_equal(state["t"], t)
    np.testing.assert_array_equal(state_end["t"], L)
  for t, logits in zip(PREFILL_LENGTHS, continued):
    chex.assert_trees_all_close(logits, full[:, t:], atol=atol, rtol=0, custom_message=f"parallel from {t}")


def test_the_training_forward_ignores_the_state_machinery():
  """state=None without return_state is the stateless forward, bit for bit (the training path)."""
  model = make_model("hybrid")
  tokens = _tokens()
  chex.assert_trees_all_equal(nnx.jit(lambda m, x: m(x))(model, tokens),
                              nnx.jit(lambda m, x: m.head(m.hidden(x)))(model, tokens))


# ------------------------------------------------------------------------------------------ generate


# The loop is the same for every model: the default suite runs the hybrid (both mixers' states; 13 s at load 9),
# -m slow the attention and base_conv models (24 s and 12 s); their decoding is checked by the test above.
@pytest.mark.parametrize("name", [n if n == "hybrid" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(MODELS)])
def test_greedy_generate_is_argmax_of_the_full_forward_on_the_growing_sequence(name):
  model = make_model(name)
  prompt, n = _tokens(length=4, seed=1), L - 4
  got = generate(model, prompt, n)
  chex.assert_shape(got, (B, n))
  forward = nnx.jit(lambda m, x: m(x)[:, -1])
  sequence = prompt
  for _ in range(n):
    sequence = jnp.concatenate([sequence, jnp.argmax(forward(model, sequence), -1)[:, None]], axis=1)
  np.testing.assert_array_equal(got, sequence[:, 4:])

@pytest.mark.slow  # 10-17 s; keeps the default suite under 15 min

def test_top_k_one_is_greedy_and_sampling_is_reproducible():
  model = make_model("attention")
  prompt = _tokens(length=3, seed=2)
  greedy = generate(model, prompt, 8)
  np.testing.assert_array_equal(generate(model, prompt, 8, temperature=1.0, top_k=1, rng=jax.random.key(0)),
                                greedy)
  sample = lambda seed, **kw: np.asarray(generate(model, prompt, 8, temperature=1.5, rng=jax.random.key(seed), **kw))
  np.testing.assert_array_equal(sample(0), sample(0))
  assert not np.array_equal(sample(0), sample(1))  # 16 draws from near-uniform logits over 37 tokens
  assert sample(0).min() >= 0 and sample(0).max() < V
  # With top_k, each token is among the k most likely after its own prefix (checked by the full forward).
  tokens = sample(3, top_k=3)
  np.testing.assert_array_equal(sample(3, top_k=3), tokens)
  logits = model(jnp.concatenate([prompt, jnp.asarray(tokens)], axis=1))[:, 2:-1]
  top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
  assert all(tokens[b, i] in top3[b, i] for b in range(B) for i in range(8))


def test_generate_on_parameters_placed_on_the_trainers_mesh_and_under_jit():
  model_cfg = make_model("hybrid").cfg
  train_cfg = config_lib.defaults().train
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  member = trainer.Member("run", 0, 1e-3, 0.0)
  graphdef, state, _, _, _ = trainer.init_state(model_cfg, train_cfg, [member], 1, mesh)
  params = jax.tree.map(lambda x: x[0], state["params"])
  plain = nnx.merge(graphdef, params)
  prompt = _tokens(length=5, seed=3)
  want = generate(plain, prompt, 7)
  # Explicit NamedShardings on the mesh (the logical axes' rules), generated under the mesh.
  named = jax.tree.map(lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P())), params)
  with jax.set_mesh(mesh):
    np.testing.assert_array_equal(generate(nnx.merge(graphdef, named), prompt, 7), want)
    jitted = jax.jit(lambda p, x: generate(nnx.merge(graphdef, p), x, 7))
    np.testing.assert_array_equal(jitted(named, prompt), want)
  np.testing.assert_array_equal(jax.jit(lambda p, x: generate(nnx.merge(graphdef, p), x, 7))(params, prompt), want)


def test_a_sequence_past_the_kv_cache_is_a_one_line_error():
  model = make_model("attention")
  generate(model, _tokens(length=L - 4), 4)  # exactly L: fits
  with pytest.raises(ValueError, match=r"prompt length 9 \+ max_new_tokens 4 = 13 exceeds the model's seq_len 12") as e:
    generate(model, _tokens(length=L - 3), 4)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="needs an rng"):
    generate(model, _tokens(length=2), 2, temperature=1.0)


# ------------------------------------------------------------------------------------ MQAR by generation


def _tiny_mqar_config():
  """V=64, L=16, kv=2, attention d=32 with learned positions: 4 epochs of 16 steps (~10 s on 2 cores)."""
  cfg = config_lib.defaults().to_dict()
  segments = lambda n: [dict(seq_len=16, num_kv_pairs=2, num_examples=n)]
  cfg["data"].update(vocab_size=64, train_segments=segments(512), validation_segments=segments(64),
                     test_segments=segments(64))
  cfg["model"].update(d_model=32, mixer=dict(name="attention"), learned_positions=True)
  cfg["train"].update(epochs=4, batch_size=32, eval_batch_size=64, learning_rate=3e-3, log_every_steps=1000,
                      early_stop_accuracy=2.0)
  return cfg

@pytest.mark.slow  # 10-17 s; keeps the default suite under 15 min

def test_mqar_recall_by_generation_equals_the_teacher_forced_accuracy(tmp_path):
  summary = train.train_and_evaluate(_tiny_mqar_config(), str(tmp_path))
  model, config = checkpoint.load_for_inference(str(tmp_path))
  test = tasks.build_split(config, "test")
  teacher_forced = mqar_generation.teacher_forced_accuracy(model, test)
  np.testing.assert_allclose(teacher_forced, summary["test_accuracy"], atol=1e-6)
  chance = 1 / (config.data.vocab_size // 2)  # values are drawn from the upper half of the vocabulary
  assert teacher_forced > 3 * chance, teacher_forced

  # Prefill up to and including each query key, the greedy next token: the same answers.
  answers = mqar_generation.answers_by_generation(model, test.inputs, test.labels, batch_size=32)
  logits = model(jnp.asarray(test.inputs))
  queries = test.labels != -100
  np.testing.assert_array_equal(answers[queries], np.asarray(jnp.argmax(logits, -1))[queries])
  assert mqar_generation.accuracy_by_generation(model, test, batch_size=32) == pytest.approx(teacher_forced,
                                                                                              abs=1e-9)
  # Token by token through `step` with the dataset's tokens: the same again. Own answers fed back: a number.
  assert mqar_generation.accuracy_with_generated_answers(model, test, feed="data") == pytest.approx(
      teacher_forced, abs=1e-9)
  generated = mqar_generation.accuracy_with_generated_answers(model, test, feed="model")
  assert 0.0 <= generated <= 1.0


_SHARDED_GENERATE = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from zoo_jax import config as config_lib, sharding, trainer
from zoo_jax.generate import generate
from zoo_jax.model import ModelConfig

mixer = {"name": "hybrid", "mixers": [{"name": "base_conv", "kernel_size": [3, -1]}, {"name": "attention", "num_heads": 2}]}
cfg = ModelConfig.from_config(dict(d_model=32, n_layers=2, mixer=mixer, learned_positions=True), vocab_size=64, seq_len=24)
member = trainer.Member("run", 0, 1e-3, 0.0)
prompt = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 9)), jnp.int32)
out = {}
for name, mesh in [("single", sharding.make_mesh(devices=jax.devices()[:1])), ("sharded", sharding.make_mesh(data=4, model=2))]:
  graphdef, state, _, _, _ = trainer.init_state(cfg, config_lib.defaults().train, [member], 1, mesh)
  params = jax.tree.map(lambda x: x[0], state["params"])
  embedding = params["embed"]["embedding"]
  with jax.set_mesh(mesh):
    tokens = jax.jit(lambda p, x: generate(nnx.merge(graphdef, p), x, 12))(params, prompt)
  out[name] = dict(tokens=np.asarray(tokens).tolist(), spec=str(getattr(embedding.sharding, "spec", None)))
print(json.dumps(out))
"""


@pytest.mark.slow  # a subprocess with 8 simulated devices: ~15 s
def test_generate_on_a_tensor_parallel_mesh_of_8_simulated_devices_equals_one_device():
  """Parameters placed by the trainer on a (data 4, model 2) mesh (the vocabulary split over `model`):
  greedy tokens of a hybrid [long BaseConv, attention] equal those generated on one device."""
  res = subprocess.run([sys.executable, "-c", _SHARDED_GENERATE], capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert "model" in out["sharded"]["spec"], out  # the embedding really is split
  assert out["sharded"]["tokens"] == out["single"]["tokens"]
