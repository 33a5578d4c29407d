"""Fresh mixed-length MQAR batches grouped by length (`data.group_by_length`): each length's rows run at
their own length in one step, with the padded batch's loss and gradients."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import config as config_lib
from zoo_jax import tasks
from zoo_jax.configs import mqar as mqar_configs
from zoo_jax.data import mqar
from zoo_jax.model import LanguageModel


def _run_config(name: str, **data) -> dict:
  config = config_lib.expand_runs(mqar_configs.get_config(None))[name]
  config["model"].update(d_model=16, n_layers=1)
  config["data"].update(data)
  return config


def _batch(config: dict, step: int = 3) -> dict:
  d = config["data"]
  return mqar.fresh_batch(d["train_segments"], 64, vocab_size=d["vocab_size"], seed=1, step=step,
                          power_a=d["power_a"], random_non_queries=d["random_non_queries"])


def test_groups_keep_every_row_at_its_own_length():
  config = _run_config("attention_L16_32")
  padded = _batch(config)
  grouped = tasks.group_by_length(padded)
  assert sorted(grouped) == ["inputs@L16", "inputs@L32", "labels@L16", "labels@L32", "weight@L16", "weight@L32"]
  assert grouped["inputs@L16"].shape == (48, 16) and grouped["inputs@L32"].shape == (16, 32)  # the 3:1 shares
  short = padded["seq_len"] == 16
  np.testing.assert_array_equal(grouped["inputs@L16"], padded["inputs"][short][:, :16])
  assert (padded["labels"][short][:, 16:] == mqar.IGNORE_INDEX).all()  # only padding was cut
  np.testing.assert_array_equal(grouped["labels@L32"], padded["labels"][~short])
  assert tasks.length_group_counts(config_lib.resolve(config)[0].data, 64) == {16: 48, 32: 16}
  assert tasks.length_group_counts(config_lib.resolve(_run_config(
      "attention_L16_32", group_by_length=False))[0].data, 64) is None


@pytest.mark.parametrize("name", ["attention_L16_32", pytest.param("base_conv_L16_32", marks=pytest.mark.slow)])
def test_grouped_loss_and_gradients_equal_the_padded_batch(name):
  config = _run_config(name)
  _, model_cfg = config_lib.resolve(config)
  graphdef, params = nnx.split(LanguageModel(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)
  padded = _batch(config)
  plain = {k: jnp.asarray(padded[k]) for k in ("inputs", "labels", "weight")}
  grouped = {k: jnp.asarray(v) for k, v in tasks.group_by_length(padded).items()}

  def loss(p, batch):
    sums = tasks.grouped_mqar_sums(nnx.merge(graphdef, p), batch, k=4)
    return sums["loss_sum"] / sums["tokens"], sums

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (loss_p, sums_p), grads_p = grad_fn(params, plain)
  (loss_g, sums_g), grads_g = grad_fn(params, grouped)
  np.testing.assert_allclose(loss_g, loss_p, rtol=1e-6)
  for key in ("tokens", "examples", "acc_sum"):
    np.testing.assert_allclose(sums_g[key], sums_p[key], rtol=1e-6)
  flat_p, flat_g = jax.tree.leaves(grads_p), jax.tree.leaves(grads_g)
  scale = max(float(jnp.max(jnp.abs(g))) for g in flat_p)
  for gp, gg in zip(flat_p, flat_g):
    np.testing.assert_allclose(gg, gp, rtol=1e-4, atol=1e-6 * scale)


def test_task_yields_grouped_batches_and_counts_real_tokens():
  config, _ = config_lib.resolve(_run_config("attention_L16_32"))
  task = tasks.MQARTask(config, seeds=[0, 1])
  batch = next(task.train_batches(0))
  assert batch["inputs@L16"].shape == (2, 48, 16) and batch["inputs@L32"].shape == (2, 16, 32)
  assert task.tokens_per_step == 48 * 16 + 16 * 32
  config.data.group_by_length = False
  task = tasks.MQARTask(config, seeds=[0])
  assert next(task.train_batches(0))["inputs"].shape == (1, 64, 32)
