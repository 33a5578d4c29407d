"""Language-model pretraining: `train_lm(config, workdir)` on the Pile (or any Pile-format text) or the
embedded Shakespeare corpus, sharded over devices and hosts.

Dimension legend: b batch (per process), B global batch, l sequence length, v vocabulary, d model width.

Objective: next-token cross-entropy, the mean over every predicted position of a packed row,
    loss = −1/(B(l−1)) Σ_rows Σ_{t=1}^{l−1} log p(x_t | x_<t),    perplexity = exp(loss on validation);
this is the perplexity the paper reports for its Pile runs (Section 3, Table 1). The train step is MQAR's
(`zoo_jax.train.make_train_step`): a packed row is `inputs`, its labels are the row shifted left with the
last position ignored, and every position is labelled (k = l), so the tied head runs at every position.

Sharding: parameters by the logical-axis table `zoo_jax.sharding.LOGICAL_RULES` over a (data, fsdp, model)
mesh — `heads` / `mlp` / `vocab` dimensions over `model`, `embed` dimensions over `fsdp` — and the batch over
data × fsdp. Several hosts: `init_distributed` (from experiments/lm.py's flags) calls
`jax.distributed.initialize`; every process reads only its rows of each global batch (zoo_jax.data.text),
and `jax.make_array_from_process_local_data` assembles the global batch. Process 0 writes the workdir's
files; every process takes part in Orbax checkpoints.

Workdir (as MQAR's job): config.json, metrics.jsonl, tb/, checkpoints/ (Orbax: params, optimizer state,
best params, step; progress JSON with the data iterator's state, so a resumed run reads the same next
batches), summary.json; and, for the AR-hit analysis (`zoo_jax.analysis.ar_hits`, experiments/ar_gap.py),
ar_eval.npz (per-token log-probabilities of the validation split under the best-validation parameters) and
bigram_counts.npz (bigram counts of the training split's packed rows).

Differences from the paper's Pile runs (Zoology's `train.py` on the Pile, via the `safari` codebase's
pipeline): documents are packed into non-overlapping rows with <|endoftext|> between them (as there);
no dropout; AdamW decays every parameter (as zoo_jax's MQAR trainer); model selection by validation
perplexity, evaluated every `train.eval_every_steps`.
"""

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

from zoo_jax import config as config_lib
from zoo_jax import sharding
from zoo_jax import train as train_lib
from zoo_jax.data import mqar
from zoo_jax.data import text
from zoo_jax.data import tokenizer as tokenizer_lib
from zoo_jax.model import ModelConfig

SCHEDULES = config_lib.SCHEDULES


# ---------------------------------------------------------------------------------------------- Config


def defaults() -> ml_collections.ConfigDict:
  """Every accepted key of an LM run config, with its default: `zoo_jax.config.lm_defaults()`."""
  return config_lib.lm_defaults()


def resolve(config: Any) -> tuple[ml_collections.ConfigDict, ModelConfig, tokenizer_lib.Tokenizer]:
  """`zoo_jax.config.resolve` of an LM config (task 'lm' where it names none), and its tokenizer."""
  full, model_cfg = config_lib.resolve({"task": "lm", **config_lib.as_dict(config)})
  return full, model_cfg, tokenizer_lib.load_tokenizer(full.data.tokenizer)


# ---------------------------------------------------------------------------------------------- Data


def corpus_name(cfg: Any) -> str:
  if cfg.data.corpus:
    return cfg.data.corpus
  if not cfg.data.manual_dir:
    return "shakespeare"
  return os.path.basename(os.path.normpath(os.path.expanduser(cfg.data.manual_dir))) or "corpus"


def prepare_data(cfg: Any) -> dict[str, Any]:
  """{split: source}: writes the embedded corpus's shards if needed, then builds (or reuses) array_record."""
  data_dir = os.path.expanduser(cfg.data.data_dir)
  manual_dir = os.path.expanduser(cfg.data.manual_dir)
  if not manual_dir:
    plays = sorted(cfg.data.validation_plays)
    manual_dir = os.path.join(data_dir, "manual", "shakespeare-val-" + "+".join(plays))
    if not os.path.exists(os.path.join(manual_dir, "val.jsonl.zst")):
      text.write_shakespeare(manual_dir, plays)
  return text.build(manual_dir, corpus=corpus_name(cfg), tokenizer=cfg.data.tokenizer, seq_len=cfg.data.seq_len,
                    data_dir=data_dir, subsets=tuple(cfg.data.subsets))


def lm_batch(tokens_bl: np.ndarray, weight_b: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """MQAR's batch format: inputs are the row; labels[t] = row[t+1], the last position ignored."""
  labels = np.concatenate([tokens_bl[:, 1:], np.full((tokens_bl.shape[0], 1), mqar.IGNORE_INDEX, np.int32)], 1)
  batch = {"inputs": tokens_bl.astype(np.int32), "labels": labels.astype(np.int32)}
  if weight_b is not None:
    batch["weight"] = weight_b.astype(np.float32)
    batch["labels"] = np.where(weight_b[:, None] > 0, batch["labels"], mqar.IGNORE_INDEX).astype(np.int32)
  return batch


# ---------------------------------------------------------------------------------------------- Evaluation


def make_logprob_step(graphdef, param_sh, mesh: jax.sharding.Mesh):
  """tokens (B, l) -> log p(x_t | x_<t) for t = 1..l-1, (B, l-1) float32, replicated on every process."""

  def logprob_step(params, tokens_bl):
    logits_blv = nnx.merge(graphdef, params)(tokens_bl)[:, :-1]
    logp_blv = jax.nn.log_softmax(logits_blv.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_blv, tokens_bl[:, 1:, None], axis=-1)[..., 0]

  return jax.jit(logprob_step, in_shardings=(param_sh, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def evaluate_lm(logprob_step, params, source, *, batch_size: int, max_rows: int, mesh,
                keep: bool = False) -> dict[str, Any]:
  """Mean NLL and perplexity over the split; with `keep`, also tokens (N, l) and logprobs (N, l), NaN in
  column 0 (the layout of `zoo_jax.analysis.ar_hits.save_eval`)."""
  pi, pc = jax.process_index(), jax.process_count()
  nll_sum, count, kept_tokens, kept_logprobs = 0.0, 0, [], []
  n = len(source) if max_rows <= 0 else min(max_rows, len(source))
  for batch in text.eval_batches(source, batch_size=batch_size, max_rows=max_rows, process_index=pi,
                                 process_count=pc):
    global_tokens = sharding.put_batch({"tokens": batch["tokens"]}, mesh)["tokens"]
    logp_bl = np.asarray(logprob_step(params, global_tokens))
    tokens_bl = _all_rows(global_tokens)
    weight_b = np.asarray(_all_rows(sharding.put_batch({"w": batch["weight"]}, mesh)["w"]))
    rows = weight_b > 0
    nll_sum -= float(logp_bl[rows].sum())
    count += int(rows.sum()) * logp_bl.shape[1]
    if keep:
      kept_tokens.append(tokens_bl[rows])
      kept_logprobs.append(np.concatenate([np.full((rows.sum(), 1), np.nan, np.float32), logp_bl[rows]], 1))
  loss = nll_sum / max(count, 1)
  out = dict(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=count, rows=n)
  if keep:
    out["token_rows"] = np.concatenate(kept_tokens).astype(np.int32)
    out["logprob_rows"] = np.concatenate(kept_logprobs).astype(np.float32)
  return out


def _all_rows(x: jax.Array) -> np.ndarray:
  """A data-sharded global array as one numpy array on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def iter_rows(source, chunk: int = 1024):
  """The split's rows in stored order, in (≤ chunk, l) blocks (for bigram counts)."""
  for start in range(0, len(source), chunk):
    yield np.stack([np.asarray(source[i]["tokens"], np.int32) for i in range(start, min(start + chunk, len(source)))])


# ---------------------------------------------------------------------------------------------- Main


def init_distributed(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0) -> None:
  """`jax.distributed.initialize` for several hosts (a no-op for one). On CPU, collectives use gloo."""
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must be in [0, {num_processes}) and --num_processes >= 1, "
                     f"got {process_id} of {num_processes}")
  if num_processes == 1:
    return
  if not coordinator_address:
    raise ValueError("--coordinator_address (host:port of process 0) is needed with --num_processes > 1")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def train_lm(config: Any, workdir: str, *, _kill_after_steps: int | None = None,
             _record_batches: list | None = None) -> dict[str, Any]:
  """Pretrains one LM as configured, writing everything to `workdir`; returns the summary.

  Reruns with the same workdir resume from its latest checkpoint (same next batches). Test hooks:
  `_kill_after_steps` stops the run abruptly after that many steps of this invocation, as a crash would;
  `_record_batches` collects (step, this process's tokens) of every batch trained on.
  """
  # Config: everything is checked before any data is built or any array allocated.
  cfg, model_cfg, tok = resolve(config)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model, fsdp=cfg.mesh.fsdp)
  n_batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  for key in ("batch_size", "eval_batch_size"):
    if cfg.train[key] % n_batch_devices or cfg.train[key] % jax.process_count():
      raise ValueError(f"train.{key} must be a multiple of the mesh's data × fsdp devices ({n_batch_devices}) "
                       f"and of the process count ({jax.process_count()}), got {cfg.train[key]}")
  lead = jax.process_index() == 0
  if lead:
    os.makedirs(workdir, exist_ok=True)
    train_lib._check_workdir_config(workdir, cfg.to_json(indent=2, sort_keys=True))  # pylint: disable=protected-access
  _sync("workdir")
  start_time = time.time()

  # Input: process 0 builds the array_record files, the others wait and read them.
  t0 = time.time()
  if lead:
    sources = prepare_data(cfg)
  _sync("data built")
  if not lead:
    sources = prepare_data(cfg)
  train_src, valid_src = sources["train"], sources.get("validation")
  if valid_src is None:
    raise ValueError(f"data.manual_dir {cfg.data.manual_dir}: no validation shards (val*.jsonl.zst)")
  if len(train_src) < cfg.train.batch_size:
    raise ValueError(f"train.batch_size ({cfg.train.batch_size}) exceeds the training rows ({len(train_src)})")
  seq_len = cfg.data.seq_len
  tokens_per_step = cfg.train.batch_size * seq_len
  total_steps = cfg.train.steps
  num_epochs = max(1, math.ceil((total_steps + 1) * cfg.train.batch_size / len(train_src)))
  logging.info("data: %d train / %d validation rows of %d tokens in %.1fs", len(train_src), len(valid_src),
               seq_len, time.time() - t0)

  # Model, optimizer, shardings: MQAR's, with every position labelled (k = l).
  graphdef, params, param_sh = train_lib.init_model(model_cfg, mesh, cfg.seed)
  tx, schedule = train_lib.make_optimizer(cfg.train, total_steps)
  opt_sh = train_lib.optimizer_shardings(tx, params, param_sh, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
  train_step = train_lib.make_train_step(graphdef, tx, schedule, seq_len, param_sh, opt_sh, mesh)
  logprob_step = make_logprob_step(graphdef, param_sh, mesh)
  n_params = train_lib.count_params(params)

  # Checkpoint: resume from the latest one in the workdir, if any.
  ckpt_dir, manager = train_lib.checkpoint_manager(workdir, cfg.train.keep_checkpoints)
  batches = text.train_batches(train_src, batch_size=cfg.train.batch_size, seed=cfg.seed, num_epochs=num_epochs,
                               process_index=jax.process_index(), process_count=jax.process_count())
  progress = dict(best_loss=float("inf"), best_step=-1, history=[], train_seconds=0.0, trained_steps=0,
                  data_state=batches.get_state())
  best_params = jax.tree.map(jnp.copy, params)  # a copy: `params` is donated to the train step
  restored = train_lib.restore_latest(manager, dict(params=params, opt_state=opt_state, best_params=params,
                                                    step=step))
  if restored is not None:
    state, progress = restored
    params, opt_state, best_params, step = (state[k] for k in ("params", "opt_state", "best_params", "step"))
    batches.set_state(progress["data_state"])
    logging.info("resumed from checkpoint at step %d", int(step))
  writer = train_lib._MetricsWriter(workdir) if lead else None  # pylint: disable=protected-access
  if writer and int(step):
    writer.write(int(step), {}, event="resume")

  def save(step_value: int) -> None:
    progress["data_state"] = batches.get_state()
    train_lib.save_checkpoint(manager, step_value, dict(params=params, opt_state=opt_state,
                                                        best_params=best_params, step=step), progress)

  def validate_now(step_value: int) -> None:
    nonlocal best_params
    val = evaluate_lm(logprob_step, params, valid_src, batch_size=cfg.train.eval_batch_size,
                      max_rows=cfg.train.eval_max_rows, mesh=mesh)
    if not math.isfinite(val["loss"]):
      raise train_lib.NonFiniteLossError(f"non-finite validation loss at step {step_value}; the last good "
                                         f"checkpoint is kept in {ckpt_dir}")
    progress["history"].append(dict(step=step_value, loss=val["loss"], perplexity=val["perplexity"]))
    if val["loss"] < progress["best_loss"]:
      progress["best_loss"], progress["best_step"] = val["loss"], step_value
      best_params = jax.tree.map(jnp.copy, params)
    if writer:
      writer.write(step_value, {"validation/loss": val["loss"], "validation/perplexity": val["perplexity"]})
      print(f"step {step_value}: validation loss {val['loss']:.4f} perplexity {val['perplexity']:.2f} "
            f"({val['tokens']:,} tokens)", flush=True)

  if lead:
    print(f"training {model_cfg.mixer} d_model={model_cfg.d_model} n_layers={model_cfg.n_layers} on "
          f"{corpus_name(cfg)} ({len(train_src):,} rows of {seq_len}): {n_params:,} parameters, "
          f"{total_steps} steps of {tokens_per_step:,} tokens, mesh {dict(mesh.shape)}, "
          f"{jax.process_count()} process(es)", flush=True)

  # Train.
  steps_this_run = 0
  try:
    window_start, window_metrics = time.time(), []
    while int(step) < total_steps:
      batch = next(batches)
      if _record_batches is not None:
        _record_batches.append((int(step), batch["tokens"].copy()))
      params, opt_state, step, metrics = train_step(params, opt_state, step,
                                                    sharding.put_batch(lm_batch(batch["tokens"]), mesh))
      window_metrics.append(metrics)
      steps_this_run += 1
      step_value = int(step)
      last = step_value == total_steps
      eval_due = step_value % cfg.train.eval_every_steps == 0 or last
      checkpoint_due = (cfg.train.checkpoint_every_steps > 0 and step_value % cfg.train.checkpoint_every_steps == 0)
      if len(window_metrics) % cfg.train.log_every_steps == 0 or eval_due or checkpoint_due:
        fetched = jax.device_get(window_metrics)
        elapsed = time.time() - window_start
        progress["train_seconds"] += elapsed
        progress["trained_steps"] += len(fetched)
        if not all(math.isfinite(float(m["loss"])) for m in fetched):
          raise train_lib.NonFiniteLossError(
              f"non-finite loss at step <= {step_value}; the last good checkpoint is kept in {ckpt_dir}; "
              "lower train.learning_rate or set train.grad_clip_norm")
        scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        scalars["tokens_per_sec"] = len(fetched) * tokens_per_step / max(elapsed, 1e-9)
        scalars["step_ms"] = 1000 * elapsed / len(fetched)
        if writer:
          writer.write(step_value, {f"train/{k}": v for k, v in scalars.items()},
                       losses=[float(m["loss"]) for m in fetched])
          print(f"step {step_value}/{total_steps} loss {scalars['loss']:.4f}"
                f"{train_lib.aux_text(scalars)} "
                f"(ppl {math.exp(min(scalars['loss'], 700)):.1f}) lr {scalars['learning_rate']:.2e} "
                f"{scalars['tokens_per_sec']:,.0f} tok/s", flush=True)
        if eval_due:
          validate_now(step_value)
        if checkpoint_due or eval_due:  # after the checks above: a checkpoint never holds a non-finite update
          save(step_value)
        window_start, window_metrics = time.time(), []
      if _kill_after_steps is not None and steps_this_run >= _kill_after_steps:
        manager.wait_until_finished()
        raise train_lib._SimulatedKill(f"killed after {steps_this_run} steps")  # pylint: disable=protected-access
    manager.wait_until_finished()
  finally:
    if writer:
      writer.close()

  # The AR-hit analysis's inputs: validation log-probabilities (best parameters), training bigram counts.
  from zoo_jax.analysis import ar_hits  # pylint: disable=g-import-not-at-top
  final = evaluate_lm(logprob_step, best_params, valid_src, batch_size=cfg.train.eval_batch_size,
                      max_rows=cfg.train.eval_max_rows, mesh=mesh, keep=True)
  summary = dict(
      mixer=dict(model_cfg.mixer), d_model=model_cfg.d_model, n_layers=model_cfg.n_layers,
      corpus=corpus_name(cfg), tokenizer=tok.name, seq_len=seq_len,
      validation_loss=final["loss"], validation_perplexity=final["perplexity"],
      best_step=progress["best_step"], history=progress["history"], steps=int(step),
      train_tokens=int(step) * tokens_per_step, num_params=n_params,
      tokens_per_sec=progress["trained_steps"] * tokens_per_step / max(progress["train_seconds"], 1e-9),
      train_seconds=progress["train_seconds"], wall_seconds=time.time() - start_time,
      devices=len(mesh.devices.flat), processes=jax.process_count(), backend=jax.default_backend())
  if lead:
    ar_hits.save_eval(os.path.join(workdir, "ar_eval.npz"), final["token_rows"], final["logprob_rows"])
    ar_hits.count_bigrams(iter_rows(train_src), model_cfg.vocab_size).save(
        os.path.join(workdir, "bigram_counts.npz"))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    print(f"done: validation perplexity {summary['validation_perplexity']:.2f} (best step {summary['best_step']}), "
          f"{summary['tokens_per_sec']:,.0f} tok/s", flush=True)
  _sync("done")
  return summary
