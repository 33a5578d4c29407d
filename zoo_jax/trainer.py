r"""The one training core: a population of models, one jitted step, one loop, one checkpoint format.

Dimension legend: p population (models trained together), b batch, l sequence length.

Every run is a *population*: `p` models with the same architecture and data shapes that differ in their
seed (initialisation and data order) and their optimizer hyperparameters (peak learning rate, weight
decay). A single run is a population of one; a sweep group (`zoo_jax.sweep`) is a population of many. The
train step is `jax.vmap` of the one-model step over the leading population axis, so "a group equals its runs
trained one by one" holds by construction. Per-model hyperparameters live in the optimizer state through
`optax.inject_hyperparams`: the schedule is the configured one with a unit peak, scaled by each model's
`learning_rate` hyperparameter.

What differs between MQAR and language modelling — how batches come, the loss, the evaluation and which
validation result is better — is a *task* (`zoo_jax.tasks`). Nothing else differs:

    state  = init_state(...)               params / opt_state / best_params (p, ...) + step, sharded on a
                                           (runs, data, fsdp, model) mesh: the population over `runs`, each
                                           model's parameters by the logical-axis table
    fit(task, state, ...)                  steps; every `log_every_steps` a progress line and metrics, a
                                           non-finite loss retires its model (or stops a single run);
                                           at the task's evaluation points validation, best parameters,
                                           early stopping; checkpoints (`zoo_jax.checkpoint`) at evaluation
                                           points and every `checkpoint_every_steps`; resumes from the newest
                                           good checkpoint, data iterator included.

Dropout (`model.embed_dropout`, `model.resid_dropout`, attention's `dropout`; all 0 by default) draws its
masks from a key that is a pure function of the model's seed and the step, `dropout_key(seed, step)`: a
resumed run draws the same masks, no RNG state is checkpointed, a model of a population draws what it would
alone, and evaluation (no key) drops nothing. A model without dropout gets no key: its step is unchanged.

Retired models (early stop, divergence) keep their slot in the population but their updates are masked
(`jnp.where` over the parameters and moments), so a checkpoint never holds non-finite values and a retired
model's best parameters are final. A population of one runs the one-model step itself, the axis squeezed
(`over_population`): no vmap of size 1, no mask (its run ends when its one model retires).
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from zoo_jax import checkpoint as checkpoint_lib
from zoo_jax import sharding
from zoo_jax.model import LanguageModel, ModelConfig


class NonFiniteLossError(RuntimeError):
  pass


class SimulatedKill(RuntimeError):
  """Raised by the `kill_after_steps` test hook to stop a run abruptly, as a crash would."""


# Folded into the seed's key first, so the dropout keys are not the keys `nnx.Rngs(seed)` drew for the
# initialisation (fold_in(key(seed), n) for its n-th draw).
DROPOUT_STREAM = 0x64726F70  # b"drop"


def dropout_key(seed: Any, step: Any) -> jax.Array:
  """The dropout key of model `seed` at optimizer step `step` (from 0): stateless, so resume-safe."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM), step)


@dataclasses.dataclass(frozen=True)
class Member:
  """One model of a population: its id (a run name), seed, and optimizer hyperparameters."""
  run_id: str
  seed: int
  learning_rate: float
  weight_decay: float


# ---------------------------------------------------------------------------------------------- State


def count_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def unit_schedule(train_cfg: Any, total_steps: int) -> optax.Schedule:
  """The configured schedule with peak 1: warmup (linear from 0), then cosine to 0 or constant."""
  warmup = min(train_cfg.warmup_steps, total_steps)
  if train_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else 1.0, peak_value=1.0, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)],
                                [warmup])
  return optax.constant_schedule(1.0)


def make_optimizer(train_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(AdamW with `learning_rate` and `weight_decay` injected hyperparameters, the unit schedule).

  Zoology's torch AdamW decays every parameter (no mask), betas (0.9, 0.999), eps 1e-8; gradients are
  clipped by global norm when `train.grad_clip_norm` > 0. The learning rate at step s is
  `learning_rate · unit(s)`, with `learning_rate` read from the optimizer state, so each model of a
  population has its own.
  """
  unit = unit_schedule(train_cfg, total_steps)

  def adamw(learning_rate, weight_decay):
    parts = [optax.adamw(lambda count: learning_rate * unit(count), b1=0.9, b2=0.999, eps=1e-8,
                         weight_decay=weight_decay)]
    if train_cfg.grad_clip_norm > 0:
      parts.insert(0, optax.clip_by_global_norm(train_cfg.grad_clip_norm))
    return optax.chain(*parts)

  tx = optax.inject_hyperparams(adamw)(learning_rate=train_cfg.learning_rate,
                                       weight_decay=train_cfg.weight_decay)
  return tx, unit


def population_spec(mesh: jax.sharding.Mesh, spec: P = P()) -> P:
  """`spec` behind a leading population axis, split over the mesh's `runs` axis where it has devices."""
  runs = "runs" if mesh.shape.get("runs", 1) > 1 else None
  return P(runs, *spec)


@dataclasses.dataclass
class Shardings:
  """Where a population's arrays live: state trees, batches (p, b, ...), per-model vectors (p,), scalars."""
  state: Any
  batch: jax.sharding.Sharding
  member: jax.sharding.Sharding
  replicated: jax.sharding.Sharding
  population: int
  seeds: tuple[int, ...] = ()  # the members' seeds, for their dropout keys (`dropout_key`)


def init_state(model_cfg: ModelConfig, train_cfg: Any, members: list[Member], total_steps: int,
               mesh: jax.sharding.Mesh):
  """(graphdef, state, Shardings, tx, unit schedule) of a population, created directly with its shardings.

  `state` = {params, opt_state, best_params: trees with a leading population axis, step: int32 scalar}.
  Each model is initialised exactly as a single run with its seed would be (the abstract model gives the
  logical axes, `sharding.LOGICAL_RULES` the mesh axes; parameters are made by a jitted init with those
  out_shardings).
  """
  abstract = nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract, nnx.Param)
  specs = nnx.get_partition_spec(abstract_state).to_pure_dict()
  shapes = abstract_state.to_pure_dict()
  param_sh = jax.tree.map(
      lambda spec, x: sharding.named(mesh, population_spec(mesh, sharding.logical_to_mesh(spec, x.shape, mesh))),
      specs, shapes, is_leaf=lambda x: isinstance(x, P))
  member_sh = sharding.named(mesh, population_spec(mesh))
  rep = sharding.replicated(mesh)
  batch_sh = sharding.named(mesh, population_spec(mesh, P(sharding.batch_axes(mesh))))

  def init_one(seed):
    return nnx.split(LanguageModel(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param)[1].to_pure_dict()

  seeds = np.asarray([m.seed for m in members], np.int32)
  # One model per seed, initialised one by one (nnx.Rngs draws from a Python-int seed) and stacked.
  params = jax.jit(lambda: jax.tree.map(lambda *xs: jnp.stack(xs), *[init_one(int(s)) for s in seeds]),
                   out_shardings=param_sh)()
  tx, unit = make_optimizer(train_cfg, total_steps)
  abstract_opt = jax.eval_shape(jax.vmap(tx.init), params)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, param_sh,
                                 transform_non_params=lambda _: member_sh)
  hyper = dict(learning_rate=np.asarray([m.learning_rate for m in members], np.float32),
               weight_decay=np.asarray([m.weight_decay for m in members], np.float32))

  def init_opt(params_p, hyper_p):
    opt_p = jax.vmap(tx.init)(params_p)
    return opt_p._replace(hyperparams={**opt_p.hyperparams, **hyper_p})

  opt_state = jax.jit(init_opt, out_shardings=opt_sh)(params, hyper)
  best_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_sh)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), rep)
  state = dict(params=params, opt_state=opt_state, best_params=best_params, step=step)
  state_sh = dict(params=param_sh, opt_state=opt_sh, best_params=param_sh, step=rep)
  return graphdef, state, Shardings(state_sh, batch_sh, member_sh, rep, len(members),
                                      tuple(int(m.seed) for m in members)), tx, unit


# ---------------------------------------------------------------------------------------------- Steps


def over_population(fn: Callable, population: int, in_axes: Any = 0) -> Callable:
  """`jax.vmap(fn, in_axes)` over the leading population axis; for a population of one, `fn` on the one
  model with the axis squeezed and restored (the same values; measured faster on XLA:CPU than a size-1
  vmap with its masked updates, and the single run's step stays the plain one-model step)."""
  if population > 1:
    return jax.vmap(fn, in_axes=in_axes)
  axes = in_axes if isinstance(in_axes, tuple) else None

  def squeezed(*args):
    args = [a if (axes is not None and axes[i] is None) else jax.tree.map(lambda x: x[0], a)
            for i, a in enumerate(args)]
    return jax.tree.map(lambda x: x[None], fn(*args))

  return squeezed


def auxiliary_loss(model: LanguageModel) -> jax.Array | None:
  """The sum of the auxiliary losses the model's layers sowed in the call just made (e.g. sparse_attention's
  sparsity loss, `nnx.Intermediate` named 'aux_loss'), popped from the model; None if no layer sowed one."""
  from zoo_jax.mixers.registry import AUX_LOSS  # pylint: disable=g-import-not-at-top
  sown = nnx.pop(model, nnx.Intermediate)
  values = [v for path, v in nnx.to_flat_state(sown) if path[-1] == AUX_LOSS]
  leaves = [leaf for v in values for leaf in jax.tree.leaves(v)]
  return sum(jnp.asarray(leaf, jnp.float32) for leaf in leaves) if leaves else None


def loss_and_metrics(task, graphdef, params, batch: dict[str, jax.Array],
                     dropout_key: jax.Array | None = None):
  """(loss to minimise, metrics) of one model: the task's loss plus any auxiliary loss the layers sowed;
  metrics hold the task's sums, `task_loss` and, if sown, `aux_loss`. `dropout_key` reaches the task's loss
  only for a model with dropout (`LanguageModel.uses_dropout`)."""
  model = nnx.merge(graphdef, params)
  if dropout_key is not None and getattr(model, "uses_dropout", False):
    task_loss, sums = task.loss(model, batch, dropout_key=dropout_key)
  else:
    task_loss, sums = task.loss(model, batch)
  aux = auxiliary_loss(model)
  metrics = dict(sums, task_loss=task_loss)
  if aux is None:
    return task_loss, metrics
  return task_loss + aux, dict(metrics, aux_loss=aux)


def make_train_step(task, graphdef, tx, unit: optax.Schedule, sh: Shardings):
  """train_step(state, active_p, batch) -> (state, metrics (p,)): one step of every model of the population;
  a model with active_p False keeps its parameters and optimizer state. Each model's dropout key is
  `dropout_key(its seed, step)` (`sh.seeds`)."""
  if len(sh.seeds) != sh.population:
    raise ValueError(f"Shardings.seeds must hold the population's {sh.population} seeds, got {sh.seeds!r}")
  seeds_p = np.asarray(sh.seeds, np.int32)

  def one_model(params, opt_state, step, active, batch, seed):
    key = dropout_key(seed, step)
    (_, m), grads = jax.value_and_grad(lambda p: loss_and_metrics(task, graphdef, p, batch, key),
                                       has_aux=True)(params)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = (lambda new, old: new) if sh.population == 1 else (lambda new, old: jnp.where(active, new, old))
    metrics = dict(task.step_metrics(m), loss=m["task_loss"], grad_norm=optax.global_norm(grads),
                   learning_rate=opt_state.hyperparams["learning_rate"] * unit(step))
    if "aux_loss" in m:
      metrics["aux_loss"] = m["aux_loss"]
    return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt, opt_state), metrics

  def train_step(state, active_p, batch_p):
    params, opt_state, metrics = over_population(one_model, sh.population, in_axes=(0, 0, None, 0, 0, 0))(
        state["params"], state["opt_state"], state["step"], active_p, batch_p, seeds_p)
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics

  return jax.jit(sharding.with_activation_mesh(train_step, sh.batch),  # FSDP: activations split by batch
                 in_shardings=(sh.state, sh.member, sh.batch), out_shardings=(sh.state, sh.member),
                 donate_argnums=(0,))


def make_eval_step(task, graphdef, sh: Shardings):
  """eval_step(params, batch) -> the task's per-model evaluation sums, vmapped over the population."""

  def eval_step(params_p, batch_p):
    return over_population(lambda p, b: task.eval_sums(nnx.merge(graphdef, p), b), sh.population)(params_p, batch_p)

  return jax.jit(sharding.with_activation_mesh(eval_step, sh.batch), in_shardings=(sh.state["params"], sh.batch),
                 out_shardings=sh.member)


def make_keep_best(sh: Shardings):
  """keep_best(state, improved_p) -> state with best_params[i] = params[i] where improved_p[i]."""

  def keep_best(state, improved_p):
    best = jax.tree.map(lambda b, p: jnp.where(improved_p.reshape((-1,) + (1,) * (p.ndim - 1)), p, b),
                        state["best_params"], state["params"])
    return dict(state, best_params=best)

  return jax.jit(keep_best, in_shardings=(sh.state, sh.member), out_shardings=sh.state, donate_argnums=(0,))


def make_retire(sh: Shardings):
  """retire(state, diverged_p) -> state where each diverged model's parameters are its best parameters and
  its optimizer moments are finite (non-finite values zeroed): retired models are masked from then on, and
  a checkpoint never holds NaN."""

  def retire(state, diverged_p):
    def pick(x, y):
      return jnp.where(diverged_p.reshape((-1,) + (1,) * (x.ndim - 1)), y, x)

    params = jax.tree.map(pick, state["params"], state["best_params"])
    opt = jax.tree.map(lambda x: pick(x, jnp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
                       if jnp.issubdtype(x.dtype, jnp.floating) else x, state["opt_state"])
    return dict(state, params=params, opt_state=opt)

  return jax.jit(retire, in_shardings=(sh.state, sh.member), out_shardings=sh.state, donate_argnums=(0,))


def single_step(task, model_cfg: ModelConfig, train_cfg: Any, mesh: jax.sharding.Mesh, seed: int,
                total_steps: int, *, graphdef=None):
  """(graphdef, state, Shardings, step) of a population of one, for benchmarks and tests that drive the
  steps themselves: the model of `seed` with `train_cfg`'s learning rate and weight decay, and
  step(state, batch (1, b, ...)) -> (state, metrics (1,)), `make_train_step`'s step with the model always
  active, jitted (`.lower` works) and donating `state`. `graphdef`: step this graphdef instead of the
  model's own, e.g. a `LanguageModel` subclass with the same parameter tree."""
  member = Member("run", seed, train_cfg.learning_rate, train_cfg.weight_decay)
  model_graphdef, state, sh, tx, unit = init_state(model_cfg, train_cfg, [member], total_steps, mesh)
  graphdef = model_graphdef if graphdef is None else graphdef
  train_step = make_train_step(task, graphdef, tx, unit, sh)
  step = jax.jit(lambda state, batch: train_step(state, jnp.ones(1, bool), batch),
                 in_shardings=(sh.state, sh.batch), out_shardings=(sh.state, sh.member), donate_argnums=(0,))
  return graphdef, state, sh, step


# ---------------------------------------------------------------------------------------------- Loop


class MetricsWriter:
  """metrics.jsonl plus TensorBoard events (tensorboardX: no TensorFlow needed) in a run's directory."""

  def __init__(self, directory: str):
    self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(directory, "tb"))
    except ImportError:  # TensorBoard events are optional; metrics.jsonl is the record
      self._tb = None

  def write(self, step: int, scalars: dict[str, Any], **extra: Any) -> None:
    self._jsonl.write(json.dumps({"step": step, **scalars, **extra}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        if isinstance(value, (int, float)):
          self._tb.add_scalar(key if "run_id" not in extra else f"{extra['run_id']}/{key}", value, step)

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def fresh_progress(members: list[Member]) -> dict[str, Any]:
  """The JSON record a checkpoint holds beside the arrays: per model its validation history, best result,
  status ('ok', 'stopped' early, 'diverged'); for the run its clock and the data iterator's state."""
  return dict(run_ids=[m.run_id for m in members], train_seconds=0.0, trained_steps=0, data_state=None,
              evaluations=0,
              models=[dict(best=None, best_step=-1, best_eval=-1, status="ok", history=[]) for _ in members])


@dataclasses.dataclass
class Hooks:
  """What a caller may plug into the loop: where progress lines go (`print`), metrics (`write(step,
  scalars, **extra)`; None: not written), a label prefixed to progress lines, and test hooks."""
  print: Callable[[str], None] = lambda line: print(line, flush=True)
  write: Callable[..., None] | None = None
  label: str = ""
  kill_after_steps: int | None = None  # test hook: stop abruptly after this many steps, as a crash would


def fit(task, *, graphdef, state, sh: Shardings, tx, unit, members: list[Member], train_cfg: Any,
        checkpointer: checkpoint_lib.Checkpointer, hooks: Hooks, on_divergence: str = "retire"):
  """Trains a population until the task's total steps or until every model has retired.

  Resumes from the checkpointer's newest good checkpoint (arrays, progress and the data iterator's state).
  `on_divergence`: 'retire' (a model whose loss turns non-finite is retired with its best parameters so
  far; the others train on) or 'raise' (NonFiniteLossError, naming the last good checkpoint, if any).
  Returns (state, progress, eval_step); `state['best_params']` are each model's best-evaluation parameters.
  """
  progress = fresh_progress(members)
  restored = checkpointer.restore(state)
  if restored is not None:
    state, saved_progress, ckpt_step = restored
    if saved_progress.get("run_ids") != progress["run_ids"]:
      raise checkpoint_lib.CheckpointError(
          f"{checkpointer.directory} holds a checkpoint of other runs ({saved_progress.get('run_ids')}); "
          "use a new workdir")
    progress = saved_progress
    if progress["data_state"] is not None:
      task.set_data_state(progress["data_state"])
    hooks.print(f"{hooks.label}resumed from step {ckpt_step}")
    if hooks.write:
      hooks.write(ckpt_step, {}, event="resume")
  models = progress["models"]
  train_step = make_train_step(task, graphdef, tx, unit, sh)
  eval_step = make_eval_step(task, graphdef, sh)
  keep_best, retire = make_keep_best(sh), make_retire(sh)
  total = task.total_steps
  population = len(members)

  def active() -> np.ndarray:
    return np.asarray([m["status"] == "ok" for m in models])

  def save(step_value: int) -> None:
    progress["data_state"] = task.get_data_state()
    checkpointer.save(step_value, state, progress)

  def last_good() -> str:
    latest = checkpointer.latest_step()
    return (f"the last good checkpoint is step {latest} in {checkpointer.directory}" if latest is not None
            else "no checkpoint had been written yet")

  step_value = int(state["step"])
  steps_this_call = 0
  window_start, window = time.time(), []
  if step_value < total and active().any():
    hooks.print(f"{hooks.label}compiling the train step…")
  batches = iter(task.train_batches(step_value))
  while step_value < total and active().any():
    batch = next(batches, None)  # pulled only when a step will use it: the data state stays exact
    if batch is None:
      break
    step_start = time.time()
    state, metrics = train_step(state, jax.device_put(active(), sh.member), sharding.put(batch, sh.batch))
    if steps_this_call == 0:  # the call returns once compiled (the step itself runs asynchronously)
      hooks.print(f"{hooks.label}compiled the train step in {time.time() - step_start:.1f} s")
    window.append(metrics)
    step_value += 1
    steps_this_call += 1
    eval_due = task.eval_due(step_value)
    checkpoint_due = eval_due or (train_cfg.checkpoint_every_steps > 0
                                  and step_value % train_cfg.checkpoint_every_steps == 0)
    if step_value % train_cfg.log_every_steps == 0 or eval_due or checkpoint_due or step_value == total:
      fetched = jax.device_get(window)
      elapsed = time.time() - window_start
      if progress["trained_steps"] == 0 and steps_this_call == len(window):
        hooks.print(f"{hooks.label}first {len(window)} step(s) done in {elapsed:.1f} s (compilation included)")
      progress["train_seconds"] += elapsed
      progress["trained_steps"] += len(window)
      losses_sp = np.stack([np.asarray(m["loss"]) for m in fetched])
      diverged = active() & ~np.isfinite(losses_sp).all(axis=0)
      if diverged.any():
        if on_divergence == "raise":
          checkpointer.wait()
          raise NonFiniteLossError(f"non-finite loss at step <= {step_value}; {last_good()}; lower "
                                   "train.learning_rate or set train.grad_clip_norm")
        state = retire(state, jax.device_put(diverged, sh.member))
        for i in np.flatnonzero(diverged):
          models[i]["status"] = "diverged"
          hooks.print(f"{hooks.label}{members[i].run_id}: non-finite loss at step <= {step_value}; retired "
                      "with its best parameters so far")
      scalars_p = {k: np.mean(np.stack([np.asarray(m[k]) for m in fetched]), axis=0) for k in fetched[0]}
      tokens_per_sec = len(window) * task.tokens_per_step / max(elapsed, 1e-9)
      for i in range(population):
        scalars = {k: float(v[i]) for k, v in scalars_p.items()}
        scalars.update(tokens_per_sec=tokens_per_sec, step_ms=1000 * elapsed / len(window))
        if hooks.write:
          hooks.write(step_value, {f"train/{k}": v for k, v in scalars.items()}, **task.log_extra(step_value),
                      **({"run_id": members[i].run_id} if population > 1 else {}))
      if population == 1:
        s = {k: float(v[0]) for k, v in scalars_p.items()}
        hooks.print(f"{hooks.label}{task.progress_text(step_value, s)} lr {s['learning_rate']:.2e} "
                    f"{tokens_per_sec:,.0f} tok/s")
      window_start, window = time.time(), []

    if eval_due:
      now_active = active()
      hooks.print(f"{hooks.label}evaluating on validation…")
      eval_start = time.time()
      results = task.evaluate(eval_step, state["params"], "validation", sh)
      eval_seconds = time.time() - eval_start
      window_start += eval_seconds  # tokens/s and train_seconds count training only
      improved = np.zeros(population, bool)
      for i, (m, r) in enumerate(zip(models, results)):
        if not now_active[i]:
          continue
        if not math.isfinite(r["loss"]):
          if on_divergence == "raise":
            checkpointer.wait()
            raise NonFiniteLossError(f"non-finite validation loss at step {step_value}; {last_good()}")
          m["status"] = "diverged"
          continue
        entry = dict(step=step_value, **task.history_entry(step_value, r))
        m["history"].append(entry)
        if m["best"] is None or task.better(r, m["best"]):
          m["best"], m["best_step"], m["best_eval"] = entry, step_value, len(m["history"])
          improved[i] = True
        if task.should_stop(r):
          m["status"] = "stopped"
        if hooks.write:
          hooks.write(step_value, task.validation_scalars(r), **task.log_extra(step_value),
                      **({"run_id": members[i].run_id} if population > 1 else {}))
      progress["evaluations"] += 1
      if improved.any():
        state = keep_best(state, jax.device_put(improved, sh.member))
      hooks.print(f"{hooks.label}{task.validation_text(step_value, results, now_active)} ({eval_seconds:.1f} s)")
    if checkpoint_due:  # after the checks above: a checkpoint never holds a non-finite update
      save(step_value)
    if hooks.kill_after_steps is not None and steps_this_call >= hooks.kill_after_steps:
      checkpointer.wait()
      raise SimulatedKill(f"killed after {steps_this_call} steps")
  checkpointer.wait()
  return state, progress, eval_step


@dataclasses.dataclass
class Trained:
  """What `train` returns: the population's state and progress, and what evaluating it needs."""
  graphdef: Any
  state: dict[str, Any]
  shardings: Shardings
  progress: dict[str, Any]
  eval_step: Any
  num_params: int  # of one model


def train(task, *, model_cfg: ModelConfig, train_cfg: Any, members: list[Member], mesh: jax.sharding.Mesh,
          checkpoint_dir: str, hooks: Hooks, on_divergence: str = "retire") -> Trained:
  """init_state → checkpointer → fit, closing the checkpointer (waiting for in-flight writes) on every path."""
  graphdef, state, sh, tx, unit = init_state(model_cfg, train_cfg, members, task.total_steps, mesh)
  num_params = count_params(jax.tree.map(lambda x: x[0], state["params"]))
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, keep=train_cfg.keep_checkpoints)
  try:
    state, progress, eval_step = fit(task, graphdef=graphdef, state=state, sh=sh, tx=tx, unit=unit,
                                     members=members, train_cfg=train_cfg, checkpointer=checkpointer,
                                     hooks=hooks, on_divergence=on_divergence)
  finally:
    checkpointer.close()
  return Trained(graphdef, state, sh, progress, eval_step, num_params)
