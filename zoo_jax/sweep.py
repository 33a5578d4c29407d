r"""Sweeps: a grid of MQAR runs, trained in groups of many models per jitted step, one results table.

A sweep config is a run config (`zoo_jax.config.defaults()`) plus a `sweep` section that spans the grid

    mixer × d_model × (seq_len, num_kv_pairs) × learning_rate × seed

    sweep.mixers         {name: partial run config}, e.g. {'attention': {'model': {'mixer': {...}}}}; a
                         value '${seq_len}' anywhere in it becomes the run's sequence length (H3's d_state)
    sweep.d_model        [64, 128, ...]
    sweep.lengths        [{seq_len, num_kv_pairs, train_examples, eval_examples[, batch_size]}, ...]
                         (validation and test each get eval_examples examples; batch_size overrides
                         train.batch_size at that length, as the paper halves it for long sequences)
    sweep.learning_rate  [1e-4, ...]
    sweep.seed           [0, ...]
    sweep.max_group_size 0 (no limit) or the most models one jitted step trains at once

Runs whose configs agree in everything but learning rate and seed form a *group*, trained together as
one population of the training core (`zoo_jax.trainer`): the same jitted step as a single run, vmapped
over a leading model axis, each model with its own parameters, optimizer state, data order (its seed) and
learning rate (an injected optimizer hyperparameter). Each model follows exactly the protocol of
`zoo_jax.train.train_and_evaluate` (a single run is a population of one): same initialisation, batches,
schedule, per-epoch validation, selection on validation, early stop above `train.early_stop_accuracy`,
test evaluated once with the best parameters. A model that stops early is retired (its updates masked,
its best parameters final) while the rest of its group trains on, and a model whose loss turns
non-finite is retired the same way and reported with status 'diverged', without stopping its group. With
several devices the model axis of a group is split over them (the mesh's `runs` axis).

Output, in the sweep's workdir: `results.csv` (one row per finished run, appended when its group
finishes), `groups/<group>/` (metrics.jsonl, Orbax checkpoints of the whole group after every epoch). A
sweep restarted in the same workdir skips runs already in `results.csv` (matched by run id and a hash of
the run's full config: a changed config under an existing run id is refused) and resumes unfinished groups
from their last checkpoint; extending the grid (more learning rates, widths, ...) trains only the new runs.

Differences from Zoology: one process trains many models (Zoology launches one process per run); learning
rate is chosen on validation accuracy (Zoology reports its best test accuracy over learning rates, which
selects on test); results land in a CSV in the workdir, not in a wandb project.
"""

import csv
import dataclasses
import hashlib
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
from zoo_jax import tasks
from zoo_jax import trainer

SEQ_LEN_MARKER = "${seq_len}"
LENGTH_KEYS = ("seq_len", "num_kv_pairs", "train_examples", "eval_examples", "batch_size")
RESULT_COLUMNS = (
    "run_id", "group", "mixer", "d_model", "seq_len", "num_kv_pairs", "learning_rate", "seed",
    "validation_accuracy", "test_accuracy", "validation_loss", "test_loss", "validation_slices",
    "test_slices", "best_epoch", "epochs_run", "stopped_early", "status", "state_size", "num_params",
    "group_size", "train_seconds", "wall_seconds", "tokens_per_sec", "backend", "config_hash",
)


def sweep_defaults() -> dict[str, Any]:
  return dict(mixers={}, d_model=[], lengths=[], learning_rate=[], seed=[0], max_group_size=0)


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid: its id, its full single-run config, and the grid coordinates."""
  run_id: str
  group: str
  config: dict
  mixer: str
  d_model: int
  seq_len: int
  num_kv_pairs: int
  learning_rate: float
  seed: int

  @property
  def config_hash(self) -> str:
    return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- Grid


def _substitute(tree: Any, seq_len: int) -> Any:
  if isinstance(tree, dict):
    return {k: _substitute(v, seq_len) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_substitute(v, seq_len) for v in tree]
  return seq_len if tree == SEQ_LEN_MARKER else tree


def _check_list(values: Any, field: str, kind: type, positive: bool = True) -> list:
  if not isinstance(values, (list, tuple)) or not values:
    raise ValueError(f"{field} must be a non-empty list, got {values!r}")
  for v in values:
    ok = isinstance(v, kind) and not isinstance(v, bool) if kind is int else isinstance(v, (int, float))
    if not ok or (positive and not v > 0) or (not positive and v < 0):
      raise ValueError(f"{field} entries must be {'positive' if positive else 'non-negative'} "
                       f"{kind.__name__}s, got {v!r}")
  if len(set(values)) != len(values):
    raise ValueError(f"{field} has repeated entries: {list(values)}")
  return list(values)


def expand_grid(config: Any) -> list[Run]:
  """Every run of a sweep config, validated (a bad point fails here, naming it, before anything trains)."""
  base = json.loads(json.dumps(config_lib.as_dict(config)))
  sweep = base.pop("sweep", None)
  base.pop("runs", None)
  if not sweep:
    raise ValueError("sweep is missing from the config: a sweep config needs a `sweep` section "
                     f"with keys {sorted(sweep_defaults())}")
  for key in sweep:
    if key not in sweep_defaults():
      raise ValueError(f"sweep.{key} is not a sweep key; accepted: {sorted(sweep_defaults())}")
  sweep = {**sweep_defaults(), **sweep}
  if not isinstance(sweep["mixers"], dict) or not sweep["mixers"]:
    raise ValueError("sweep.mixers must map at least one run name to a partial run config")
  widths = _check_list(sweep["d_model"], "sweep.d_model", int)
  rates = _check_list(sweep["learning_rate"], "sweep.learning_rate", float)
  seeds = _check_list(sweep["seed"], "sweep.seed", int, positive=False)
  if not isinstance(sweep["max_group_size"], int) or sweep["max_group_size"] < 0:
    raise ValueError(f"sweep.max_group_size must be an integer >= 0, got {sweep['max_group_size']!r}")
  if not isinstance(sweep["lengths"], (list, tuple)) or not sweep["lengths"]:
    raise ValueError("sweep.lengths must list at least one {seq_len, num_kv_pairs, train_examples, "
                     "eval_examples} entry")
  lengths = []
  for i, entry in enumerate(sweep["lengths"]):
    entry = dict(entry)
    for key in entry:
      if key not in LENGTH_KEYS:
        raise ValueError(f"sweep.lengths[{i}].{key} is not a length key; accepted: {list(LENGTH_KEYS)}")
    for key in LENGTH_KEYS[:4]:
      if key not in entry:
        raise ValueError(f"sweep.lengths[{i}].{key} is missing")
    lengths.append(entry)

  runs = []
  for mixer_name, partial in sweep["mixers"].items():
    for length in lengths:
      seq_len, kv = length["seq_len"], length["num_kv_pairs"]
      overrides = _substitute(json.loads(json.dumps(config_lib.as_dict(partial))), seq_len)
      config_lib.check_keys(overrides, base, f"sweep.mixers.{mixer_name}.")
      cell = config_lib.deep_merge(base, overrides)
      cell["data"] = {**cell["data"],
                      "train_segments": [dict(seq_len=seq_len, num_kv_pairs=kv,
                                              num_examples=length["train_examples"])],
                      "validation_segments": [dict(seq_len=seq_len, num_kv_pairs=kv,
                                                   num_examples=length["eval_examples"])],
                      "test_segments": [dict(seq_len=seq_len, num_kv_pairs=kv,
                                             num_examples=length["eval_examples"])]}
      if length.get("batch_size"):
        cell["train"] = {**cell["train"], "batch_size": length["batch_size"]}
      for d_model in widths:
        group = f"{mixer_name}-d{d_model}-L{seq_len}-kv{kv}"
        for lr in rates:
          for seed in seeds:
            cfg = json.loads(json.dumps(cell))
            cfg["model"] = {**cfg["model"], "d_model": d_model}
            cfg["train"] = {**cfg["train"], "learning_rate": float(lr)}
            cfg["seed"] = seed
            run_id = f"{group}-lr{lr:.2e}-s{seed}"
            try:
              config_lib.validate(cfg)
            except ValueError as e:
              raise ValueError(f"sweep point {run_id}: {e}") from None
            full = config_lib.resolve(cfg)[0].to_dict()
            runs.append(Run(run_id, group, full, mixer_name, d_model, seq_len, kv, float(lr), seed))
  ids = [r.run_id for r in runs]
  if len(set(ids)) != len(ids):
    raise ValueError("sweep.mixers names collide after expansion; use distinct names")
  return runs


def _shape_key(run: Run) -> str:
  """The config without learning rate and seed: runs with equal keys can share a jitted step."""
  cfg = json.loads(json.dumps(run.config))
  cfg["train"].pop("learning_rate")
  cfg.pop("seed")
  return json.dumps(cfg, sort_keys=True)


def group_runs(runs: list[Run], max_group_size: int = 0) -> list[list[Run]]:
  """Runs grouped by shape (all but learning rate and seed), in grid order; split to max_group_size."""
  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(_shape_key(run), []).append(run)
  out = []
  for members in groups.values():
    size = max_group_size or len(members)
    out.extend(members[i:i + size] for i in range(0, len(members), size))
  return out


# ---------------------------------------------------------------------------------------------- Results


_INT_COLUMNS = frozenset({"d_model", "seq_len", "num_kv_pairs", "seed", "best_epoch", "epochs_run", "state_size",
                          "num_params", "group_size"})
_TEXT_COLUMNS = frozenset({"run_id", "group", "mixer", "status", "backend", "config_hash"})
_JSON_COLUMNS = frozenset({"validation_slices", "test_slices"})


def read_results(path: str) -> list[dict[str, Any]]:
  """Rows of a results table, typed (ints, floats, bools, slice dicts); [] when the file does not exist."""
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    for key, value in row.items():
      if key in _JSON_COLUMNS:
        row[key] = json.loads(value) if value else {}
      elif key == "stopped_early":
        row[key] = value == "True"
      elif value == "":  # a column the writer left empty (hand-made tables) stays empty
        continue
      elif key in _INT_COLUMNS:
        row[key] = int(value)
      elif key not in _TEXT_COLUMNS:
        row[key] = float(value)
  return rows


def append_results(path: str, rows: list[dict[str, Any]]) -> None:
  new = not os.path.exists(path)
  with open(path, "a", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
    if new:
      writer.writeheader()
    for row in rows:
      writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})


# ---------------------------------------------------------------------------------------------- Group


def members_of(runs: list[Run]) -> list[trainer.Member]:
  return [trainer.Member(r.run_id, r.seed, r.learning_rate, r.config["train"]["weight_decay"]) for r in runs]


def runs_mesh(num_models: int, devices=None) -> jax.sharding.Mesh:
  """A mesh whose `runs` axis spans the most devices that divide the group's model count."""
  devices = list(devices if devices is not None else jax.devices())
  n = max(d for d in range(1, len(devices) + 1) if num_models % d == 0)
  return sharding.make_mesh(devices=devices[:n], runs=n)


def train_group(runs: list[Run], group_dir: str, *, devices=None, label: str = "",
                _kill_after_steps: int | None = None) -> list[dict[str, Any]]:
  """Trains the runs of one group together (a population of the one core); returns one results row per
  run. Resumes from group_dir."""
  shape = {_shape_key(r) for r in runs}
  if len(shape) != 1:
    raise ValueError("train_group: runs differ in more than learning rate and seed")
  config, model_cfg = config_lib.resolve(runs[0].config)
  members = members_of(runs)
  mesh = runs_mesh(len(runs), devices)
  group_json = json.dumps([r.run_id + ":" + r.config_hash for r in runs], indent=1)
  lock = checkpoint_lib.open_workdir(group_dir, group_json)
  start_time = time.time()
  task = tasks.MQARTask(config, [m.seed for m in members])
  writer = trainer.MetricsWriter(group_dir)
  try:
    run = trainer.train(task, model_cfg=model_cfg, train_cfg=config.train, members=members, mesh=mesh,
                        checkpoint_dir=os.path.join(group_dir, "checkpoints"),
                        hooks=trainer.Hooks(write=writer.write, label=label, kill_after_steps=_kill_after_steps))
    test = task.evaluate(run.eval_step, run.state["best_params"], "test", run.shardings)
    val_best = task.evaluate(run.eval_step, run.state["best_params"], "validation", run.shardings)
  finally:
    writer.close()
    lock.release()
  progress = run.progress
  state_size = model_cfg.state_size()
  wall = time.time() - start_time
  rows = []
  for i, (r, m) in enumerate(zip(runs, progress["models"])):
    best = m["best"]
    trained = best is not None
    rows.append(dict(
        run_id=r.run_id, group=r.group, mixer=r.mixer, d_model=r.d_model, seq_len=r.seq_len,
        num_kv_pairs=r.num_kv_pairs, learning_rate=r.learning_rate, seed=r.seed,
        validation_accuracy=best["accuracy"] if trained else float("nan"),
        test_accuracy=test[i]["accuracy"] if trained else float("nan"),
        validation_loss=best["loss"] if trained else float("nan"),
        test_loss=test[i]["loss"] if trained else float("nan"),
        validation_slices=val_best[i]["slices"] if trained else {},
        test_slices=test[i]["slices"] if trained else {},
        best_epoch=best["epoch"] if trained else -1, epochs_run=len(m["history"]),
        stopped_early=m["status"] == "stopped", status="diverged" if m["status"] == "diverged" else "ok",
        state_size=state_size, num_params=run.num_params, group_size=len(runs),
        train_seconds=progress["train_seconds"], wall_seconds=wall,
        tokens_per_sec=progress["trained_steps"] * task.tokens_per_step / max(progress["train_seconds"], 1e-9),
        backend=jax.default_backend(), config_hash=r.config_hash))
  return rows


# ---------------------------------------------------------------------------------------------- Sweep


def run_sweep(config: Any, workdir: str, *, devices=None) -> list[dict[str, Any]]:
  """Trains every run of the sweep not yet in `<workdir>/results.csv`; returns all rows of the table."""
  runs = expand_grid(config)
  max_group_size = config_lib.as_dict(config)["sweep"].get("max_group_size", 0)
  os.makedirs(workdir, exist_ok=True)
  results_path = os.path.join(workdir, "results.csv")
  done = {row["run_id"]: row for row in read_results(results_path)}
  for run in runs:
    if run.run_id in done and done[run.run_id]["config_hash"] != run.config_hash:
      raise ValueError(f"{results_path} holds run {run.run_id} under another config; use a new workdir "
                       "or another run name")
  todo = [r for r in runs if r.run_id not in done]
  groups = group_runs(todo, max_group_size)
  print(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already in {results_path}, {len(todo)} to "
        f"train in {len(groups)} groups on {len(devices or jax.devices())} {jax.default_backend()} "
        "device(s)", flush=True)
  for g, members in enumerate(groups):
    name = members[0].group
    suffix = hashlib.sha256(",".join(r.run_id for r in members).encode()).hexdigest()[:8]
    label = f"[{g + 1}/{len(groups)} {name}] "
    print(f"{label}{len(members)} models: lr {sorted({r.learning_rate for r in members})} × seed "
          f"{sorted({r.seed for r in members})}", flush=True)
    rows = train_group(members, os.path.join(workdir, "groups", f"{name}-{suffix}"), devices=devices,
                       label=label)
    append_results(results_path, rows)
    for row in rows:
      print(f"{label}{row['run_id']}: validation {row['validation_accuracy']:.4f} test "
            f"{row['test_accuracy']:.4f} (best epoch {row['best_epoch']}, {row['status']})", flush=True)
  wanted = {r.run_id for r in runs}
  return [row for row in read_results(results_path) if row["run_id"] in wanted]


def best_over_learning_rates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One entry per (mixer, d_model, seq_len, num_kv_pairs): the learning rate with the best mean validation
  accuracy over seeds, and the test accuracy (mean, std over seeds) at that learning rate."""
  cells: dict[tuple, dict[float, list]] = {}
  for row in rows:
    key = (row["mixer"], int(row["d_model"]), int(row["seq_len"]), int(row["num_kv_pairs"]))
    cells.setdefault(key, {}).setdefault(float(row["learning_rate"]), []).append(row)
  out = []
  for (mixer, d_model, seq_len, kv), by_lr in sorted(cells.items()):
    def score(lr):
      vals = [r["validation_accuracy"] for r in by_lr[lr]]
      mean = float(np.mean(vals))
      return mean if math.isfinite(mean) else -1.0
    lr = max(sorted(by_lr), key=score)
    chosen = by_lr[lr]
    tests = np.asarray([r["test_accuracy"] for r in chosen], np.float64)
    out.append(dict(mixer=mixer, d_model=d_model, seq_len=seq_len, num_kv_pairs=kv, learning_rate=lr,
                    validation_accuracy=score(lr), test_accuracy=float(np.mean(tests)),
                    test_std=float(np.std(tests)) if len(tests) > 1 else 0.0, seeds=len(tests),
                    state_size=int(chosen[0]["state_size"]), num_params=int(chosen[0].get("num_params", 0))))
  return out
