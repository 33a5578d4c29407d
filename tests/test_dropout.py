"""Dropout as Zoology has it (issue 19 part 5): embedding / residual-branch dropout in the model, dropout on
attention's probabilities, stateless keys from (seed, step) through the trainer, none in evaluation."""

import math
import os
import subprocess
import sys

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import config as config_lib
from zoo_jax import layers
from zoo_jax import sharding
from zoo_jax import tasks
from zoo_jax import train
from zoo_jax import trainer
from zoo_jax.configs import figure2
from zoo_jax.mixers import attention
from zoo_jax.model import LanguageModel, ModelConfig

# The tiny MQAR run's sizes (`tiny_run`), so that the dropout masks of every test have the same few shapes:
# each new shape compiles jax.random's threefry, seconds of CPU.
V, L, D = 64, 16, 16
ATTENTION = dict(name="attention")


def model_cfg(mixer=ATTENTION, **options) -> ModelConfig:
  return ModelConfig(vocab_size=V, d_model=D, n_layers=2, seq_len=L, mixer=mixer, **options)


def tokens(seed=0, b=3):
  return jax.random.randint(jax.random.key(seed), (b, L), 0, V)


def loss_and_grads(cfg: ModelConfig, key, grads=True):
  """(LM loss, gradients or None) of `cfg`'s model of seed 0 on fixed tokens, dropout from `key`. Eager:
  on a model this small, op by op is cheaper than compiling."""
  graphdef, params = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  t = tokens()
  fn = lambda p: -jnp.mean(tasks.token_logprobs(nnx.merge(graphdef, p), t, key))
  return jax.value_and_grad(fn)(params) if grads else (fn(params), None)


def tiny_run(mixer=ATTENTION, **model):
  """A tiny MQAR run config: V=64, L=16, 2 kv pairs, 128 examples, batch 32 (4 steps per epoch)."""
  cfg = config_lib.defaults().to_dict()
  segments = lambda n: [dict(seq_len=16, num_kv_pairs=2, num_examples=n)]
  cfg["data"].update(vocab_size=64, train_segments=segments(128), validation_segments=segments(32),
                     test_segments=segments(32))
  cfg["model"].update(d_model=16, mixer=mixer, **model)
  cfg["train"].update(epochs=2, batch_size=32, eval_batch_size=32, learning_rate=3e-3, log_every_steps=4,
                      early_stop_accuracy=2.0)
  return cfg


def test_rate_zero_is_exactly_the_dropout_free_forward_and_gradient():
  cfg = model_cfg()
  assert not LanguageModel(cfg, rngs=nnx.Rngs(0)).uses_dropout
  loss, grads = loss_and_grads(cfg, None)
  keyed_loss, keyed_grads = loss_and_grads(cfg, jax.random.key(3))  # a key reaches nothing at rate 0
  assert float(loss) == float(keyed_loss)
  chex.assert_trees_all_equal(grads, keyed_grads)


@pytest.mark.parametrize("options", [dict(embed_dropout=0.3), dict(resid_dropout=0.3),
                                     dict(mixer=dict(ATTENTION, dropout=0.3))],
                         ids=["embed", "resid", "attention"])
def test_each_rate_changes_the_training_loss_deterministically_per_key(options):
  cfg = model_cfg(**{"state_mixer": "glu", **options})
  assert LanguageModel(cfg, rngs=nnx.Rngs(0)).uses_dropout
  base, _ = loss_and_grads(model_cfg(state_mixer="glu"), None, grads=False)
  a, again, other, no_key = (loss_and_grads(cfg, key, grads=False)[0]
                             for key in (jax.random.key(1), jax.random.key(1), jax.random.key(2), None))
  assert float(a) == float(again) and float(a) != float(other) and float(a) != float(base)
  assert float(no_key) == float(base)  # without a key (evaluation) the model is the dropout-free one


def test_dropout_keeps_each_element_with_probability_one_minus_rate_and_rescales():
  rate, n = 0.1, 200_000
  y = layers.dropout(jnp.full((n,), 2.0), rate, jax.random.key(0))
  dropped = int(jnp.sum(y == 0))
  assert abs(dropped - rate * n) < 5 * math.sqrt(n * rate * (1 - rate))  # 5 binomial standard deviations
  np.testing.assert_allclose(np.asarray(y[y != 0]), 2.0 / (1 - rate), rtol=1e-6)


def test_embedding_dropout_drops_the_configured_fraction_of_layer_0_inputs(monkeypatch):
  """The mask the model draws for its embeddings (fold_in(key, 0)), through the real forward."""
  rate, seen = 0.25, {}
  real = layers.dropout

  def spy(x, r, key):
    if r == rate and "embed" not in seen:
      seen["embed"] = real(x, r, key)
    return real(x, r, key)

  monkeypatch.setattr("zoo_jax.model.dropout", spy)
  model = LanguageModel(model_cfg(embed_dropout=rate), rngs=nnx.Rngs(0))
  t = tokens(5)
  model(t, dropout_key=jax.random.key(7))
  x = seen["embed"]
  n = x.size
  dropped = int(jnp.sum(x == 0))
  assert abs(dropped - rate * n) < 5 * math.sqrt(n * rate * (1 - rate))
  kept = x != 0
  expected = model.embed_tokens(t) / (1 - rate)
  np.testing.assert_allclose(np.asarray(x[kept]), np.asarray(expected[kept]), rtol=1e-6)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_dropout_acts_on_the_causal_probabilities(window):
  """q = k = 0: uniform probabilities over the visible keys; v = identity: the output row is the row of
  dropped probabilities, so masked keys stay 0 and the visible ones are 0 or p / (1 − rate)."""
  l, rate = 32, 0.2
  zeros = jnp.zeros((8, l, 1, 4))
  v = jnp.broadcast_to(jnp.eye(l)[None, :, None, :], (8, l, 1, l))
  y_bij = attention.dropout_attention(zeros, zeros, v, rate=rate, key=jax.random.key(0), window=window)[:, :, 0]
  i, j = np.arange(l)[:, None], np.arange(l)[None]
  visible = (j <= i) if window is None else (j <= i) & (i - j <= window)
  assert np.all(np.asarray(y_bij)[:, ~visible] == 0)
  p_ij = np.where(visible, 1.0 / visible.sum(axis=1, keepdims=True), 0)
  vals = np.asarray(y_bij)[:, visible]
  expected = np.broadcast_to(p_ij[visible] / (1 - rate), vals.shape)
  assert np.all((vals == 0) | np.isclose(vals, expected, rtol=1e-5))
  n, dropped = vals.size, int(np.sum(vals == 0))
  assert abs(dropped - rate * n) < 5 * math.sqrt(n * rate * (1 - rate))
  # Rate 0 is the attention the mixers compute without dropout.
  q, k, vv = (jax.random.normal(jax.random.key(s), (2, l, 2, 8)) for s in (1, 2, 3))
  y = attention.dropout_attention(q, k, vv, rate=0.0, key=None, window=window)
  np.testing.assert_allclose(np.asarray(y), np.asarray(attention.attention_ops.attention_reference(q, k, vv, window=window)),
                             atol=1e-5)


@pytest.mark.parametrize("mixer", [dict(name="sliding_window", window_size=4, dropout=0.3),
                                   dict(name="blocked", block_size=4, dropout=0.3),
                                   dict(name="hybrid", mixers=[dict(name="base_conv", kernel_size=3),
                                                               dict(name="attention", dropout=0.3)])],
                         ids=["sliding_window", "blocked", "hybrid"])
def test_local_and_hybrid_attention_dropout_reaches_the_mixer(mixer):
  model = LanguageModel(model_cfg(mixer=mixer), rngs=nnx.Rngs(0))
  assert model.uses_dropout
  t = tokens()
  plain = model(t)
  a, b = model(t, dropout_key=jax.random.key(1)), model(t, dropout_key=jax.random.key(1))
  assert not np.allclose(np.asarray(a), np.asarray(plain), atol=1e-7)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


DROPPING = dict(embed_dropout=0.2, resid_dropout=0.2, mixer=dict(ATTENTION, dropout=0.2), state_mixer="mlp")


def test_scanned_layers_draw_the_loop_s_masks():
  """The scan carries each layer's index, so layer i folds i + 1 into the key as the loop does."""
  key = jax.random.key(4)
  loop, _ = loss_and_grads(model_cfg(**DROPPING), key, grads=False)
  scanned, _ = loss_and_grads(model_cfg(**DROPPING, scan_layers=True), key, grads=False)
  other, _ = loss_and_grads(model_cfg(**DROPPING, scan_layers=True), jax.random.key(5), grads=False)
  np.testing.assert_allclose(float(scanned), float(loop), rtol=1e-6)
  assert abs(float(other) - float(loop)) > 1e-4  # the masks matter at this size


@pytest.mark.slow  # three gradients of the tiny model: ~15 s idle
@pytest.mark.parametrize("memory", [dict(remat="full"), dict(scan_layers=True, remat="save_matmuls")],
                         ids=["remat", "scan+remat"])
def test_rematerialised_layers_redraw_the_same_masks_in_the_backward(memory):
  key = jax.random.key(4)
  loop_loss, loop_grads = loss_and_grads(model_cfg(**DROPPING), key)
  loss, grads = loss_and_grads(model_cfg(**DROPPING, **memory), key)
  np.testing.assert_allclose(float(loss), float(loop_loss), rtol=1e-6)
  chex.assert_trees_all_close(grads, loop_grads, rtol=1e-5, atol=1e-7)


def test_dropout_key_is_a_pure_function_of_seed_and_step_apart_from_the_init_keys():
  same = trainer.dropout_key(3, 7), trainer.dropout_key(3, 7)
  np.testing.assert_array_equal(jax.random.key_data(same[0]), jax.random.key_data(same[1]))
  mask = lambda key: np.asarray(jax.random.bernoulli(key, 0.5, (256,)))
  assert (mask(trainer.dropout_key(3, 7)) != mask(trainer.dropout_key(3, 8))).any()
  assert (mask(trainer.dropout_key(3, 7)) != mask(trainer.dropout_key(4, 7))).any()
  init_key = jax.random.fold_in(jax.random.key(3), 7)  # nnx.Rngs(3)'s 8th draw
  assert (mask(trainer.dropout_key(3, 7)) != mask(init_key)).any()


def _steps(cfg, seeds, n_steps):
  """`n_steps` train steps of a population of `seeds` (learning rate of `cfg`): (params, losses (n, p))."""
  cfg, model_cfg_ = config_lib.resolve(cfg)
  task = tasks.MQARTask(cfg, seeds)
  members = [trainer.Member(f"s{s}", s, cfg.train.learning_rate, cfg.train.weight_decay) for s in seeds]
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  graphdef, state, sh, tx, unit = trainer.init_state(model_cfg_, cfg.train, members, task.total_steps, mesh)
  step = trainer.make_train_step(task, graphdef, tx, unit, sh)
  losses = []
  for batch, _ in zip(task.train_batches(0), range(n_steps)):
    state, m = step(state, jax.device_put(np.ones(len(seeds), bool), sh.member), sharding.put(batch, sh.batch))
    losses.append(np.asarray(m["loss"]))
  return jax.device_get(state["params"]), np.stack(losses)


@pytest.mark.slow  # a population of 2 and a run of 1, 2 steps each: ~15 s idle
def test_population_with_dropout_equals_its_models_trained_one_by_one():
  cfg = tiny_run(mixer=dict(name="attention", dropout=0.3), embed_dropout=0.2)
  params_p, losses_sp = _steps(cfg, [0, 1], 2)
  params, losses = _steps(cfg, [1], 2)  # seed 1, not the first: a key ignoring the seed would differ
  np.testing.assert_allclose(losses_sp[:, 1], losses[:, 0], rtol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], params_p), jax.tree.map(lambda x: x[0], params),
                              rtol=1e-4, atol=1e-6)


def test_evaluation_drops_nothing():
  """The task's evaluation sums of a model with dropout are those of its parameters with every rate 0."""
  cfg, drop_model = config_lib.resolve(tiny_run(mixer=dict(name="attention", dropout=0.5), embed_dropout=0.5,
                                                resid_dropout=0.5))
  _, plain_model = config_lib.resolve(tiny_run(mixer=dict(name="attention")))
  task = tasks.MQARTask(cfg, [0])
  batch = {k: jnp.asarray(v[0, :3]) for k, v in next(task.train_batches(0)).items()}  # model 0, 3 rows
  model = LanguageModel(drop_model, rngs=nnx.Rngs(0))
  plain = nnx.merge(nnx.graphdef(LanguageModel(plain_model, rngs=nnx.Rngs(0))), nnx.state(model))
  chex.assert_trees_all_equal(task.eval_sums(model, batch), task.eval_sums(plain, batch))
  assert float(task.loss(model, batch, dropout_key=jax.random.key(0))[0]) != float(task.loss(plain, batch)[0])


def test_config_errors_name_the_field_and_its_range():
  cases = {
      "model.embed_dropout must be a finite number in [0, 1), got 1.0": dict(model=dict(embed_dropout=1.0)),
      "model.resid_dropout must be a finite number in [0, 1), got -0.1": dict(model=dict(resid_dropout=-0.1)),
      "model.mixer.dropout must be a number in [0, 1), got 1.5": dict(model=dict(mixer=dict(name="attention",
                                                                                            dropout=1.5))),
      "model.mixer.dropout > 0 needs model.mixer.implementation None or 'xla'": dict(
          model=dict(mixer=dict(name="sliding_window", window_size=8, dropout=0.1, implementation="blockwise"))),
  }
  for message, cfg in cases.items():
    with pytest.raises(ValueError) as e:
      config_lib.resolve(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
  assert config_lib.defaults().model.embed_dropout == 0.0 == config_lib.lm_defaults().model.resid_dropout


def test_figure2_paper_preset_uses_zoology_s_dropout_and_the_cpu_preset_none():
  paper, cpu = figure2.get_config("paper").runs, figure2.get_config("cpu").runs
  attention_run = paper["attention-d64-L64-kv4"]["model"]
  assert attention_run["embed_dropout"] == 0.1 and attention_run["mixer"]["dropout"] == 0.1
  assert paper["base_conv-d64-L64-kv4"]["model"]["embed_dropout"] == 0.1
  assert "dropout" not in paper["base_conv-d64-L64-kv4"]["model"]["mixer"]
  assert "embed_dropout" not in paper["mamba-d64-L64-kv4"]["model"]  # Zoology's MambaBlock drops nothing
  assert all("embed_dropout" not in run["model"] for run in cpu.values())


@pytest.mark.slow  # two tiny runs with a kill: ~15 s idle
def test_kill_and_resume_with_dropout_equals_uninterrupted(tmp_path):
  cfg = tiny_run(mixer=dict(name="attention", dropout=0.3), embed_dropout=0.2)
  cfg["train"].update(checkpoint_every_steps=2, epochs=2)
  whole = train.train_and_evaluate(cfg, str(tmp_path / "whole"))
  with pytest.raises(trainer.SimulatedKill):
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"), _kill_after_steps=5)
  resumed = train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  for key in ("validation_accuracy", "validation_loss", "test_accuracy", "test_loss", "steps"):
    assert resumed[key] == whole[key], key


_SHARDED_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from test_dropout import tiny_run
from zoo_jax import config as config_lib, sharding, tasks, trainer

def run(mesh):
  cfg, mc = config_lib.resolve(tiny_run(mixer=dict(name="attention", num_heads=2, dropout=0.3), embed_dropout=0.2,
                                        resid_dropout=0.1))
  task = tasks.MQARTask(cfg, [0, 1])
  members = [trainer.Member(f"s{{s}}", s, cfg.train.learning_rate, cfg.train.weight_decay) for s in (0, 1)]
  graphdef, state, sh, tx, unit = trainer.init_state(mc, cfg.train, members, 100, mesh)
  step = trainer.make_train_step(task, graphdef, tx, unit, sh)
  losses = []
  for batch, _ in zip(task.train_batches(0), range(3)):
    state, m = step(state, jax.device_put(np.ones(2, bool), sh.member), sharding.put(batch, sh.batch))
    losses.append(np.asarray(m["loss"]))
  return np.stack(losses)

np.testing.assert_allclose(run(sharding.make_mesh(data=4, model=2)),
                           run(sharding.make_mesh(devices=jax.devices()[:1])), rtol=1e-5)
print("sharded == single")
"""


@pytest.mark.slow  # a subprocess with 8 simulated devices, two 3-step populations: ~25 s idle
def test_dropout_masks_do_not_depend_on_the_mesh():
  tests = os.path.dirname(os.path.abspath(__file__))
  out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT.format(tests=tests)], capture_output=True, text=True,
                       timeout=600, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert out.returncode == 0 and "sharded == single" in out.stdout, out.stderr[-3000:]
