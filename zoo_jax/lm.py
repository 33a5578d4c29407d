"""Language-model pretraining: `train_lm(config, workdir)` on the Pile (or any Pile-format text) or the
embedded Shakespeare corpus, sharded over devices and hosts.

Dimension legend: b batch (per process), B global batch, l sequence length, v vocabulary, d model width.

Objective: next-token cross-entropy, the mean over every predicted position of a packed row,
    loss = −1/(B(l−1)) Σ_rows Σ_{t=1}^{l−1} log p(x_t | x_<t),    perplexity = exp(loss on validation);
this is the perplexity the paper reports for its Pile runs (Section 3, Table 1). Training runs on the one
core (`zoo_jax.trainer`, a population of one) with the LM task of `zoo_jax.tasks`, whose one function
`token_logprobs` gives both the training loss and evaluation's per-token log-probabilities.

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
bigram_counts.npz (bigram counts of exactly the rows trained on: the loader replayed over the steps trained,
`count_trained_bigrams`; with the end-of-text token, which separates the documents of a packed row).

Differences from the paper's Pile runs (Zoology's `train.py` on the Pile, via the `safari` codebase's
pipeline): documents are packed into non-overlapping rows with <|endoftext|> between them (as there);
no dropout by default (`model.embed_dropout`, `model.resid_dropout` and attention's `dropout` are
available, `zoo_jax.model`; whether the paper's Pile runs used dropout is not checked here); AdamW decays
every parameter (as zoo_jax's MQAR trainer); model selection by validation perplexity, evaluated every
`train.eval_every_steps`.
"""

import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from zoo_jax import checkpoint as checkpoint_lib
from zoo_jax import config as config_lib
from zoo_jax import sharding
from zoo_jax import tasks
from zoo_jax import trainer
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


def prepare_data(cfg: Any, log=print) -> dict[str, Any]:
  """{split: source}: writes the embedded corpus's shards if needed, then builds (or reuses) array_record;
  `log` gets the one line saying which cache is used (or built)."""
  data_dir = os.path.expanduser(cfg.data.data_dir)
  manual_dir = os.path.expanduser(cfg.data.manual_dir)
  if not manual_dir:
    plays = sorted(cfg.data.validation_plays)
    manual_dir = os.path.join(data_dir, "manual", "shakespeare-val-" + "+".join(plays))
    if not os.path.exists(os.path.join(manual_dir, "val.jsonl.zst")):
      text.write_shakespeare(manual_dir, plays)
  return text.build(manual_dir, corpus=corpus_name(cfg), tokenizer=cfg.data.tokenizer, seq_len=cfg.data.seq_len,
                    data_dir=data_dir, subsets=tuple(cfg.data.subsets), log=log)


def trained_batches(source, cfg: Any, steps: int):
  """The global batches (B, l) the run trained on in its steps [0, `steps`), in order: the loader
  (`text.train_batches`, as `tasks.LMTask` sets it up: the run's seed, its epochs) replayed as one process,
  which reads every row of each global batch — the rows all processes of the run read between them."""
  batch_size = cfg.train.batch_size
  num_epochs = max(1, math.ceil((cfg.train.steps + 1) * batch_size / len(source)))  # as LMTask
  batches = text.train_batches(source, batch_size=batch_size, seed=cfg.seed, num_epochs=num_epochs)
  for _ in range(steps):
    yield next(batches)["tokens"]


def count_trained_bigrams(source, cfg: Any, steps: int, vocab_size: int, eot_id: int, log=print):
  """`ar_hits.count_bigrams` of exactly the tokens trained on in steps [0, `steps`) (`trained_batches`),
  with a progress line about every 10 s and one at the end."""
  from zoo_jax.analysis import ar_hits  # pylint: disable=g-import-not-at-top
  tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
  t0 = last = time.perf_counter()

  def batches():
    nonlocal last
    for i, tokens_bl in enumerate(trained_batches(source, cfg, steps), start=1):
      yield tokens_bl
      now = time.perf_counter()
      if now - last >= 10 and i < steps:
        log(f"counting training bigrams: {i:,}/{steps:,} batches ({i * tokens_per_step / (now - t0):,.0f} "
            "tokens/s)")
        last = now

  counts = ar_hits.count_bigrams(batches(), vocab_size, eot_id=eot_id)
  seconds = time.perf_counter() - t0
  log(f"counting training bigrams: {steps:,} batches, {counts.num_tokens:,} tokens ({counts.codes.size:,} "
      f"distinct bigrams) in {seconds:.1f} s")
  return counts


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

  Reruns with the same workdir resume from its latest good checkpoint (same next batches). Test hooks:
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
  lock = (checkpoint_lib.open_workdir(workdir, cfg.to_json(indent=2, sort_keys=True),
                                      defaults=config_lib.lm_defaults().to_dict()) if lead else None)
  try:
    _sync("workdir")
    return _train(cfg, model_cfg, tok, mesh, workdir, lead, _kill_after_steps, _record_batches)
  finally:
    if lock is not None:
      lock.release()


def _train(cfg, model_cfg, tok, mesh, workdir: str, lead: bool, kill_after_steps, record_batches):
  start_time = time.time()
  # Input: process 0 builds the array_record files, the others wait and read them.
  if lead:
    sources = prepare_data(cfg)
  _sync("data built")
  if not lead:
    sources = prepare_data(cfg, log=lambda line: None)
  train_src, valid_src = sources["train"], sources["validation"]
  if len(train_src) < cfg.train.batch_size:
    raise ValueError(f"train.batch_size ({cfg.train.batch_size}) exceeds the training rows ({len(train_src)})")
  member = trainer.Member("run", cfg.seed, cfg.train.learning_rate, cfg.train.weight_decay)
  task = tasks.LMTask(cfg, train_src, valid_src, [member.seed])
  task.record_batches = record_batches
  if lead:
    print(f"training {model_cfg.mixer} d_model={model_cfg.d_model} n_layers={model_cfg.n_layers} on "
          f"{corpus_name(cfg)} ({len(train_src):,} rows of {cfg.data.seq_len}): {task.total_steps} steps of "
          f"{task.tokens_per_step:,} tokens, mesh {dict(mesh.shape)}, {jax.process_count()} process(es)",
          flush=True)
  writer = trainer.MetricsWriter(workdir) if lead else None
  hooks = trainer.Hooks(write=writer.write if writer else None, kill_after_steps=kill_after_steps)
  if not lead:
    hooks.print = lambda line: None
  try:
    run = trainer.train(task, model_cfg=model_cfg, train_cfg=cfg.train, members=[member], mesh=mesh,
                        checkpoint_dir=os.path.join(workdir, "checkpoints"), hooks=hooks, on_divergence="raise")
  finally:
    if writer:
      writer.close()

  # The AR-hit analysis's inputs: validation log-probabilities (best parameters), training bigram counts.
  from zoo_jax.analysis import ar_hits  # pylint: disable=g-import-not-at-top
  if lead:
    print(f"evaluating the best parameters (step {run.progress['models'][0]['best_step']}) on validation for "
          "per-token log-probabilities…", flush=True)
  t0 = time.perf_counter()
  final = task.evaluate(run.eval_step, run.state["best_params"], "validation", run.shardings, keep=True)[0]
  if lead:
    print(f"  done in {time.perf_counter() - t0:.1f} s ({final['tokens']:,} tokens)", flush=True)
  model = run.progress["models"][0]
  steps = int(run.state["step"])
  summary = dict(
      mixer=dict(model_cfg.mixer), d_model=model_cfg.d_model, n_layers=model_cfg.n_layers,
      corpus=corpus_name(cfg), tokenizer=tok.name, seq_len=cfg.data.seq_len,
      validation_loss=final["loss"], validation_perplexity=final["perplexity"],
      best_step=model["best_step"], history=model["history"], steps=steps,
      train_tokens=steps * task.tokens_per_step, num_params=run.num_params,
      tokens_per_sec=run.progress["trained_steps"] * task.tokens_per_step / max(run.progress["train_seconds"], 1e-9),
      train_seconds=run.progress["train_seconds"], wall_seconds=time.time() - start_time,
      devices=len(mesh.devices.flat), processes=jax.process_count(), backend=jax.default_backend())
  if lead:
    ar_hits.save_eval(os.path.join(workdir, "ar_eval.npz"), final["token_rows"], final["logprob_rows"])
    print(f"counting training bigrams over the {steps:,} batches trained on ({steps * task.tokens_per_step:,} "
          "tokens)…", flush=True)
    count_trained_bigrams(train_src, cfg, steps, model_cfg.vocab_size, tok.eot_id, log=lambda line: print(
        "  " + line, flush=True)).save(os.path.join(workdir, "bigram_counts.npz"))
    checkpoint_lib.write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    print(f"done: validation perplexity {summary['validation_perplexity']:.2f} (best step {summary['best_step']}), "
          f"{summary['tokens_per_sec']:,.0f} tok/s", flush=True)
  _sync("done")
  return summary
