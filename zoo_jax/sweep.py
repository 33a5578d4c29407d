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

Runs whose configs agree in everything but learning rate and seed form a *group*, trained together: one
jitted step is `jax.vmap` of the single-run step over a leading model axis, each model with its own
parameters, optimizer state, data order (its seed) and learning rate (injected per model: the optimizer
runs with a unit peak learning rate and each model's update is scaled by its own, which equals a separate
AdamW for the schedules here, all linear in the peak value). Each model follows exactly the protocol of
`zoo_jax.train.train_and_evaluate` (same initialisation, batches, schedule, per-epoch validation, selection
on validation, early stop above `train.early_stop_accuracy`, test evaluated once with the best parameters):
a model that stops early is retired (its best parameters are final; it is no longer evaluated) while
the rest of its group trains on, and a model whose loss turns non-finite is retired the same way and
reported with status 'diverged', without stopping its group. With several devices
the model axis of a group is split over them (`runs` mesh axis).

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

from flax import nnx
import jax
from jax.sharding import AxisType, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from zoo_jax import config as config_lib
from zoo_jax import sharding
from zoo_jax import train
from zoo_jax.data import mqar

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
  base = json.loads(json.dumps(config_lib._as_dict(config)))  # pylint: disable=protected-access
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
      overrides = _substitute(json.loads(json.dumps(config_lib._as_dict(partial))), seq_len)  # pylint: disable=protected-access
      config_lib._check_keys(overrides, base, f"sweep.mixers.{mixer_name}.")  # pylint: disable=protected-access
      cell = config_lib._deep_merge(base, overrides)  # pylint: disable=protected-access
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


# ---------------------------------------------------------------------------------------------- Steps


def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def make_group_steps(graphdef, tx: optax.GradientTransformation, schedule, k: int, model_sh, rep):
  """(train_step, eval_step, keep_best): the single-run steps of `zoo_jax.train`, vmapped over models.

  train_step(params_m, opt_m, step, lr_m, batch_m) steps every model; the optimizer `tx` has a unit peak
  learning rate and each model's update is scaled by its own lr_m. Models that stopped (early stop,
  divergence) keep stepping with the rest (masking them would cost a select over every parameter and
  moment each step); nothing reads them again, since `keep_best` only takes improving, active models.
  """

  def one_step(params, opt_state, step, lr, batch):

    (_, m), grads = jax.value_and_grad(lambda p: train.loss_and_metrics(graphdef, p, batch, k),
                                       has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates))
    return params, opt_state, train.step_metrics(m, grads, lr * schedule(step))

  def train_step(params_m, opt_m, step, lr_m, batch_m):
    params_m, opt_m, metrics = jax.vmap(one_step, in_axes=(0, 0, None, 0, 0))(params_m, opt_m, step, lr_m,
                                                                              batch_m)
    return params_m, opt_m, step + 1, metrics

  def eval_step(params_m, batch_m):
    return jax.vmap(lambda p, b: train.batch_metrics(nnx.merge(graphdef, p), b, k))(params_m, batch_m)

  def keep_best(best_m, params_m, improved_m):
    return jax.tree.map(lambda b, p: jnp.where(improved_m.reshape((-1,) + (1,) * (p.ndim - 1)), p, b),
                        best_m, params_m)

  train_jit = jax.jit(train_step, in_shardings=(model_sh, model_sh, rep, model_sh, model_sh),
                      out_shardings=(model_sh, model_sh, rep, model_sh), donate_argnums=(0, 1))
  eval_jit = jax.jit(eval_step, in_shardings=(model_sh, model_sh), out_shardings=model_sh)
  best_jit = jax.jit(keep_best, in_shardings=(model_sh, model_sh, model_sh), out_shardings=model_sh,
                     donate_argnums=(0,))
  return train_jit, eval_jit, best_jit


@dataclasses.dataclass
class Group:
  """A group's models on its `runs` mesh: stacked parameters and optimizer states, and its jitted steps."""
  params: Any
  opt_state: Any
  train_step: Any
  eval_step: Any
  keep_best: Any
  model_sh: jax.sharding.Sharding  # leading model axis over the mesh's `runs` axis
  rep: jax.sharding.Sharding

  def put(self, tree: Any) -> Any:
    return jax.device_put(tree, self.model_sh)


def init_group(model_cfg, train_cfg: Any, seeds: list[int], total_steps: int, k: int,
               mesh: jax.sharding.Mesh) -> Group:
  """One model per seed, each initialised exactly as `train.init_model` does for a single run, stacked; the
  optimizer of `train.make_optimizer` with a unit peak learning rate (each model scales its own update)."""
  model_sh = sharding.named(mesh, P("runs"))
  rep = sharding.replicated(mesh)
  one_mesh = sharding.make_mesh(devices=list(mesh.devices.flat)[:1])
  inits = [train.init_model(model_cfg, one_mesh, seed) for seed in seeds]
  graphdef = inits[0][0]
  params = jax.device_put(_stack([p for _, p, _ in inits]), model_sh)
  unit_train = ml_collections.ConfigDict({**train_cfg.to_dict(), "learning_rate": 1.0})
  tx, schedule = train.make_optimizer(unit_train, total_steps)
  opt_state = jax.jit(jax.vmap(tx.init), out_shardings=model_sh)(params)
  return Group(params, opt_state, *make_group_steps(graphdef, tx, schedule, k, model_sh, rep), model_sh, rep)


def _stacked_batches(datasets: list[mqar.MQARDataset], batch_size: int, seeds: list[int], epoch: int,
                     start_step: int = 0, shuffle: bool = True, drop_remainder: bool = True):
  iterators = [mqar.epoch_batches(ds, batch_size, seed=s, epoch=epoch, start_step=start_step,
                                  shuffle=shuffle, drop_remainder=drop_remainder)
               for ds, s in zip(datasets, seeds)]
  for batches in zip(*iterators):
    yield {key: np.stack([b[key] for b in batches]) for key in ("inputs", "labels", "weight")}


def evaluate_group(eval_step, params_m, datasets: list[mqar.MQARDataset], batch_size: int,
                   put) -> list[dict[str, Any]]:
  """`zoo_jax.train.evaluate` for every model of a group, each on its own dataset (equal sizes)."""
  n = len(datasets[0])
  loss_sum = np.zeros(len(datasets))
  tokens = np.zeros(len(datasets))
  acc_parts, weight_parts = [], []
  for batch in _stacked_batches(datasets, batch_size, [0] * len(datasets), 0, shuffle=False,
                                drop_remainder=False):
    m = jax.device_get(eval_step(params_m, put(batch)))
    loss_sum += np.asarray(m["loss_sum"], np.float64)
    tokens += np.asarray(m["tokens"], np.float64)
    acc_parts.append(np.asarray(m["acc_b"]))
    weight_parts.append(np.asarray(m["weight_b"]))
  acc_mn = np.concatenate(acc_parts, axis=1)
  weight_mn = np.concatenate(weight_parts, axis=1)
  out = []
  for i, ds in enumerate(datasets):
    acc_n = acc_mn[i][weight_mn[i] > 0][:n]
    out.append(dict(loss=float(loss_sum[i] / max(tokens[i], 1.0)), accuracy=float(acc_n.mean()),
                    slices=train.slice_accuracies(acc_n, ds)))
  return out


def _runs_mesh(num_models: int, devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh ('runs',) over the most devices that divide the group's model count."""
  devices = list(devices if devices is not None else jax.devices())
  n = max(d for d in range(1, len(devices) + 1) if num_models % d == 0)
  return jax.make_mesh((n,), ("runs",), axis_types=(AxisType.Auto,), devices=devices[:n])


# ---------------------------------------------------------------------------------------------- Group


def train_group(runs: list[Run], group_dir: str, *, devices=None, label: str = "",
                _kill_after_steps: int | None = None) -> list[dict[str, Any]]:
  """Trains the runs of one group together; returns one results row per run. Resumes from group_dir."""
  shape = {_shape_key(r) for r in runs}
  if len(shape) != 1:
    raise ValueError("train_group: runs differ in more than learning rate and seed")
  config, model_cfg = config_lib.resolve(runs[0].config)
  num_models = len(runs)
  seeds = [r.seed for r in runs]
  lrs = np.asarray([r.learning_rate for r in runs], np.float32)
  mesh = _runs_mesh(num_models, devices)
  os.makedirs(group_dir, exist_ok=True)
  start_time = time.time()

  # Data, once per seed (runs that differ only in learning rate share it).
  by_seed = {seed: {split: train.build_split(config, split, seed) for split in ("train", "validation", "test")}
             for seed in sorted(set(seeds))}
  split_sets = {split: [by_seed[s][split] for s in seeds] for split in ("train", "validation", "test")}
  train_ds0 = split_sets["train"][0]
  if len(train_ds0) < config.train.batch_size:
    raise ValueError(f"train.batch_size ({config.train.batch_size}) exceeds the training examples "
                     f"({len(train_ds0)})")
  k = max(ds.max_labels_per_example for sets in split_sets.values() for ds in sets)
  steps_per_epoch = mqar.steps_per_epoch(len(train_ds0), config.train.batch_size)
  total_steps = steps_per_epoch * config.train.epochs
  tokens_per_step = config.train.batch_size * train_ds0.inputs.shape[1]

  group = init_group(model_cfg, config.train, seeds, total_steps, k, mesh)
  params, opt_state, put = group.params, group.opt_state, group.put
  train_step, eval_step, keep_best = group.train_step, group.eval_step, group.keep_best
  step = jax.device_put(jnp.zeros((), jnp.int32), group.rep)
  n_params = train.count_params(jax.tree.map(lambda x: x[0], params))
  state_size = model_cfg.state_size()

  ckpt_dir = os.path.abspath(os.path.join(group_dir, "checkpoints"))
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=2, enable_async_checkpointing=True))
  progress = dict(
      run_ids=[r.run_id for r in runs], epoch=0, train_seconds=0.0, trained_steps=0,
      models=[dict(best_accuracy=-1.0, best_epoch=-1, stopped_early=False, status="ok", history=[])
              for _ in runs])
  best_params = jax.tree.map(jnp.copy, params)
  if manager.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            dict(params=params, opt_state=opt_state, best_params=params, step=step))
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
    if restored.progress["run_ids"] != progress["run_ids"]:
      raise ValueError(f"{group_dir} holds a checkpoint of other runs ({restored.progress['run_ids']}); "
                       "use a new workdir")
    params, opt_state, best_params, step = (restored.state[k_] for k_ in
                                            ("params", "opt_state", "best_params", "step"))
    progress = restored.progress
    print(f"{label}resumed at epoch {progress['epoch']}", flush=True)
  writer = train._MetricsWriter(group_dir)  # pylint: disable=protected-access
  models = progress["models"]

  def active_mask() -> np.ndarray:
    return np.asarray([not m["stopped_early"] and m["status"] == "ok" for m in models])

  def save(step_value: int) -> None:
    manager.save(step_value, args=ocp.args.Composite(
        state=ocp.args.StandardSave(dict(params=params, opt_state=opt_state, best_params=best_params,
                                         step=step)),
        progress=ocp.args.JsonSave(progress)))

  lrs_dev = put(lrs)
  steps_this_run = 0
  try:
    while progress["epoch"] < config.train.epochs and active_mask().any():
      epoch = progress["epoch"]
      first = int(step) - epoch * steps_per_epoch
      active = active_mask()
      window_start, window = time.time(), []
      for batch in _stacked_batches(split_sets["train"], config.train.batch_size, seeds, epoch, first):
        params, opt_state, step, metrics = train_step(params, opt_state, step, lrs_dev, put(batch))
        window.append(metrics)
        steps_this_run += 1
        if _kill_after_steps is not None and steps_this_run >= _kill_after_steps:
          manager.wait_until_finished()
          raise train._SimulatedKill(f"killed after {steps_this_run} steps")  # pylint: disable=protected-access
      jax.block_until_ready(params)
      elapsed = time.time() - window_start
      progress["train_seconds"] += elapsed
      progress["trained_steps"] += len(window)
      losses = np.stack([np.asarray(m["loss"]) for m in jax.device_get(window)])  # (steps, models)
      for i, m in enumerate(models):
        if active[i] and not np.isfinite(losses[:, i]).all():
          m["status"] = "diverged"
          print(f"{label}{runs[i].run_id}: non-finite loss in epoch {epoch + 1}; retired, reported with its "
                "best validation epoch so far", flush=True)

      # Validation for every model; keep each one's best parameters (selection never looks at test).
      val = evaluate_group(eval_step, params, split_sets["validation"], config.train.eval_batch_size, put)
      improved = np.zeros(num_models, bool)
      for i, (m, v) in enumerate(zip(models, val)):
        if not active[i] or m["status"] != "ok":
          continue
        m["history"].append(dict(epoch=epoch + 1, accuracy=v["accuracy"], loss=v["loss"]))
        if v["accuracy"] > m["best_accuracy"]:
          m["best_accuracy"], m["best_epoch"] = v["accuracy"], epoch + 1
          improved[i] = True
        if v["accuracy"] > config.train.early_stop_accuracy:
          m["stopped_early"] = True
        writer.write(int(step), {"validation/loss": v["loss"], "validation/accuracy": v["accuracy"]},
                     run_id=runs[i].run_id, epoch=epoch + 1)
      best_params = keep_best(best_params, params, put(improved))
      progress["epoch"] = epoch + 1
      tok_s = len(window) * tokens_per_step * int(active.sum()) / max(elapsed, 1e-9)
      accs = " ".join(f"{v['accuracy']:.3f}" if a else "  -  " for v, a in zip(val, active))
      print(f"{label}epoch {epoch + 1}/{config.train.epochs}: validation accuracy [{accs}] "
            f"({int(active.sum())} active, {tok_s:,.0f} tok/s over the group)", flush=True)
      save(int(step))
    manager.wait_until_finished()
  finally:
    writer.close()

  test = evaluate_group(eval_step, best_params, split_sets["test"], config.train.eval_batch_size, put)
  val_best = evaluate_group(eval_step, best_params, split_sets["validation"], config.train.eval_batch_size,
                            put)
  wall = time.time() - start_time
  rows = []
  for i, (run, m) in enumerate(zip(runs, models)):
    best = next((h for h in m["history"] if h["epoch"] == m["best_epoch"]), None)
    trained = best is not None
    rows.append(dict(
        run_id=run.run_id, group=run.group, mixer=run.mixer, d_model=run.d_model, seq_len=run.seq_len,
        num_kv_pairs=run.num_kv_pairs, learning_rate=run.learning_rate, seed=run.seed,
        validation_accuracy=best["accuracy"] if trained else float("nan"),
        test_accuracy=test[i]["accuracy"] if trained else float("nan"),
        validation_loss=best["loss"] if trained else float("nan"),
        test_loss=test[i]["loss"] if trained else float("nan"),
        validation_slices=val_best[i]["slices"] if trained else {},
        test_slices=test[i]["slices"] if trained else {},
        best_epoch=m["best_epoch"], epochs_run=len(m["history"]), stopped_early=m["stopped_early"],
        status=m["status"], state_size=state_size, num_params=n_params, group_size=num_models,
        train_seconds=progress["train_seconds"], wall_seconds=wall,
        tokens_per_sec=progress["trained_steps"] * tokens_per_step / max(progress["train_seconds"], 1e-9),
        backend=jax.default_backend(), config_hash=run.config_hash))
  return rows


# ---------------------------------------------------------------------------------------------- Sweep


def run_sweep(config: Any, workdir: str, *, devices=None) -> list[dict[str, Any]]:
  """Trains every run of the sweep not yet in `<workdir>/results.csv`; returns all rows of the table."""
  runs = expand_grid(config)
  max_group_size = config_lib._as_dict(config)["sweep"].get("max_group_size", 0)  # pylint: disable=protected-access
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
