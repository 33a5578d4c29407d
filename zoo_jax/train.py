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
import math
import os
import time
from typing import Any

import jax
import numpy as np

from zoo_jax import checkpoint as checkpoint_lib
from zoo_jax import config as config_lib
from zoo_jax import sharding
from zoo_jax import sweep
from zoo_jax import tasks
from zoo_jax import trainer

NonFiniteLossError = trainer.NonFiniteLossError
SOLVED_ACCURACY = 0.99  # a seed "solves" MQAR when its test accuracy reaches this on every test slice


def solved(test_accuracy: float, test_slices: dict[str, float]) -> bool:
  """Whether one model solved MQAR: test accuracy >= SOLVED_ACCURACY on every test slice (each length and
  number of kv pairs of the test split; a mixed-length run must solve each of its lengths), or overall when
  the summary has no slices."""
  values = list(test_slices.values()) or [test_accuracy]
  return all(math.isfinite(v) and v >= SOLVED_ACCURACY for v in values)


def train_and_evaluate(config: Any, workdir: str, *, label: str = "",
                       _kill_after_steps: int | None = None) -> dict[str, Any]:
  """Trains one model on MQAR as configured, writing everything to `workdir`; returns the summary.

  Reruns with the same workdir resume from its latest good checkpoint. `label` prefixes its progress lines
  (runs training at once in one process). `_kill_after_steps` is a test hook
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
  for seq_len, rows in (tasks.length_group_counts(config.data, config.train.batch_size) or {}).items():
    if rows % n_data:
      raise ValueError(f"data.group_by_length: a batch's {rows} rows of length {seq_len} are not a multiple of "
                       f"the mesh's data axis ({n_data}); set data.group_by_length=false or change the segments")
  lock = checkpoint_lib.open_workdir(workdir, config.to_json(indent=2, sort_keys=True),
                                     defaults=config_lib.defaults().to_dict())
  try:
    return _run(config, model_cfg, mesh, workdir, _kill_after_steps, label)
  finally:
    lock.release()


def _run(config, model_cfg, mesh, workdir: str, kill_after_steps: int | None, label: str) -> dict[str, Any]:
  start_time = time.time()
  member = trainer.Member("run", config.seed, config.train.learning_rate, config.train.weight_decay)
  task = tasks.MQARTask(config, [member.seed])
  state_size = model_cfg.state_size()
  print(f"{label}training {model_cfg.mixer} d_model={model_cfg.d_model} n_layers={model_cfg.n_layers}: state size "
        f"{state_size:,}, {task.steps_per_epoch} steps/epoch, mesh {dict(mesh.shape)}", flush=True)
  writer = trainer.MetricsWriter(workdir)
  try:
    run = trainer.train(task, model_cfg=model_cfg, train_cfg=config.train, members=[member], mesh=mesh,
                        checkpoint_dir=os.path.join(workdir, "checkpoints"),
                        hooks=trainer.Hooks(write=writer.write, label=label, kill_after_steps=kill_after_steps),
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
      learning_rate=config.train.learning_rate,
      seed=config.seed,
      seq_len=config.data.train_segments[0]["seq_len"],
      num_seeds=1,
      seeds_solved=int(solved(test["accuracy"], test["slices"])),
  )
  checkpoint_lib.write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  print(f"{label}done: best epoch {summary['best_epoch']}: validation accuracy {summary['validation_accuracy']:.4f}, "
        f"test accuracy {summary['test_accuracy']:.4f}", flush=True)
  return summary


def train_population(config: Any, workdir: str, *, seeds: list[int], learning_rates: list[float],
                     name: str = "run", label: str = "") -> dict[str, Any]:
  """Trains one MQAR run config at every seed × learning rate as ONE vmapped population (the sweep's
  `train_group`: each model exactly as `train_and_evaluate` would train it alone) and summarises it by
  Zoology's protocol: the learning rate with the best validation accuracy (mean over seeds), then at that
  learning rate the test accuracy's mean and standard deviation over seeds and how many seeds reach
  `SOLVED_ACCURACY` on every test slice (`solved`). Writes `<workdir>/summary.json` (these fields plus `members`, one results row per
  model) beside the group's metrics.jsonl and checkpoints; a rerun resumes or reports. `label` prefixes its
  progress lines.
  """
  sweep_config = dict(config_lib.as_dict(config), runs={name: {}},
                      sweep=dict(seed=list(seeds), learning_rate=list(learning_rates)))
  runs = sweep.expand_grid(sweep_config)  # every model's config checked before anything is written
  start_time = time.time()
  resolved, model_cfg = config_lib.resolve(runs[0].config)
  print(f"{label}training {model_cfg.mixer} d_model={model_cfg.d_model}: {len(runs)} models (learning rates "
        f"{list(learning_rates)} × seeds {list(seeds)}) as one population", flush=True)
  rows = sweep.train_group(runs, workdir, label=label)
  summary = summarize_population(rows)
  segment = resolved.data.train_segments[0]
  summary.update(d_model=model_cfg.d_model, seq_len=segment["seq_len"], num_kv_pairs=segment["num_kv_pairs"],
                 mixer=dict(resolved.model.mixer), wall_seconds=time.time() - start_time,
                 devices=len(jax.devices()), backend=jax.default_backend())
  checkpoint_lib.write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  print(f"{label}done: learning rate {summary['learning_rate']:.2e} (best mean validation accuracy "
        f"{summary['validation_accuracy']:.4f}): test accuracy {summary['test_accuracy']:.4f} ± "
        f"{summary['test_std']:.4f} over {summary['num_seeds']} seeds, {summary['seeds_solved']}/"
        f"{summary['num_seeds']} at >= {SOLVED_ACCURACY}", flush=True)
  return summary


def summarize_population(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Zoology's protocol over one run's results rows (learning rates × seeds): the learning rate of the best
  mean validation accuracy over seeds (a diverged model counts as 0); at it, the mean and (population)
  standard deviation over seeds of the test accuracy and of each test slice, the seeds reaching
  `SOLVED_ACCURACY` on every test slice (`solved`: a mixed-length run counts a seed only if it solves each
  length), and each seed's best epoch."""
  by_lr: dict[float, list[dict[str, Any]]] = {}
  for row in rows:
    by_lr.setdefault(float(row["learning_rate"]), []).append(row)

  def finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0

  def validation(lr: float) -> float:
    return float(np.mean([finite(r["validation_accuracy"]) for r in by_lr[lr]]))

  lr = max(sorted(by_lr), key=validation)
  chosen = by_lr[lr]
  tests = np.asarray([finite(r["test_accuracy"]) for r in chosen])
  slices = sorted({s for r in chosen for s in r["test_slices"]})
  return dict(
      learning_rate=lr, learning_rates=sorted(by_lr), seeds=[int(r["seed"]) for r in chosen],
      num_seeds=len(chosen), validation_accuracy=validation(lr),
      validation_by_learning_rate={f"{k:.2e}": validation(k) for k in sorted(by_lr)},
      test_accuracy=float(tests.mean()), test_std=float(tests.std()),
      test_accuracies=[float(t) for t in tests],
      seeds_solved=sum(solved(finite(r["test_accuracy"]), r["test_slices"]) for r in chosen),
      test_slices={s: float(np.mean([r["test_slices"].get(s, 0.0) for r in chosen])) for s in slices},
      test_slices_std={s: float(np.std([r["test_slices"].get(s, 0.0) for r in chosen])) for s in slices},
      best_epoch=[int(r["best_epoch"]) for r in chosen], epochs_run=[int(r["epochs_run"]) for r in chosen],
      status=[r["status"] for r in chosen], num_params=int(chosen[0]["num_params"]),
      state_size=int(chosen[0]["state_size"]), tokens_per_sec=float(chosen[0]["tokens_per_sec"]),
      train_seconds=float(chosen[0]["train_seconds"]), members=rows)


# ---------------------------------------------------------------------------------------------- Table and plot
# (experiments/mqar.py prints and writes these from the runs' summary.json files.)


def _accuracy(s: dict) -> str:
  if s.get("num_seeds", 1) > 1:
    return f"{s['test_accuracy']:.3f} ± {s['test_std']:.3f}"
  return f"{s['test_accuracy']:.3f}"


def _seeds_solved(s: dict) -> int:
  """The seeds of a summary that reach SOLVED_ACCURACY on every test slice, recounted from its members'
  (or its own) slices, so that a summary written before that rule (which counted overall accuracy) reads
  the same as a new one."""
  members = s.get("members")
  if members:
    chosen = [m for m in members if float(m["learning_rate"]) == float(s.get("learning_rate", m["learning_rate"]))]
    return sum(solved(m["test_accuracy"], m.get("test_slices") or {}) for m in chosen)
  if s.get("num_seeds", 1) == 1:
    return int(solved(s["test_accuracy"], s.get("test_slices") or {}))
  return int(s["seeds_solved"])


def format_table(summaries: dict) -> str:
  slices = sorted({s for summary in summaries.values() for s in summary["test_slices"]},
                  key=lambda s: [int(x) for x in s[1:].split("_kv")])
  # A seed counts only if it reaches SOLVED_ACCURACY on every test slice (solved).
  header = ["run", "d_model", "params", "state size", "lr", "valid acc", "test acc",
            *(f"test {s}" for s in slices), f"seeds ≥ {SOLVED_ACCURACY} at every L", "best epoch", "tok/s", "train s"]
  rows = [header, ["---"] * len(header)]
  for name, s in summaries.items():
    best_epoch = s["best_epoch"] if isinstance(s["best_epoch"], list) else [s["best_epoch"]]
    solved = f"{_seeds_solved(s)}/{s.get('num_seeds', 1)}"
    rows.append([name, str(s["d_model"]), f"{s['num_params']:,}", f"{s['state_size']:,}",
                 f"{s['learning_rate']:.0e}" if "learning_rate" in s else "–",
                 f"{s['validation_accuracy']:.3f}", _accuracy(s),
                 *(f"{s['test_slices'][sl]:.3f}" if sl in s["test_slices"] else "–" for sl in slices),
                 solved, ",".join(map(str, best_epoch)), f"{s['tokens_per_sec']:,.0f}", f"{s['train_seconds']:.0f}"])
  return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _slice_length(name: str) -> int:
  """The sequence length of a test slice's name ('L32_kv4' -> 32)."""
  return int(name[1:].split("_kv")[0])


def length_points(summary: dict) -> dict[int, tuple[float, float]]:
  """{L: (mean, std over seeds)} of one run's test accuracy at each of its test lengths, read from its test
  slices (a run trained on a mixture of lengths has a point per length; slices with the same L and
  different kv pairs are averaged); a run without slices gives its first training length and overall test
  accuracy."""
  slices, stds = summary.get("test_slices") or {}, summary.get("test_slices_std") or {}
  if not slices:
    return {int(summary["seq_len"]): (summary["test_accuracy"], summary.get("test_std", 0.0))} if "seq_len" in summary else {}
  by_length: dict[int, list[tuple[float, float]]] = {}
  for name, accuracy in slices.items():
    by_length.setdefault(_slice_length(name), []).append((accuracy, stds.get(name, 0.0)))
  return {l: (float(np.mean([m for m, _ in v])), float(np.mean([s for _, s in v]))) for l, v in by_length.items()}


def plot_accuracy_vs_length(summaries: dict, path: str) -> bool:
  """Test accuracy against L per mixer (mean ± std over seeds) to `path`, each run read at each of its test
  lengths (`length_points`); False (nothing written) unless some mixer has points at two or more lengths."""
  curves: dict[str, dict[int, tuple[float, float]]] = {}
  for s in summaries.values():
    mixer = s["mixer"]["name"] if isinstance(s.get("mixer"), dict) else str(s.get("mixer", "?"))
    curves.setdefault(mixer, {}).update(length_points(s))
  if not any(len(points) > 1 for points in curves.values()):
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for mixer, points in sorted(curves.items()):
    lengths = sorted(points)
    mean, std = (np.asarray([points[l][i] for l in lengths]) for i in (0, 1))
    ax.errorbar(lengths, mean, yerr=std, marker="o", capsize=3, label=mixer)
  widths = sorted({s["d_model"] for s in summaries.values()})
  ax.set(xscale="log", xlabel="sequence length L", ylabel="MQAR test accuracy", ylim=(-0.02, 1.02),
         title=f"d_model {', '.join(map(str, widths))}: mean ± std over seeds")
  ax.minorticks_off()
  ax.set_xticks(sorted({l for p in curves.values() for l in p}))
  ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.grid(alpha=0.3)
  ax.legend(loc="center right")  # clear of the curves near 1.0 and near chance
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True
