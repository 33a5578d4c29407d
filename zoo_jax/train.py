"""Training and evaluation on MQAR: `train_and_evaluate(config, workdir)`, callable from a binary or a notebook.

Dimension legend: b batch, l sequence length, k labelled positions per example, v vocabulary.

One jitted train step, its parameter, optimizer-state, batch and metric shardings declared over a
(data, model) mesh, runs unchanged on one CPU, simulated CPU devices, a GPU or a TPU. The loss is token-mean
cross-entropy over labelled positions, and the LM head is applied only there (`LanguageModel.logits_at`).
Accuracy is Zoology's: per example, the fraction of labelled positions whose argmax is right, averaged over
examples; also per (seq_len, num_kv_pairs) slice.

Differences from Zoology's trainer (`zoology/train.py`):
- model selection and early stopping use a validation split; the test split is evaluated once, at the end,
  with the parameters of the best validation epoch (Zoology early-stops and reports on its test set);
- the cosine schedule decays per step over the whole run, after an optional warmup (Zoology steps a
  `CosineAnnealingLR` once per epoch);
- the LM head runs at labelled positions only (Zoology computes logits at every position);
- a non-finite loss stops the run and keeps the last good checkpoint; reruns resume from the workdir.

Workdir: config.json, metrics.jsonl, TensorBoard events (tb/), checkpoints/ (Orbax, async, last few kept),
summary.json at the end.
"""

import dataclasses
import json
import math
import os
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from zoo_jax import config as config_lib
from zoo_jax import sharding
from zoo_jax.data import mqar
from zoo_jax.mixers.registry import AUX_LOSS
from zoo_jax.model import LanguageModel, ModelConfig


class NonFiniteLossError(RuntimeError):
  pass


class _SimulatedKill(RuntimeError):
  """Raised by the `_kill_after_steps` test hook to stop a run abruptly, as a crash would."""


# ---------------------------------------------------------------------------------------------- Model


def build_split(config: Any, split: str, seed: int | None = None) -> mqar.MQARDataset:
  """The MQAR split ('train', 'validation', 'test') a resolved run config describes, drawn with the run's
  seed unless `seed` is given (sweeps draw one dataset per seed)."""
  data = config.data
  return mqar.build_dataset(data[f"{split}_segments"], split=split, vocab_size=data.vocab_size,
                            seed=config.seed if seed is None else seed, power_a=data.power_a,
                            random_non_queries=data.random_non_queries)


def count_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def init_model(model_cfg: ModelConfig, mesh: jax.sharding.Mesh, seed: int):
  """Returns (graphdef, params, param_shardings); params are created directly with their shardings."""
  abstract = nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(seed)))
  graphdef, abstract_state = nnx.split(abstract, nnx.Param)
  specs = nnx.get_partition_spec(abstract_state).to_pure_dict()
  param_sh = sharding.param_shardings(specs, abstract_state.to_pure_dict(), mesh)

  def init():
    return nnx.split(LanguageModel(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param)[1].to_pure_dict()

  params = jax.jit(init, out_shardings=param_sh)()
  return graphdef, params, param_sh


def make_optimizer(train_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
  lr = train_cfg.learning_rate
  warmup = min(train_cfg.warmup_steps, total_steps)
  if train_cfg.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]) if warmup \
        else optax.constant_schedule(lr)
  # Zoology's torch AdamW decays every parameter (no mask), betas (0.9, 0.999), eps 1e-8.
  parts = [optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train_cfg.weight_decay)]
  if train_cfg.grad_clip_norm > 0:
    parts.insert(0, optax.clip_by_global_norm(train_cfg.grad_clip_norm))
  return optax.chain(*parts), schedule


def optimizer_shardings(tx: optax.GradientTransformation, params: Any, param_sh: Any, mesh) -> Any:
  """Moment trees take their parameter's sharding; counters and other scalars are replicated."""
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(tx, lambda _, sh: sh, abstract, param_sh,
                               transform_non_params=lambda _: sharding.replicated(mesh))


# ---------------------------------------------------------------------------------------------- Steps


def labelled_positions(labels_bl: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The first k labelled positions of each row (stable order), their labels and a validity mask."""
  order_bl = jnp.argsort(labels_bl == mqar.IGNORE_INDEX, axis=1, stable=True)
  positions_bk = order_bl[:, :k]
  labels_bk = jnp.take_along_axis(labels_bl, positions_bk, axis=1)
  return positions_bk, labels_bk, labels_bk != mqar.IGNORE_INDEX


def batch_metrics(model: LanguageModel, batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """Sums over the batch: CE over labelled tokens, token count, per-example accuracy, example count."""
  positions_bk, labels_bk, mask_bk = labelled_positions(batch["labels"], k)
  logits_bkv = model.logits_at(batch["inputs"], positions_bk)
  ce_bk = optax.softmax_cross_entropy_with_integer_labels(logits_bkv, jnp.where(mask_bk, labels_bk, 0))
  correct_bk = (jnp.argmax(logits_bkv, axis=-1) == labels_bk) & mask_bk
  n_labels_b = mask_bk.sum(axis=1)
  weight_b = batch.get("weight", jnp.ones(labels_bk.shape[0], jnp.float32)) * (n_labels_b > 0)
  acc_b = correct_bk.sum(axis=1) / jnp.maximum(n_labels_b, 1)
  return dict(
      loss_sum=(ce_bk * mask_bk).sum(),
      tokens=mask_bk.sum().astype(jnp.float32),
      acc_sum=(acc_b * weight_b).sum(),
      examples=weight_b.sum(),
      acc_b=acc_b,
      weight_b=weight_b,
  )


def auxiliary_loss(model: LanguageModel) -> jax.Array | None:
  """The sum of the auxiliary losses the model's layers sowed in the call just made (e.g. sparse_attention's
  sparsity loss, `nnx.Intermediate` named 'aux_loss'), popped from the model; None if no layer sowed one."""
  sown = nnx.pop(model, nnx.Intermediate)
  values = [v for path, v in nnx.to_flat_state(sown) if path[-1] == AUX_LOSS]
  leaves = [leaf for v in values for leaf in jax.tree.leaves(v)]
  return sum(jnp.asarray(leaf, jnp.float32) for leaf in leaves) if leaves else None


def loss_and_metrics(graphdef, params, batch: dict[str, jax.Array], k: int):
  """(loss to minimise, metrics): the mean cross-entropy over labelled tokens plus any auxiliary loss the
  layers sowed; `metrics` holds `batch_metrics`, the task loss `task_loss` and, if sown, `aux_loss`."""
  model = nnx.merge(graphdef, params)
  m = batch_metrics(model, batch, k)
  task_loss = m["loss_sum"] / jnp.maximum(m["tokens"], 1.0)
  aux = auxiliary_loss(model)
  m = dict(m, task_loss=task_loss)
  if aux is None:
    return task_loss, m
  return task_loss + aux, dict(m, aux_loss=aux)


def step_metrics(m: dict[str, jax.Array], grads, learning_rate: jax.Array) -> dict[str, jax.Array]:
  """What a train step reports: `loss` is the task loss (comparable across models); a model with an
  auxiliary loss also reports `aux_loss`, and its gradients are those of their sum."""
  metrics = dict(loss=m["task_loss"], accuracy=m["acc_sum"] / jnp.maximum(m["examples"], 1.0),
                 learning_rate=jnp.asarray(learning_rate, jnp.float32), grad_norm=optax.global_norm(grads))
  if "aux_loss" in m:
    metrics["aux_loss"] = m["aux_loss"]
  return metrics


def aux_text(scalars: dict[str, float]) -> str:
  """' aux 0.0123' for a progress line when the model has an auxiliary loss, else ''."""
  return f" aux {scalars['aux_loss']:.4f}" if "aux_loss" in scalars else ""


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, k: int, param_sh, opt_sh,
                    mesh: jax.sharding.Mesh):

  def train_step(params, opt_state, step, batch):
    (_, m), grads = jax.value_and_grad(lambda p: loss_and_metrics(graphdef, p, batch, k), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, step + 1, step_metrics(m, grads, schedule(step))

  rep = sharding.replicated(mesh)
  data = sharding.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(param_sh, opt_sh, rep, data),
                 out_shardings=(param_sh, opt_sh, rep, rep), donate_argnums=(0, 1))


def make_eval_step(graphdef, k: int, param_sh, mesh: jax.sharding.Mesh):

  def eval_step(params, batch):
    m = batch_metrics(nnx.merge(graphdef, params), batch, k)
    return m

  rep = sharding.replicated(mesh)
  data = sharding.batch_sharding(mesh)
  out_sh = dict(loss_sum=rep, tokens=rep, acc_sum=rep, examples=rep, acc_b=data, weight_b=data)
  return jax.jit(eval_step, in_shardings=(param_sh, data), out_shardings=out_sh)


def evaluate(eval_step, params, dataset: mqar.MQARDataset, batch_size: int, mesh) -> dict[str, Any]:
  """Loss, accuracy (mean over examples of per-example accuracy) and per-slice accuracy."""
  loss_sum = tokens = 0.0
  acc_parts, weight_parts = [], []
  for batch in mqar.epoch_batches(dataset, batch_size, seed=0, epoch=0, shuffle=False, drop_remainder=False):
    m = jax.device_get(eval_step(params, sharding.put_batch(batch, mesh)))
    loss_sum += float(m["loss_sum"])
    tokens += float(m["tokens"])
    acc_parts.append(np.asarray(m["acc_b"]))
    weight_parts.append(np.asarray(m["weight_b"]))
  acc_n = np.concatenate(acc_parts)[np.concatenate(weight_parts) > 0][:len(dataset)]
  return dict(loss=loss_sum / max(tokens, 1.0), accuracy=float(acc_n.mean()),
              slices=slice_accuracies(acc_n, dataset))


def slice_accuracies(acc_n: np.ndarray, dataset: mqar.MQARDataset) -> dict[str, float]:
  """{'L<seq_len>_kv<num_kv_pairs>': mean accuracy} from per-example accuracies in dataset order."""
  return {f"L{seq_len}_kv{kv}": float(acc_n[(dataset.seq_len == seq_len) & (dataset.num_kv_pairs == kv)].mean())
          for seq_len, kv in dataset.slices()}


# ---------------------------------------------------------------------------------------------- Workdir


def checkpoint_manager(workdir: str, keep: int) -> tuple[str, ocp.CheckpointManager]:
  """(checkpoint directory, async Orbax manager keeping the last `keep`) of a workdir."""
  ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  return ckpt_dir, ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True))


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: dict[str, Any], progress: dict) -> None:
  """Arrays (`state`, sharded as they are) and the JSON `progress` record, under `step`."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             progress=ocp.args.JsonSave(progress)))


def restore_latest(manager: ocp.CheckpointManager, like: dict[str, Any]) -> tuple[dict, dict] | None:
  """(state, progress) of the latest checkpoint, arrays placed with the shardings of `like`; None if none."""
  if manager.latest_step() is None:
    return None
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
  return restored.state, restored.progress


def _check_workdir_config(workdir: str, config_json: str) -> None:
  """A workdir holds one run: refuse to resume it under a different config (nothing is overwritten)."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    new = json.loads(config_json)
    if old != new:
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise ValueError(f"workdir {workdir} holds a run with a different config (sections differ: {diff}); "
                       "use a new --workdir")
  else:
    with open(path, "w") as f:
      f.write(config_json)


class _MetricsWriter:
  """metrics.jsonl plus TensorBoard events (tensorboardX: no TensorFlow needed)."""

  def __init__(self, workdir: str):
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:  # TensorBoard events are optional; metrics.jsonl is the record
      self._tb = None

  def write(self, step: int, scalars: dict[str, Any], **extra: Any) -> None:
    self._jsonl.write(json.dumps({"step": step, **scalars, **extra}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in _flatten(scalars).items():
        self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float)):
      out[f"{prefix}{k}"] = v
  return out


# ---------------------------------------------------------------------------------------------- Main


def train_and_evaluate(config: Any, workdir: str, *, _kill_after_steps: int | None = None) -> dict[str, Any]:
  """Trains one model on MQAR as configured, writing everything to `workdir`; returns the summary.

  Reruns with the same workdir resume from its latest checkpoint. `_kill_after_steps` is a test hook that
  stops the run abruptly after that many steps of this invocation, as a crash would.
  """
  # Config: everything is checked before any data is generated or any array allocated.
  config, model_cfg = config_lib.resolve(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  n_data = mesh.shape["data"]
  for key in ("batch_size", "eval_batch_size"):
    if config.train[key] % n_data:
      raise ValueError(f"train.{key} must be a multiple of the mesh's data axis ({n_data}), "
                       f"got {config.train[key]}")
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(workdir, config.to_json(indent=2, sort_keys=True))
  start_time = time.time()

  # Input.
  t0 = time.time()
  train_ds, valid_ds, test_ds = (build_split(config, split) for split in ("train", "validation", "test"))
  logging.info("data: %d train / %d validation / %d test examples in %.1fs", len(train_ds), len(valid_ds),
               len(test_ds), time.time() - t0)
  if len(train_ds) < config.train.batch_size:
    raise ValueError(f"train.batch_size ({config.train.batch_size}) exceeds the training examples "
                     f"({len(train_ds)})")
  k = max(ds.max_labels_per_example for ds in (train_ds, valid_ds, test_ds))
  steps_per_epoch = mqar.steps_per_epoch(len(train_ds), config.train.batch_size)
  total_steps = steps_per_epoch * config.train.epochs
  tokens_per_step = config.train.batch_size * train_ds.inputs.shape[1]

  # Model, optimizer, shardings.
  graphdef, params, param_sh = init_model(model_cfg, mesh, config.seed)
  tx, schedule = make_optimizer(config.train, total_steps)
  opt_sh = optimizer_shardings(tx, params, param_sh, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  train_step = make_train_step(graphdef, tx, schedule, k, param_sh, opt_sh, mesh)
  eval_step = make_eval_step(graphdef, k, param_sh, mesh)
  n_params = count_params(params)
  state_size = model_cfg.state_size()

  # Checkpoint: resume from the latest one in the workdir, if any.
  ckpt_dir, manager = checkpoint_manager(workdir, config.train.keep_checkpoints)
  progress = dict(epoch=0, best_accuracy=-1.0, best_epoch=-1, stopped_early=False, history=[],
                  train_seconds=0.0, trained_steps=0)
  best_params = jax.tree.map(jnp.copy, params)  # a copy: `params` is donated to the train step
  restored = restore_latest(manager, dict(params=params, opt_state=opt_state, best_params=params, step=step))
  if restored is not None:
    latest = manager.latest_step()
    state, progress = restored
    params, opt_state, best_params, step = (state[k_] for k_ in ("params", "opt_state", "best_params", "step"))
    logging.info("resumed from checkpoint at step %d (epoch %d)", latest, progress["epoch"])
  writer = _MetricsWriter(workdir)
  if int(step):
    writer.write(int(step), {}, event="resume")

  def save(step_value: int) -> None:
    save_checkpoint(manager, step_value, dict(params=params, opt_state=opt_state, best_params=best_params,
                                              step=step), progress)

  print(f"training {model_cfg.mixer} d_model={model_cfg.d_model} n_layers={model_cfg.n_layers}: "
        f"{n_params:,} parameters, state size {state_size:,}, {steps_per_epoch} steps/epoch, "
        f"mesh {dict(mesh.shape)}", flush=True)

  # Train.
  steps_this_run = 0
  try:
    while progress["epoch"] < config.train.epochs and not progress["stopped_early"]:
      epoch = progress["epoch"]
      first = int(step) - epoch * steps_per_epoch
      window_start, window_steps, window_metrics = time.time(), 0, []
      for batch in mqar.epoch_batches(train_ds, config.train.batch_size, seed=config.seed, epoch=epoch,
                                      start_step=first):
        params, opt_state, step, metrics = train_step(params, opt_state, step, sharding.put_batch(batch, mesh))
        window_metrics.append(metrics)
        window_steps += 1
        steps_this_run += 1
        step_value = epoch * steps_per_epoch + first + window_steps
        last_of_epoch = step_value == (epoch + 1) * steps_per_epoch
        checkpoint_due = (config.train.checkpoint_every_steps > 0 and not last_of_epoch
                          and step_value % config.train.checkpoint_every_steps == 0)
        if window_steps % config.train.log_every_steps == 0 or last_of_epoch or checkpoint_due:
          fetched = jax.device_get(window_metrics)
          elapsed = time.time() - window_start
          progress["train_seconds"] += elapsed
          progress["trained_steps"] += window_steps
          scalars = {k_: float(np.mean([m[k_] for m in fetched])) for k_ in fetched[0]}
          if not all(math.isfinite(float(m["loss"])) for m in fetched):
            raise NonFiniteLossError(
                f"non-finite loss at step <= {step_value} (epoch {epoch}); the last good checkpoint is "
                f"kept in {ckpt_dir}; lower train.learning_rate or set train.grad_clip_norm")
          scalars["tokens_per_sec"] = window_steps * tokens_per_step / max(elapsed, 1e-9)
          scalars["step_ms"] = 1000 * elapsed / window_steps
          writer.write(step_value, {f"train/{k_}": v for k_, v in scalars.items()}, epoch=epoch)
          print(f"epoch {epoch + 1}/{config.train.epochs} step {step_value}/{total_steps} "
                f"loss {scalars['loss']:.4f}{aux_text(scalars)} acc {scalars['accuracy']:.3f} "
                f"lr {scalars['learning_rate']:.2e} "
                f"{scalars['tokens_per_sec']:,.0f} tok/s", flush=True)
          window_start, window_steps, window_metrics = time.time(), 0, []
          first = step_value - epoch * steps_per_epoch
        if checkpoint_due:  # after the flush above, so a checkpoint never holds a non-finite loss's update
          save(step_value)
        if _kill_after_steps is not None and steps_this_run >= _kill_after_steps:
          manager.wait_until_finished()
          raise _SimulatedKill(f"killed after {steps_this_run} steps")

      # Evaluate on validation; keep the best parameters (selection never looks at test).
      val = evaluate(eval_step, params, valid_ds, config.train.eval_batch_size, mesh)
      if not math.isfinite(val["loss"]):
        raise NonFiniteLossError(f"non-finite validation loss after epoch {epoch}; the last good checkpoint "
                                 f"is kept in {ckpt_dir}")
      progress["epoch"] = epoch + 1
      progress["history"].append(dict(epoch=epoch + 1, accuracy=val["accuracy"], loss=val["loss"]))
      if val["accuracy"] > progress["best_accuracy"]:
        progress["best_accuracy"], progress["best_epoch"] = val["accuracy"], epoch + 1
        best_params = jax.tree.map(jnp.copy, params)
      if val["accuracy"] > config.train.early_stop_accuracy:
        progress["stopped_early"] = True
      writer.write(int(step), {"validation/loss": val["loss"], "validation/accuracy": val["accuracy"],
                               **{f"validation/slices/{s}": a for s, a in val["slices"].items()}},
                   epoch=epoch + 1)
      print(f"epoch {epoch + 1}: validation loss {val['loss']:.4f} accuracy {val['accuracy']:.4f} "
            + " ".join(f"{s}={a:.3f}" for s, a in val["slices"].items()), flush=True)
      save(int(step))
    manager.wait_until_finished()
  finally:
    writer.close()

  # Test, once, with the parameters of the best validation epoch.
  test = evaluate(eval_step, best_params, test_ds, config.train.eval_batch_size, mesh)
  best = next(h for h in progress["history"] if h["epoch"] == progress["best_epoch"])
  summary = dict(
      mixer=model_cfg.mixer if isinstance(model_cfg.mixer, dict) else dict(model_cfg.mixer),
      d_model=model_cfg.d_model,
      validation_accuracy=best["accuracy"],
      validation_loss=best["loss"],
      test_accuracy=test["accuracy"],
      test_loss=test["loss"],
      test_slices=test["slices"],
      best_epoch=progress["best_epoch"],
      epochs_run=progress["epoch"],
      stopped_early=progress["stopped_early"],
      steps=int(step),
      num_params=n_params,
      state_size=state_size,
      tokens_per_sec=progress["trained_steps"] * tokens_per_step / max(progress["train_seconds"], 1e-9),
      train_seconds=progress["train_seconds"],
      wall_seconds=time.time() - start_time,
      devices=len(mesh.devices.flat),
      backend=jax.default_backend(),
  )
  validation_slices = evaluate(eval_step, best_params, valid_ds, config.train.eval_batch_size, mesh)["slices"]
  summary["validation_slices"] = validation_slices
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"done: best epoch {summary['best_epoch']}: validation accuracy {summary['validation_accuracy']:.4f}, "
        f"test accuracy {summary['test_accuracy']:.4f}", flush=True)
  return summary
