"""Every registered mixer trains: on a small MQAR setting its loss falls clearly below the start within a
fixed step budget. Parameterized over the registry (default hyperparameters but for `FIT_L`), so a new mixer
is covered.

Setting: vocabulary 64, L = 16 with 2 kv pairs, width 32, 2 layers (Zoology's block, no MLP), batch 32,
AdamW lr 3e-3 constant, 200 steps. The first loss is ~log(64) = 4.2 (uniform over the vocabulary); a model
that learns only to put its mass on the value half of the vocabulary gets ~log(32) = 3.5. The test asks
the mean loss of the last 10 steps to be below 75% of the first step's.
"""

import jax
import numpy as np
import pytest

from zoo_jax import config as config_lib
from zoo_jax import mixers
from zoo_jax import sharding
from zoo_jax import tasks
from zoo_jax import trainer

STEPS = 200
# Default hyperparameters, except sizes the config check requires to fit this test's L = 16: the local
# attentions' default window and block (64) are longer than the sequence.
FIT_L = {"sliding_window": {"window_size": 8}, "blocked": {"block_size": 8}}


# The foundation mixers train in the default suite; the others (~10-13 s each on 2 cores) with the slow tests.
DEFAULT_SUITE = ("attention", "base_conv", "hybrid")


@pytest.mark.parametrize("name", [name if name in DEFAULT_SUITE else pytest.param(name, marks=pytest.mark.slow)
                                  for name in mixers.names()])
def test_loss_falls_on_small_mqar(name):
  cfg = config_lib.defaults().to_dict()
  segments = [dict(seq_len=16, num_kv_pairs=2, num_examples=STEPS * 32)]
  cfg["data"].update(vocab_size=64, train_segments=segments, validation_segments=segments,
                     test_segments=segments)
  cfg["model"].update(d_model=32, mixer={"name": name, **FIT_L.get(name, {})})
  cfg["train"].update(epochs=1, batch_size=32, learning_rate=3e-3, schedule="constant")
  cfg, model_cfg = config_lib.resolve(cfg)
  task = tasks.MQARTask(cfg, [0])
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  _, state, sh, step_fn = trainer.single_step(task, model_cfg, cfg.train, mesh, seed=0, total_steps=STEPS)
  losses = []
  for batch in task.train_batches(0):
    state, metrics = step_fn(state, sharding.put(batch, sh.batch))
    losses.append(metrics["loss"][0])
  losses = np.asarray(jax.device_get(losses))
  assert len(losses) == STEPS and np.isfinite(losses).all(), losses
  assert losses[-10:].mean() < 0.75 * losses[0], f"{name}: first loss {losses[0]:.3f}, last 10 {losses[-10:]}"
