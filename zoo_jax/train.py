"""One MQAR run: `train_and_evaluate(config, workdir)`, callable from a binary or a notebook.

A thin entry point over the one training core (`zoo_jax.trainer`, a population of one, with the MQAR task
of `zoo_jax.tasks`). One jitted train step, its parameter, optimizer-state, batch and metric shardings
declared over a (data, fsdp, model) mesh, runs unchanged on one CPU, simulated CPU devices, a GPU or a TPU.

Differences from Zoology's trainer (`zoology/train.py`):
- model selection and early stopping use a validation split; the test split is evaluated once, at the end,
  with the parameters of the best validation epoch (Zoology early-stops and reports on its test set);
- the cosine schedule decays per step over the whole run, after an optional warmup (Zoology steps a
  `CosineAnnealingLR` once per epoch);
- the LM head runs at labelled positions only (Zoology computes logits at every position);
- a non-finite loss stops the run and keeps the last good checkpoint; reruns resume from the workdir.

Workdir: config.json, metrics.jsonl, TensorBoard events (tb/), checkpoints/ (Orbax, async, last few kept),
summary.json at the end; `.lock` while a process works in it.
"""

import json
import os
import time
from typing import Any

import jax

from zoo_jax import checkpoint as checkpoint_lib
from zoo_jax import config as config_lib
from zoo_jax import sharding
from zoo_jax import tasks
from zoo_jax import trainer

NonFiniteLossError = trainer.NonFiniteLossError


def train_and_evaluate(config: Any, workdir: str, *, _kill_after_steps: int | None = None) -> dict[str, Any]:
  """Trains one model on MQAR as configured, writing everything to `workdir`; returns the summary.

  Reruns with the same workdir resume from its latest good checkpoint. `_kill_after_steps` is a test hook
  that stops the run abruptly after that many steps of this invocation, as a crash would.
  """
  # Config: everything is checked before any data is generated or any array allocated.
  config, model_cfg = config_lib.resolve(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  n_data = mesh.shape["data"]
  for key in ("batch_size", "eval_batch_size"):
    if config.train[key] % n_data:
      raise ValueError(f"train.{key} must be a multiple of the mesh's data axis ({n_data}), "
                       f"got {config.train[key]}")
  lock = checkpoint_lib.open_workdir(workdir, config.to_json(indent=2, sort_keys=True))
  try:
    return _run(config, model_cfg, mesh, workdir, _kill_after_steps)
  finally:
    lock.release()


def _run(config, model_cfg, mesh, workdir: str, kill_after_steps: int | None) -> dict[str, Any]:
  start_time = time.time()
  member = trainer.Member("run", config.seed, config.train.learning_rate, config.train.weight_decay)
  task = tasks.MQARTask(config, [member.seed])
  state_size = model_cfg.state_size()
  print(f"training {model_cfg.mixer} d_model={model_cfg.d_model} n_layers={model_cfg.n_layers}: state size "
        f"{state_size:,}, {task.steps_per_epoch} steps/epoch, mesh {dict(mesh.shape)}", flush=True)
  writer = trainer.MetricsWriter(workdir)
  try:
    run = trainer.train(task, model_cfg=model_cfg, train_cfg=config.train, members=[member], mesh=mesh,
                        checkpoint_dir=os.path.join(workdir, "checkpoints"),
                        hooks=trainer.Hooks(write=writer.write, kill_after_steps=kill_after_steps),
                        on_divergence="raise")
  finally:
    writer.close()

  # Test, once, with the parameters of the best validation epoch.
  model = run.progress["models"][0]
  best_params = run.state["best_params"]
  test = task.evaluate(run.eval_step, best_params, "test", run.shardings)[0]
  validation = task.evaluate(run.eval_step, best_params, "validation", run.shardings)[0]
  best = model["best"]
  summary = dict(
      mixer=model_cfg.mixer if isinstance(model_cfg.mixer, dict) else dict(model_cfg.mixer),
      d_model=model_cfg.d_model,
      validation_accuracy=best["accuracy"],
      validation_loss=best["loss"],
      test_accuracy=test["accuracy"],
      test_loss=test["loss"],
      test_slices=test["slices"],
      best_epoch=best["epoch"],
      epochs_run=len(model["history"]),
      stopped_early=model["status"] == "stopped",
      steps=int(run.state["step"]),
      num_params=run.num_params,
      state_size=state_size,
      tokens_per_sec=run.progress["trained_steps"] * task.tokens_per_step / max(run.progress["train_seconds"], 1e-9),
      train_seconds=run.progress["train_seconds"],
      wall_seconds=time.time() - start_time,
      devices=len(mesh.devices.flat),
      backend=jax.default_backend(),
      validation_slices=validation["slices"],
  )
  checkpoint_lib.write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  print(f"done: best epoch {summary['best_epoch']}: validation accuracy {summary['validation_accuracy']:.4f}, "
        f"test accuracy {summary['test_accuracy']:.4f}", flush=True)
  return summary
