r"""Many models per device: a vmapped group against the same runs trained one after another.

  python experiments/bench_sweep.py                       # 4 learning rates × 2 seeds, 100 steps each
  python experiments/bench_sweep.py --mixer=attention --d_model=128 --seq_len=32 --steps=200

Both sides run the same steps on the same batches: the group as one jitted `zoo_jax.sweep` step over all
models (vmapped, each with its own parameters, optimizer state, learning rate and data order), the
sequential side as `zoo_jax.train`'s single-run step, once per run. Compilation is excluded (two warm-up
steps each); the printed ratio is sequential wall time / vmapped wall time, measured in one process.
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
from zoo_jax import train
from zoo_jax.data import mqar

MIXERS = {"base_conv": {"name": "base_conv", "kernel_size": [3, -1]}, "attention": {"name": "attention"}}
_MIXER = flags.DEFINE_enum("mixer", "base_conv", list(MIXERS), "Mixer of every run.")
_D_MODEL = flags.DEFINE_integer("d_model", 64, "Model width.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "MQAR sequence length (num_kv_pairs = seq_len / 8).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size of every run.")
_STEPS = flags.DEFINE_integer("steps", 100, "Timed steps per run (after 2 warm-up steps).")
_LRS = flags.DEFINE_list("learning_rates", ["1e-4", "3e-4", "1e-3", "3e-3"], "Learning rates of the group.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the group.")


def _config() -> dict:
  c = config_lib.defaults().to_dict()
  c["data"]["vocab_size"] = 128
  c["model"].update(d_model=_D_MODEL.value, mixer=MIXERS[_MIXER.value],
                    learned_positions=_MIXER.value == "attention")
  c["train"].update(batch_size=_BATCH.value, epochs=1)
  n = (_STEPS.value + 2) * _BATCH.value
  c["sweep"] = dict(mixers={_MIXER.value: {}}, d_model=[_D_MODEL.value],
                    lengths=[dict(seq_len=_SEQ_LEN.value, num_kv_pairs=_SEQ_LEN.value // 8, train_examples=n,
                                  eval_examples=_BATCH.value)],
                    learning_rate=[float(x) for x in _LRS.value], seed=[int(x) for x in _SEEDS.value])
  return c


def main(argv):
  del argv
  runs = sweep.expand_grid(_config())
  config, model_cfg = config_lib.resolve(runs[0].config)
  seeds = [r.seed for r in runs]
  data = {s: mqar.build_dataset(config.data.train_segments, vocab_size=128, seed=s, split="train")
          for s in set(seeds)}
  k = data[seeds[0]].max_labels_per_example
  total = _STEPS.value + 2
  batches = {s: list(mqar.epoch_batches(data[s], _BATCH.value, seed=s, epoch=0)) for s in set(seeds)}

  mesh = sharding.make_mesh(devices=jax.devices()[:1])

  # Sequential: zoo_jax.train's single-run step, one run after another.
  seq_seconds = 0.0
  for run in runs:
    run_cfg = config_lib.resolve(run.config)[0]
    graphdef, params, param_sh = train.init_model(model_cfg, mesh, run.seed)
    tx, schedule = train.make_optimizer(run_cfg.train, total)
    opt_sh = train.optimizer_shardings(tx, params, param_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    step_fn = train.make_train_step(graphdef, tx, schedule, k, param_sh, opt_sh, mesh)
    step = jax.device_put(np.zeros((), np.int32), sharding.replicated(mesh))
    device_batches = [sharding.put_batch(b, mesh) for b in batches[run.seed]]
    for b in device_batches[:2]:
      params, opt_state, step, _ = step_fn(params, opt_state, step, b)
    jax.block_until_ready(params)
    t0 = time.perf_counter()
    for b in device_batches[2:total]:
      params, opt_state, step, metrics = step_fn(params, opt_state, step, b)
    jax.block_until_ready((params, metrics))
    seq_seconds += time.perf_counter() - t0

  # Vmapped: the whole group in one jitted step.
  group = sweep.init_group(model_cfg, config.train, seeds, total, k,
                           sweep._runs_mesh(len(runs), jax.devices()[:1]))  # pylint: disable=protected-access
  params, opt_state, train_step = group.params, group.opt_state, group.train_step
  lrs = group.put(np.asarray([r.learning_rate for r in runs], np.float32))
  step = jax.device_put(np.zeros((), np.int32), group.rep)
  stacked = [group.put({key: np.stack([batches[s][i][key] for s in seeds]) for key in ("inputs", "labels", "weight")})
             for i in range(total)]
  for b in stacked[:2]:
    params, opt_state, step, _ = train_step(params, opt_state, step, lrs, b)
  jax.block_until_ready(params)
  t0 = time.perf_counter()
  for b in stacked[2:]:
    params, opt_state, step, metrics = train_step(params, opt_state, step, lrs, b)
  jax.block_until_ready((params, metrics))
  vmap_seconds = time.perf_counter() - t0

  n, s = len(runs), _STEPS.value
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
