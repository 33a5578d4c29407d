"""sparse_attention (issue 7): the selection functions on hand-made tokens, the gathered attention against a
dense masked reference, causality through the selection itself, the auxiliary loss, the cost in L, and
prefill → decode from per-example states.

The registry's tests (tests/test_mixers.py) also run four sparse_attention examples: shape/dtype,
causality by gradient at the selected positions, gradients reaching every parameter, state size.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import config as config_lib
from zoo_jax import mixers
from zoo_jax import sharding
from zoo_jax import tasks
from zoo_jax import trainer
from zoo_jax.mixers import sparse_attention as sa
from zoo_jax.model import LanguageModel, ModelConfig

D = 16


def build(l: int = 12, **hparams):
  return mixers.build({"name": "sparse_attention", **hparams}, d_model=D, seq_len=l, layer_idx=0, n_layers=2,
                      rngs=nnx.Rngs(0))


def normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ------------------------------------------------------------------------------ selection functions


def test_programmatic_selects_tokens_seen_earlier():
  tokens = jnp.array([[5, 3, 5, 7, 3, 3, 0, 0, 9],
                      [1, 2, 3, 4, 5, 6, 7, 8, 1]])
  np.testing.assert_array_equal(sa.select_programmatic(tokens),
                                [[0, 0, 1, 0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 0, 1]])
  np.testing.assert_array_equal(sa.select_programmatic(tokens, exclude_tokens=(0, 3)),
                                [[0, 0, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 1]])


def test_first_k_keeps_the_earliest_selected_in_order():
  selected = jnp.array([[1, 0, 1, 1, 0, 1, 0]], bool)
  positions, valid = sa.first_k(selected, 3)
  np.testing.assert_array_equal(positions, [[0, 2, 3]])
  assert valid.all()
  positions, valid = sa.first_k(selected, 6)
  np.testing.assert_array_equal(positions, [[0, 2, 3, 5, 7, 7]])  # 7 = l: empty slots
  np.testing.assert_array_equal(valid, [[1, 1, 1, 1, 0, 0]])


def test_random_selection_is_seeded_per_sequence_by_its_first_token():
  l, k = 64, 10
  rows = np.random.default_rng(0).integers(1, 50, (4, l))
  rows[1, 0] = rows[0, 0]  # same first token, different rest
  rows[2, 0] = rows[0, 0] + 1
  sel = np.asarray(sa.select_random(jnp.asarray(rows), k, seed=3))
  assert (sel.sum(axis=1) == k).all()
  np.testing.assert_array_equal(sel[0], sel[1])  # decided by the first token only: causal
  assert (sel[0] != sel[2]).any()
  assert (sel[0] != np.asarray(sa.select_random(jnp.asarray(rows), k, seed=4))[0]).any()
  np.testing.assert_array_equal(sel, sa.select_random(jnp.asarray(rows), k, seed=3))  # deterministic
  assert np.asarray(sa.select_random(jnp.asarray(rows[:, :8]), k, seed=3)).all()  # k >= l: every position


def test_learned_selection_takes_positive_scores_in_order_up_to_the_budget():
  m = build(l=8, selection="learned", budget=3)
  m.scorer.kernel[...] = jnp.zeros((D, 1)).at[0, 0].set(1.0)  # score = x[..., 0]
  m.scorer.bias[...] = jnp.zeros((1,))
  x = jnp.zeros((1, 8, D)).at[0, :, 0].set(jnp.array([-1.0, 2.0, -3.0, 0.5, 1.0, 4.0, -1.0, 2.0]))
  np.testing.assert_array_equal(m.selected_positions(x)[0], [0, 1, 0, 1, 1, 0, 0, 0])


def test_full_selection_is_the_attention_mixer():
  x = normal((2, 12, D))
  full = build(selection="full", num_heads=2)
  attention = mixers.build({"name": "attention", "num_heads": 2}, d_model=D, seq_len=12, layer_idx=0,
                           n_layers=2, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(full(x), attention(x), rtol=0, atol=0)
  assert full.selected_positions(x).all()


# ---------------------------------------------------------------- gathered attention = dense reference


def dense_reference(m, x, tokens, keys):
  """The definition on an L×L masked product (test only): selected queries over keys j <= i (selected
  ones for keys='selected'), a gate on learned selections, zero at unselected positions."""
  b, l, d = x.shape
  h = m.num_heads
  out_sel = np.asarray(m.selected_positions(x, tokens))
  qkv = m.qkv_proj(x).reshape(b, l, 3, h, d // h)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = jnp.einsum("bihe,bjhe->bhij", q, k) / np.sqrt(d // h)
  gate = None
  if m.scorer is not None:
    score = m.scorer(x)[..., 0]
    gate = jax.nn.sigmoid(score)
    logits = logits + jax.nn.log_sigmoid(score)[:, None, None, :]
  mask = np.tril(np.ones((l, l), bool))[None]
  if keys == "selected":
    mask = mask & out_sel[:, None, :]
  logits = jnp.where(mask[:, None], logits, -jnp.inf)
  y = jnp.einsum("bhij,bjhe->bihe", jax.nn.softmax(logits, axis=-1), v).reshape(b, l, d)
  if gate is not None:
    y = y * gate[..., None]
  return jnp.where(out_sel[..., None], m.out_proj(y), 0.0)


@pytest.mark.parametrize("selection", ["random", "programmatic", "learned"])
@pytest.mark.parametrize("keys", ["selected", "all"])
def test_gathered_attention_equals_the_dense_masked_definition(selection, keys):
  l = 20
  m = build(l=l, selection=selection, keys=keys, budget=7, num_heads=2)
  x = normal((3, l, D), seed=1)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 6, (3, l)))
  if selection == "learned":  # scores of both signs, enough above 0 to fill the budget in some rows
    m.scorer.kernel[...] = normal((D, 1), seed=3)
  out = mixers.apply(m, x, tokens)
  selected = np.asarray(m.selected_positions(x, tokens))
  assert (selected.sum(axis=1) <= 7).all() and selected.sum() >= 6
  np.testing.assert_allclose(out, dense_reference(m, x, tokens, keys), rtol=2e-5, atol=2e-6)


def test_programmatic_budget_larger_than_the_repeats_leaves_empty_slots_finite():
  m = build(l=10, selection="programmatic", budget=8)
  tokens = jnp.arange(10)[None].at[0, 9].set(2)  # one repeat
  x = normal((1, 10, D))
  out = m(x, tokens)
  g = jax.grad(lambda x_: jnp.sum(m(x_, tokens) ** 2))(x)
  assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(out[0, 9])).max() > 0 and np.abs(np.asarray(out[0, :9])).max() == 0
  np.testing.assert_array_equal(m.selected_positions(x, tokens)[0], np.arange(10) == 9)


# ----------------------------------------------------------------------- causality through selection


@pytest.mark.parametrize("selection,keys", [("random", "selected"), ("programmatic", "selected"),
                                            ("programmatic", "all"), ("learned", "selected"),
                                            ("learned", "all")])
def test_future_tokens_and_inputs_do_not_change_past_outputs(selection, keys):
  """The selection is discrete, so gradients cannot see it: change everything after t (tokens and x,
  by enough to flip learned selections) and outputs up to t must not move."""
  l, t = 24, 11
  m = build(l=l, selection=selection, keys=keys, budget=16)
  if selection == "learned":
    m.scorer.kernel[...] = normal((D, 1), seed=3)
  rng = np.random.default_rng(5)
  tokens = jnp.asarray(rng.integers(0, 5, (2, l)))
  x = normal((2, l, D), seed=6)
  tokens2 = tokens.at[:, t + 1:].set(100 + jnp.arange(l - t - 1))  # new tokens: no repeats after t
  x2 = x.at[:, t + 1:].set(10 * normal((2, l - t - 1, D), seed=7))
  np.testing.assert_array_equal(mixers.apply(m, x, tokens)[:, :t + 1], mixers.apply(m, x2, tokens2)[:, :t + 1])
  sel, sel2 = m.selected_positions(x, tokens), m.selected_positions(x2, tokens2)
  np.testing.assert_array_equal(sel[:, :t + 1], sel2[:, :t + 1])
  if selection != "random":
    assert (sel[:, t + 1:] != sel2[:, t + 1:]).any()  # the change did reach the selection


def test_the_model_passes_token_ids_to_a_hybrid_layer_that_reads_them():
  cfg = ModelConfig(vocab_size=16, d_model=D, n_layers=2, seq_len=12, mixer={
      "name": "hybrid", "mixers": [{"name": "base_conv", "kernel_size": 3},
                                   {"name": "sparse_attention", "selection": "programmatic", "budget": 4}]})
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 12)))
  logits = model(tokens)
  assert logits.shape == (2, 12, 16) and np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match="needs the token ids"):
    build(selection="programmatic")(normal((1, 12, D)))


# ------------------------------------------------------------------------------- auxiliary loss


def tiny_lm(aux_weight: float):
  cfg = ModelConfig(vocab_size=16, d_model=D, n_layers=2, seq_len=12, mixer={
      "name": "hybrid", "mixers": [{"name": "base_conv", "kernel_size": 3},
                                   {"name": "sparse_attention", "selection": "learned", "budget": 6,
                                    "aux_weight": aux_weight}]})
  graphdef, params = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  return cfg, graphdef, params.to_pure_dict()


def lm_batch():
  rng = np.random.default_rng(1)
  inputs = rng.integers(0, 16, (4, 12))
  return dict(inputs=jnp.asarray(inputs), labels=jnp.asarray(np.roll(inputs, -1, axis=1)))


def mqar_task():
  """The MQAR loss over the 12 labelled positions of `lm_batch` (the loss needs no data of the task's own)."""
  task = object.__new__(tasks.MQARTask)
  task.k = 12
  return task


@pytest.mark.slow  # ~13 s of training on 2 cores; keeps the default suite under 15 min
def test_auxiliary_loss_is_added_logged_and_reaches_the_scorer():
  cfg, graphdef, params = tiny_lm(aux_weight=0.5)
  task, batch = mqar_task(), lm_batch()
  loss_and_metrics = lambda p: trainer.loss_and_metrics(task, graphdef, p, batch)
  (loss, m), grads = jax.jit(jax.value_and_grad(loss_and_metrics, has_aux=True))(params)
  assert 0 < float(m["aux_loss"]) <= 0.5  # 0.5 · mean sigmoid
  np.testing.assert_allclose(loss, m["task_loss"] + m["aux_loss"], rtol=1e-6)
  aux_grad = jax.jit(jax.grad(lambda p: loss_and_metrics(p)[1]["aux_loss"]))(params)
  scorer = aux_grad["blocks"][1]["mixer"]["mixer"]["scorer"]
  assert np.abs(np.asarray(scorer["kernel"])).max() > 0 and np.abs(np.asarray(scorer["bias"])).max() > 0
  assert np.abs(np.asarray(grads["blocks"][1]["mixer"]["mixer"]["scorer"]["kernel"])).max() > 0
  # The train step (same initial parameters: seed 0) logs the task loss as `loss`, the auxiliary one beside it.
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  _, state, sh, step = trainer.single_step(task, cfg, config_lib.defaults().train, mesh, seed=0, total_steps=1)
  _, metrics = step(state, sharding.put({k: np.asarray(v)[None] for k, v in batch.items()}, sh.batch))
  np.testing.assert_allclose(metrics["loss"][0], m["task_loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["aux_loss"][0], m["aux_loss"], rtol=1e-5)


def test_no_auxiliary_loss_without_a_weight():
  _, graphdef, params = tiny_lm(aux_weight=0.0)
  loss, m = jax.jit(lambda p: trainer.loss_and_metrics(mqar_task(), graphdef, p, lm_batch()))(params)
  assert "aux_loss" not in m and loss == m["task_loss"]


# ------------------------------------------------------------------------------------------ cost


def forward_flops(mixer: dict, l: int) -> float:
  module = mixers.build(mixer, d_model=32, seq_len=l, layer_idx=0, n_layers=2, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(module)

  def f(state_, x, tokens):
    return mixers.apply(nnx.merge(graphdef, state_), x, tokens)

  x = jax.ShapeDtypeStruct((1, l, 32), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, l), jnp.int32)
  cost = jax.jit(f).lower(state, x, tokens).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


@pytest.mark.parametrize("mixer", [
    {"selection": "learned", "keys": "selected"},
    {"selection": "programmatic", "keys": "selected"},
    {"selection": "random", "keys": "all"},
], ids=["learned,selected", "programmatic,selected", "random,all"])
def test_cost_grows_linearly_in_length_for_a_fixed_budget(mixer):
  """XLA's FLOP count at L = 512 … 4096 with k = 32: doubling L must not much more than double the cost
  (<= 2.2×), while full (xla) attention's cost grows towards 4× per doubling (checked, so the measure can fail)."""
  lengths = [512, 1024, 2048, 4096]
  sparse = [forward_flops({"name": "sparse_attention", "budget": 32, **mixer}, l) for l in lengths]
  # Full attention's reference on the materialised (xla) path: the blockwise default's loop body is counted
  # once by XLA's cost analysis, which would hide its quadratic growth.
  full = [forward_flops({"name": "attention", "implementation": "xla"}, l) for l in lengths]
  sparse_ratios = np.array(sparse[1:]) / np.array(sparse[:-1])
  full_ratios = np.array(full[1:]) / np.array(full[:-1])
  assert (sparse_ratios <= 2.2).all(), (sparse, sparse_ratios)
  assert full_ratios[-1] >= 3.5, (full, full_ratios)
  assert sparse[-1] < full[-1] / 10


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("hparams,field", [
    ({"selection": "top_k"}, "selection"), ({"keys": "some"}, "keys"), ({"budget": 0}, "budget"),
    ({"aux_weight": -1.0}, "aux_weight"), ({"exclude_tokens": [0, -1]}, "exclude_tokens"),
    ({"num_heads": 0}, "num_heads"), ({"budget": 2.5}, "budget"),
])
def test_bad_hyperparameters_are_one_line_errors_naming_the_field(hparams, field):
  with pytest.raises(ValueError) as err:
    mixers.parse({"name": "sparse_attention", **hparams})
  assert str(err.value).startswith(f"model.mixer.{field}") and "\n" not in str(err.value)


def test_recurrent_form_only_where_a_step_needs_no_token_ids():
  # full and learned have init_state / step (checked against the parallel form by tests/test_mixers.py);
  # random and programmatic select from token ids, which a step does not take.
  for selection, has_step in [("full", True), ("learned", True), ("random", False), ("programmatic", False)]:
    m = build(selection=selection)
    assert callable(getattr(m, "step", None)) is has_step and callable(getattr(m, "init_state", None)) is has_step


# ------------------------------------------------------------------------ selection by MQAR role


def test_mqar_selection_counts_each_role():
  """A programmatic layer selects exactly the queries (keys seen again); filler 0 excluded."""
  from zoo_jax.analysis import selection  # pylint: disable=g-import-not-at-top
  from zoo_jax.data import mqar  # pylint: disable=g-import-not-at-top
  ds = mqar.build_dataset([dict(seq_len=32, num_kv_pairs=4, num_examples=20)], vocab_size=64, seed=0, split="test")
  cfg = ModelConfig(vocab_size=64, d_model=D, n_layers=2, seq_len=32, mixer={
      "name": "hybrid", "mixers": [{"name": "base_conv", "kernel_size": 3},
                                   {"name": "sparse_attention", "selection": "programmatic", "budget": 8,
                                    "exclude_tokens": [0]}]})
  stats = selection.mqar_selection(LanguageModel(cfg, rngs=nnx.Rngs(0)), ds, batch_size=8)
  assert list(stats) == [1]
  assert stats[1] == dict(selected=4.0, keys=0.0, values=0.0, queries=1.0, filler=0.0)


def test_a_learned_layer_runs_under_a_jit_that_closes_over_it():
  m = build(selection="learned")
  x = normal((1, 12, D))
  np.testing.assert_allclose(jax.jit(lambda x_: m(x_))(x), m(x), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------- prefill → decode


def scanned_steps(m, x, state):
  """(state, out) of `step` scanned over x (b, l, d) from `state`."""
  state, y = jax.lax.scan(lambda c, x_bd: m.step(c, x_bd), state, jnp.swapaxes(x, 0, 1))
  return state, jnp.swapaxes(y, 0, 1)


@pytest.mark.slow  # ~9 s each on 2 cores; the registry's prefill tests cover learned selection in the default suite
@pytest.mark.parametrize("keys", ["selected", "all"])
def test_learned_prefill_continues_from_per_example_states_that_spent_some_budget(keys):
  """Rows at different positions t and counts n (row 1's budget already spent in part): the parallel form
  from the stepped state gives the parallel outputs at t .. t + l − 1 and the stepped state after them, with
  rotary positions offset by t. (tests/test_mixers.py checks a common t at a budget no prefix exhausts.)"""
  l_total, budget, length = 16, 4, 5
  m = build(l=l_total, selection="learned", keys=keys, budget=budget, num_heads=2, rotary=True)
  m.scorer.kernel[...] = normal((D, 1), seed=3)
  x = normal((2, l_total, D), seed=5)  # selects rows 0: 0, 1, 2, 3; 1: 1, 6, 8, 9
  out = mixers.apply(m, x)
  starts = (2, 7)
  rows = [jax.tree.map(lambda a: a[None], jax.tree.map(lambda a: a[0], scanned_steps(m, x[i:i + 1, :t],
                                                                                     m.init_state(1))[0]))
          for i, t in enumerate(starts)]
  state = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *rows)
  np.testing.assert_array_equal(state["n"], [2, 2])  # each continuation spends the rest of the budget
  chunk = jnp.stack([x[i, t:t + length] for i, t in enumerate(starts)])
  y, new_state = mixers.apply(m, chunk, state=state, return_state=True)
  want_state, want_y = scanned_steps(m, chunk, state)
  for i, t in enumerate(starts):
    np.testing.assert_allclose(y[i], out[i, t:t + length], rtol=0, atol=1e-5 * float(jnp.abs(out).max()))
  np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-5 * float(jnp.abs(want_y).max()))
  for name in ("k", "v", "key_log_gate"):
    np.testing.assert_allclose(new_state[name], want_state[name], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(new_state["n"], want_state["n"])
  np.testing.assert_array_equal(new_state["t"], np.array(starts) + length)


@pytest.mark.parametrize("selection", ["random", "programmatic"])
def test_selections_that_read_token_ids_have_no_state_to_pass(selection):
  m = build(selection=selection)
  x, tokens = normal((1, 12, D)), jnp.zeros((1, 12), jnp.int32)
  with pytest.raises(ValueError, match="has no recurrent state") as err:
    mixers.apply(m, x, tokens, return_state=True)
  assert "\n" not in str(err.value)
