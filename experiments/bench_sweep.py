r"""Many models per device: a vmapped group against the same runs trained one after another.

  python experiments/bench_sweep.py                       # 4 learning rates × 2 seeds, 100 steps each
  python experiments/bench_sweep.py --mixer=attention --d_model=128 --seq_len=32 --steps=200

Both sides run the training core's step (`zoo_jax.trainer.make_train_step`) on the same batches: the group
as one population of all runs, as `zoo_jax.sweep` trains it (one jitted step vmapped over the models, each with
its own parameters, optimizer state, learning rate and data order), the sequential side as populations of one,
as `zoo_jax.train` trains a single run, one run after another. Compilation is excluded (two warm-up steps
each); the printed ratio is sequential wall time / vmapped wall time, measured in one process.
"""

import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from zoo_jax import config as config_lib
from zoo_jax import sharding
from zoo_jax import sweep
from zoo_jax import tasks
from zoo_jax import trainer
from zoo_jax.configs import figure2

MIXERS = {"base_conv": {"name": "base_conv", "kernel_size": [3, -1]}, "attention": {"name": "attention"}}
if __name__ == "__main__":  # flags of the command line only: accelerator_check.py imports measure()
  _MIXER = flags.DEFINE_enum("mixer", "base_conv", list(MIXERS), "Mixer of every run.")
  _D_MODEL = flags.DEFINE_integer("d_model", 64, "Model width.")
  _SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "MQAR sequence length (num_kv_pairs = seq_len / 8).")
  _BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size of every run.")
  _STEPS = flags.DEFINE_integer("steps", 100, "Timed steps per run (after 2 warm-up steps).")
  _LRS = flags.DEFINE_list("learning_rates", ["1e-4", "3e-4", "1e-3", "3e-3"], "Learning rates of the group.")
  _SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the group.")


def _config(mixer: str, d_model: int, seq_len: int, batch_size: int, steps: int, learning_rates: list[float],
            seeds: list[int]) -> dict:
  c = config_lib.defaults().to_dict()
  c["data"]["vocab_size"] = 128
  c["model"].update(d_model=d_model, mixer=MIXERS[mixer], learned_positions=mixer == "attention")
  c["train"].update(batch_size=batch_size, epochs=1)
  n = (steps + 2) * batch_size
  length = (seq_len, seq_len // 8)
  c["runs"] = {f"{mixer}-d{d_model}-L{length[0]}-kv{length[1]}":
               dict(data=figure2.data(*length, train_examples=n, eval_examples=batch_size))}
  c["sweep"] = dict(learning_rate=learning_rates, seed=seeds)
  return c


def measure(mixer: str, d_model: int, seq_len: int, batch_size: int, steps: int, learning_rates: list[float],
            seeds: list[int]) -> dict:
  """{runs, steps, sequential_s, vmapped_s}: wall seconds of `steps` timed steps of every run of the
  group (learning_rates × seeds), one after another as populations of one, then as one vmapped population."""
  runs = sweep.expand_grid(_config(mixer, d_model, seq_len, batch_size, steps, learning_rates, seeds))
  config, model_cfg = config_lib.resolve(runs[0].config)
  total = steps + 2

  # Sequential: each run a population of one (zoo_jax.train's step), one run after another.
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  seq_seconds = 0.0
  for run in runs:
    run_cfg = config_lib.resolve(run.config)[0]
    task = tasks.MQARTask(run_cfg, [run.seed])
    _, state, sh, step_fn = trainer.single_step(task, model_cfg, run_cfg.train, mesh, run.seed, total)
    device_batches = [sharding.put(b, sh.batch) for b in task.train_batches(0)]
    for b in device_batches[:2]:
      state, _ = step_fn(state, b)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for b in device_batches[2:total]:
      state, metrics = step_fn(state, b)
    jax.block_until_ready((state, metrics))
    seq_seconds += time.perf_counter() - t0

  # Vmapped: the whole group as one population (zoo_jax.sweep's step), each model with its run's batches.
  members = sweep.members_of(runs)
  task = tasks.MQARTask(config, [m.seed for m in members])
  mesh = sweep.runs_mesh(len(runs), jax.devices()[:1])
  graphdef, state, sh, tx, unit = trainer.init_state(model_cfg, config.train, members, total, mesh)
  train_step = trainer.make_train_step(task, graphdef, tx, unit, sh)
  active = jax.device_put(np.ones(len(members), bool), sh.member)
  stacked = [sharding.put(b, sh.batch) for b in task.train_batches(0)]
  for b in stacked[:2]:
    state, _ = train_step(state, active, b)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for b in stacked[2:total]:
    state, metrics = train_step(state, active, b)
  jax.block_until_ready((state, metrics))
  return dict(runs=len(runs), steps=steps, sequential_s=seq_seconds, vmapped_s=time.perf_counter() - t0)


def main(argv):
  del argv
  r = measure(_MIXER.value, _D_MODEL.value, _SEQ_LEN.value, _BATCH.value, _STEPS.value,
              [float(x) for x in _LRS.value], [int(x) for x in _SEEDS.value])
  n, s, seq_seconds, vmap_seconds = r["runs"], r["steps"], r["sequential_s"], r["vmapped_s"]
  print(f"{_MIXER.value} d_model={_D_MODEL.value} L={_SEQ_LEN.value} batch={_BATCH.value}: {n} runs "
        f"({len(_LRS.value)} learning rates × {len(_SEEDS.value)} seeds) × {s} steps, "
        f"{jax.default_backend()} ({os.cpu_count()} cores), load {os.getloadavg()[0]:.1f}")
  print(f"| | wall s | ms per model-step |\n|---|---|---|\n"
        f"| one after another | {seq_seconds:.2f} | {1000 * seq_seconds / (n * s):.2f} |\n"
        f"| vmapped group | {vmap_seconds:.2f} | {1000 * vmap_seconds / (n * s):.2f} |")
  print(f"vmapped group / sequential wall time: {vmap_seconds / seq_seconds:.2f} "
        f"(speed-up {seq_seconds / vmap_seconds:.2f}x)")


if __name__ == "__main__":
  app.run(main)
