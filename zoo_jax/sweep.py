r"""Sweeps: many MQAR runs, trained in groups of many models per jitted step, one results table.

A sweep config is a run config (`zoo_jax.config.defaults()`: the base) plus two sections:

    runs                 {run name: partial run config}, each deep-merged into the base (a `mixer` is
                         replaced whole), as `config.expand_runs` merges the runs of `configs/mqar.py`. The
                         grid is ordinary Python in the config file: loops over mixers × widths × lengths
                         that write each run's model, data segments and batch size into its partial (see
                         `zoo_jax/configs/figure2.py`, after Zoology's own configs, which are lists of runs).
    sweep.learning_rate  [1e-4, ...]   the population axes: every run is trained at every learning rate
    sweep.seed           [0, ...]      and seed, the models of a run together (below); tuples in a config
                                       file, so `--config.sweep.seed='[0,1,2]'` overrides them
    sweep.max_group_size 0 (no limit) or the most models one jitted step trains at once
    sweep.parallel_groups 1, or how many groups train at once on CPU, each in a thread (`run_sweep`)

A run name is `<mixer label>-<rest>`, e.g. `attention-d64-L64-kv4`: the results table's `mixer` column is
the name up to its first `-` (letters, digits and `_` between the dashes). Each run × learning rate × seed
is one model, `<run name>-lr<lr:.2e>-s<seed>`, whose full config is validated (`config.validate`) before
anything trains; its `d_model` and `(seq_len, num_kv_pairs)` (of the first training segment) are columns of
the table. A run may not set `seed` or `train.learning_rate`: the sweep sets them. Runs train in the
order of their names (a ConfigDict keeps its keys sorted).

The models of one run (its learning rates × seeds; `group_runs`: models whose configs agree in all but
learning rate and seed) form a *group*, trained together as one population of the training core
(`zoo_jax.trainer`): the same jitted step as a single run, vmapped over a leading model axis, each model
with its own parameters, optimizer state, data order (its seed) and learning rate (an injected optimizer
hyperparameter). Each model follows exactly the protocol of `zoo_jax.train.train_and_evaluate` (a single
run is a population of one): same initialisation, batches, schedule, per-epoch validation, selection on
validation, early stop above `train.early_stop_accuracy`, test evaluated once with the best parameters. A
model that stops early is retired (its updates masked, its best parameters final) while the rest of its
group trains on, and a model whose loss turns non-finite is retired the same way and reported with status
'diverged', without stopping its group. With several devices the model axis of a group is split over them
(the mesh's `runs` axis).

Output, in the sweep's workdir: `results.csv` (one row per finished model, appended when its group
finishes), `groups/<group>/` (metrics.jsonl, Orbax checkpoints of the whole group after every epoch). A
sweep restarted in the same workdir skips models already in `results.csv` (matched by run id and a hash of
the model's full config: a changed config under an existing run id is refused) and resumes unfinished
groups from their last checkpoint; extending the sweep (more runs, learning rates, seeds) trains only the
new models.

Differences from Zoology: one process trains many models (Zoology launches one process per run); learning
rate is chosen on validation accuracy (Zoology reports its best test accuracy over learning rates, which
selects on test); results land in a CSV in the workdir, not in a wandb project.

A run may train on a mixture of lengths (several training segments; its `seq_len` column is the first
segment's) and be tested on several (one test segment per length): its row's `test_slices` /
`validation_slices` hold the accuracy per length, and the figures and `best_over_learning_rates` place it
at each tested length (`per_length`).
"""

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np

from zoo_jax import checkpoint as checkpoint_lib
from zoo_jax import config as config_lib
from zoo_jax import sharding
from zoo_jax import tasks
from zoo_jax import trainer

POPULATION_KEYS = ("learning_rate", "seed", "max_group_size", "parallel_groups")
GRID_KEYS = ("mixers", "d_model", "lengths")  # the grid language a `sweep` section held before `runs`
RUN_NAME = re.compile(r"\w+(-\w+)*")
RESULT_COLUMNS = (
    "run_id", "group", "mixer", "d_model", "seq_len", "num_kv_pairs", "learning_rate", "seed",
    "validation_accuracy", "test_accuracy", "validation_loss", "test_loss", "validation_slices",
    "test_slices", "best_epoch", "epochs_run", "stopped_early", "status", "state_size", "num_params",
    "group_size", "train_seconds", "wall_seconds", "tokens_per_sec", "backend", "config_hash",
)


def sweep_defaults() -> dict[str, Any]:
  return dict(learning_rate=[], seed=[0], max_group_size=0, parallel_groups=1)


@dataclasses.dataclass(frozen=True)
class Run:
  """One model of a sweep: its id, its group (the run name), its full single-run config, and the
  coordinates the results table records."""
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


def population(config: Any) -> dict[str, Any]:
  """The checked `sweep` section of a sweep config: {learning_rate: [float], seed: [int], max_group_size}."""
  sweep = config_lib.as_dict(config).get("sweep")
  if not sweep:
    raise ValueError("sweep is missing from the config: a sweep config is a run config with `runs` ({run name: "
                     f"partial run config}}) and a `sweep` section with keys {list(POPULATION_KEYS)}")
  if not isinstance(sweep, dict):
    raise ValueError(f"sweep must be a section with keys {list(POPULATION_KEYS)}, got {sweep!r}")
  for key in sweep:
    if key in GRID_KEYS:
      raise ValueError(f"sweep.{key} no longer exists: the grid is now Python in the config's `runs` ({{run name: "
                       "partial run config}, built by loops in the config file as zoo_jax/configs/figure2.py "
                       f"does); `sweep` holds only {list(POPULATION_KEYS)}")
    if key not in POPULATION_KEYS:
      raise ValueError(f"sweep.{key} is not a sweep key; accepted: {list(POPULATION_KEYS)}")
  sweep = {**sweep_defaults(), **sweep}
  rates = [float(lr) for lr in _check_list(sweep["learning_rate"], "sweep.learning_rate", float)]
  seeds = _check_list(sweep["seed"], "sweep.seed", int, positive=False)
  if not isinstance(sweep["max_group_size"], int) or sweep["max_group_size"] < 0:
    raise ValueError(f"sweep.max_group_size must be an integer >= 0, got {sweep['max_group_size']!r}")
  parallel = sweep["parallel_groups"]
  if not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= 64:
    raise ValueError(f"sweep.parallel_groups must be an integer in [1, 64], got {parallel!r}")
  checks = ([(f"learning_rate[{i}]", {"train": {"learning_rate": lr}}) for i, lr in enumerate(rates)] +
            [(f"seed[{i}]", {"seed": seed}) for i, seed in enumerate(seeds)])
  for field, partial in checks:  # the schema's ranges, named by the axis rather than by the first run
    try:
      config_lib.validate(partial)
    except ValueError as e:
      raise ValueError(f"sweep.{field}: {e}") from None
  ids = [f"lr{lr:.2e}" for lr in rates]
  if len(set(ids)) != len(ids):
    raise ValueError(f"sweep.learning_rate entries {rates} collide in run ids (written to 3 significant "
                     f"digits: {ids})")
  return dict(learning_rate=rates, seed=seeds, max_group_size=sweep["max_group_size"], parallel_groups=parallel)


def expand_grid(config: Any) -> list[Run]:
  """Every model of a sweep config (each run × learning rate × seed), validated: a bad run fails here, in
  one line naming it, before anything trains."""
  axes = population(config)
  base = config_lib.as_dict(config)
  base.pop("sweep")
  runs = base.pop("runs", None)
  if not runs or not isinstance(runs, dict):
    raise ValueError("runs is missing from the sweep config: a sweep config lists its runs in `runs`, {run name: "
                     f"partial run config}} (got {runs!r})")
  if base.get("task", "mqar") != "mqar":
    raise ValueError(f"task must be 'mqar' in a sweep (a sweep trains MQAR runs), got {base['task']!r}")
  allowed = set(base) | set(config_lib.MQARRun.model_fields)
  out = []
  for name, partial in runs.items():
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
      raise ValueError(f"runs.{name}: a sweep run name is '<mixer label>-<rest>' (letters, digits and _ "
                       "between dashes), e.g. attention-d64-L64-kv4")
    if not isinstance(partial, dict):
      raise ValueError(f"runs.{name} must be a partial run config (a mapping), got {partial!r}")
    config_lib.check_keys(partial, allowed, f"runs.{name}.")
    train = partial.get("train")
    for key, axis, present in (("seed", "seed", "seed" in partial),
                               ("train.learning_rate", "learning_rate",
                                isinstance(train, dict) and "learning_rate" in train)):
      if present:
        raise ValueError(f"runs.{name}.{key}: a sweep run may not set it; sweep.{axis} sets it for every run")
    cell = config_lib.deep_merge(base, partial)
    for lr in axes["learning_rate"]:
      for seed in axes["seed"]:
        cfg = config_lib.deep_merge(cell, {"seed": seed, "train": {"learning_rate": lr}})
        try:
          full = config_lib.resolve(cfg)[0].to_dict()
        except ValueError as e:
          raise ValueError(f"sweep run {name}: {e}") from None
        segment = full["data"]["train_segments"][0]
        out.append(Run(f"{name}-lr{lr:.2e}-s{seed}", name, full, name.split("-", 1)[0], full["model"]["d_model"],
                       segment["seq_len"], segment["num_kv_pairs"], lr, seed))
  return out


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
  # Each model's full config, for `checkpoint.load_for_inference(group_dir, member=...)`.
  checkpoint_lib.write_text(os.path.join(group_dir, checkpoint_lib.RUNS_FILE), json.dumps(
      [dict(run_id=r.run_id, config=r.config) for r in runs], indent=1))
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
  """Trains every run of the sweep not yet in `<workdir>/results.csv`; returns all rows of the table.

  With `sweep.parallel_groups` = n > 1 on CPU (and no `devices` given), n groups train at once, each in a
  thread of this process (a jitted step releases the GIL, and a CPU step of these small models keeps about
  one core busy; `experiments/mqar.py --parallel_runs` trains runs the same way), the widest models first;
  each group's rows are appended as it finishes. On accelerators groups train one after another."""
  runs = expand_grid(config)
  axes = population(config)
  os.makedirs(workdir, exist_ok=True)
  results_path = os.path.join(workdir, "results.csv")
  done = {row["run_id"]: row for row in read_results(results_path)}
  for run in runs:
    if run.run_id in done and done[run.run_id]["config_hash"] != run.config_hash:
      raise ValueError(f"{results_path} holds run {run.run_id} under another config; use a new workdir "
                       "or another run name")
  todo = [r for r in runs if r.run_id not in done]
  groups = group_runs(todo, axes["max_group_size"])
  parallel = min(axes["parallel_groups"], len(groups))
  if devices is not None or jax.default_backend() != "cpu":
    parallel = 1
  if parallel > 1:  # longest first (widest, then longest sequences): the last group to start is a short one
    groups.sort(key=lambda members: (-members[0].d_model, -config_lib.max_seq_len(members[0].config["data"])))
  print(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already in {results_path}, {len(todo)} to "
        f"train in {len(groups)} groups on {len(devices or jax.devices())} {jax.default_backend()} "
        f"device(s){f', {parallel} groups at a time (one thread each)' if parallel > 1 else ''}", flush=True)
  jobs = []
  for g, members in enumerate(groups):
    name = members[0].group
    suffix = hashlib.sha256(",".join(r.run_id for r in members).encode()).hexdigest()[:8]
    label = f"[{g + 1}/{len(groups)} {name}] "
    jobs.append((members, os.path.join(workdir, "groups", f"{name}-{suffix}"), label))

  def record(label: str, rows: list[dict[str, Any]]) -> None:
    append_results(results_path, rows)
    for row in rows:
      print(f"{label}{row['run_id']}: validation {row['validation_accuracy']:.4f} test "
            f"{row['test_accuracy']:.4f} (best epoch {row['best_epoch']}, {row['status']})", flush=True)

  def announce(members: list[Run], label: str) -> None:
    print(f"{label}{len(members)} models: lr {sorted({r.learning_rate for r in members})} × seed "
          f"{sorted({r.seed for r in members})}", flush=True)

  if parallel > 1:
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
      futures = {}
      for members, group_dir, label in jobs:
        announce(members, label)
        futures[pool.submit(train_group, members, group_dir, label=label)] = label
      for future in concurrent.futures.as_completed(futures):
        record(futures[future], future.result())
  else:
    for members, group_dir, label in jobs:
      announce(members, label)
      record(label, train_group(members, group_dir, devices=devices, label=label))
  wanted = {r.run_id for r in runs}
  return [row for row in read_results(results_path) if row["run_id"] in wanted]


PASS_ACCURACY = 0.99  # a seed "passes" a point at this test accuracy (the paper's bar for solving MQAR)
_SLICE = re.compile(r"L(\d+)_kv(\d+)")


def per_length(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Rows with one test length each. A row whose `test_slices` hold several lengths (a model trained and
  tested on a mixture of lengths) becomes one copy per slice, whose seq_len, num_kv_pairs, test_accuracy
  and validation_accuracy are that slice's (the validation slice of the same name; the row's overall
  validation accuracy if validation has no such slice); other columns (losses, state_size at the model's
  longest length) stay the run's. Rows of one slice or none (hand-made tables) are kept as they are."""
  out = []
  for row in rows:
    slices = row.get("test_slices") or {}
    if len(slices) <= 1:
      out.append(row)
      continue
    validation = row.get("validation_slices") or {}
    for key, accuracy in slices.items():
      match = _SLICE.fullmatch(key)
      if not match:
        raise ValueError(f"results row {row.get('run_id')}: test slice {key!r} is not 'L<seq_len>_kv<kv pairs>'")
      out.append({**row, "seq_len": int(match[1]), "num_kv_pairs": int(match[2]), "test_accuracy": accuracy,
                  "validation_accuracy": validation.get(key, row["validation_accuracy"])})
  return out


def best_over_learning_rates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One entry per (mixer, d_model, seq_len, num_kv_pairs), over the rows' test lengths (`per_length`: a
  run trained on a mixture of lengths counts at each length it was tested on): the learning rate with the
  best mean validation accuracy over seeds at that length (Zoology's protocol, but on validation, not
  test), and the test accuracy at that learning rate: mean, std over seeds, and `passing`, the number of
  seeds with test accuracy >= PASS_ACCURACY."""
  cells: dict[tuple, dict[float, list]] = {}
  for row in per_length(rows):
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
                    passing=int(np.sum(tests >= PASS_ACCURACY)),
                    state_size=int(chosen[0]["state_size"]), num_params=int(chosen[0].get("num_params", 0))))
  return out
