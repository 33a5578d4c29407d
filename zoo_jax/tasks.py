r"""Tasks: what differs between MQAR and language modelling, plugged into the one loop (`zoo_jax.trainer`).

Dimension legend: p population, b batch, l sequence length, k labelled positions per example, v vocabulary.

A task owns its data (built for the population's seeds), the loss of one model on one batch, the sums an
evaluation step returns, how they reduce to a validation result, which result is better, when to stop
early, and the progress lines. The loop calls:

    total_steps, tokens_per_step             sizes of the run
    train_batches(start_step)                host batches (p, b, ...) from `start_step` on
    get_data_state() / set_data_state(s)     the data iterator's state, kept in checkpoints
    loss(model, batch[, dropout_key]) -> (loss, sums)   one model, one batch: the loss to minimise and its
                                           sums; `dropout_key` (a model with dropout): the training forward's
    step_metrics(sums)                       task metrics of a train step (MQAR: accuracy)
    eval_sums(model, batch)                  one model, one evaluation batch
    eval_due(step), evaluate(...)            when and how validation runs: one result dict per model
    better(a, b), should_stop(r)             model selection and early stopping
    history_entry / validation_scalars / progress_text / validation_text / log_extra   records and lines

MQAR (Zoology's protocol): token-mean cross-entropy over labelled positions, with the LM head applied only
there (`LanguageModel.logits_at`; Zoology computes logits at every position); accuracy per example is the
fraction of its labelled positions whose argmax is right, averaged over examples, and per (seq_len,
num_kv_pairs) slice; validation every epoch, the best validation accuracy selects the parameters, a model
stops once validation accuracy exceeds `train.early_stop_accuracy`.

LM: next-token cross-entropy at every position of a packed row, −1/(B(l−1)) Σ log p(x_t | x_<t); the same
function (`token_logprobs`) gives the training loss and the per-token log-probabilities of evaluation;
validation every `train.eval_every_steps`, the lowest validation loss selects the parameters.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo_jax import sharding
from zoo_jax.data import mqar


def _stack_population(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


# ---------------------------------------------------------------------------------------------- MQAR

_GROUP = "@L"  # a length group's keys in a batch: f"inputs{_GROUP}{seq_len}", ...


def group_by_length(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A padded mixed-length batch (keys of `mqar.fresh_batch`) -> each length's rows at their own length, as
  flat keys `inputs@L16`, `labels@L16`, `weight@L16`, ... (lengths ascending; rows in batch order). A causal
  model's outputs on a row's first L positions do not depend on the padding after them, so the loss and
  gradients are the padded batch's; the padded positions' compute is skipped."""
  out = {}
  for seq_len in np.unique(batch["seq_len"]):
    rows = batch["seq_len"] == seq_len
    for key in ("inputs", "labels", "weight"):
      x = batch[key][rows]
      out[f"{key}{_GROUP}{int(seq_len)}"] = x[:, :int(seq_len)] if x.ndim == 2 else x
  return out


def length_group_counts(data: Any, batch_size: int) -> dict[int, int] | None:
  """{seq_len: rows per training batch} when `data`'s batches are grouped by length (fresh examples, segments
  of two or more lengths, `data.group_by_length`); else None. Every batch has these counts (`fresh_batch`
  splits rows over the segments deterministically)."""
  if not (data.get("fresh_examples", False) and data.get("group_by_length", True)):
    return None
  counts = mqar.fresh_rows_per_length(data["train_segments"], batch_size)
  return counts if len(counts) > 1 else None


def length_groups(batch: dict[str, Any]) -> list[dict[str, Any]] | None:
  """The length groups of a `group_by_length` batch as plain batches (ascending length), or None."""
  lengths = sorted({int(k.split(_GROUP)[1]) for k in batch if _GROUP in k})
  if not lengths:
    return None
  return [{key: batch[f"{key}{_GROUP}{l}"] for key in ("inputs", "labels", "weight")} for l in lengths]


def grouped_mqar_sums(model, batch: dict[str, jax.Array], k: int, dropout_key: jax.Array | None = None
                      ) -> dict[str, jax.Array]:
  """`mqar_sums` of a batch, plain or grouped by length (the groups' sums added, per-example arrays joined;
  group i's dropout key folds in i)."""
  groups = length_groups(batch)
  if groups is None:
    return mqar_sums(model, batch, k, dropout_key)
  parts = [mqar_sums(model, g, min(k, g["labels"].shape[-1]),
                     None if dropout_key is None else jax.random.fold_in(dropout_key, i))
           for i, g in enumerate(groups)]
  out = {key: sum(p[key] for p in parts) for key in ("loss_sum", "tokens", "acc_sum", "examples")}
  out.update({key: jnp.concatenate([p[key] for p in parts]) for key in ("acc_b", "weight_b")})
  return out



def build_split(config: Any, split: str, seed: int | None = None) -> mqar.MQARDataset:
  """The MQAR split ('train', 'validation', 'test') a resolved run config describes, drawn with the run's
  seed unless `seed` is given (each model of a population draws its own data)."""
  data = config.data
  return mqar.build_dataset(data[f"{split}_segments"], split=split, vocab_size=data.vocab_size,
                            seed=config.seed if seed is None else seed, power_a=data.power_a,
                            random_non_queries=data.random_non_queries)


def labelled_positions(labels_bl: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The first k labelled positions of each row (stable order), their labels and a validity mask."""
  order_bl = jnp.argsort(labels_bl == mqar.IGNORE_INDEX, axis=1, stable=True)
  positions_bk = order_bl[:, :k]
  labels_bk = jnp.take_along_axis(labels_bl, positions_bk, axis=1)
  return positions_bk, labels_bk, labels_bk != mqar.IGNORE_INDEX


def mqar_sums(model, batch: dict[str, jax.Array], k: int, dropout_key: jax.Array | None = None
              ) -> dict[str, jax.Array]:
  """Sums over the batch: CE over labelled tokens, token count, per-example accuracy, example count.
  `dropout_key`: the training forward's dropout (`zoo_jax.model`); None (evaluation): none."""
  positions_bk, labels_bk, mask_bk = labelled_positions(batch["labels"], k)
  if dropout_key is None:
    logits_bkv = model.logits_at(batch["inputs"], positions_bk)
  else:
    logits_bkv = model.logits_at(batch["inputs"], positions_bk, dropout_key=dropout_key)
  ce_bk = optax.softmax_cross_entropy_with_integer_labels(logits_bkv, jnp.where(mask_bk, labels_bk, 0))
  correct_bk = (jnp.argmax(logits_bkv, axis=-1) == labels_bk) & mask_bk
  n_labels_b = mask_bk.sum(axis=1)
  weight_b = batch.get("weight", jnp.ones(labels_bk.shape[0], jnp.float32)) * (n_labels_b > 0)
  acc_b = correct_bk.sum(axis=1) / jnp.maximum(n_labels_b, 1)
  return dict(loss_sum=(ce_bk * mask_bk).sum(), tokens=mask_bk.sum().astype(jnp.float32),
              acc_sum=(acc_b * weight_b).sum(), examples=weight_b.sum(), acc_b=acc_b, weight_b=weight_b)


def slice_accuracies(acc_n: np.ndarray, dataset: mqar.MQARDataset) -> dict[str, float]:
  """{'L<seq_len>_kv<num_kv_pairs>': mean accuracy} from per-example accuracies in dataset order."""
  return {f"L{seq_len}_kv{kv}": float(acc_n[(dataset.seq_len == seq_len) & (dataset.num_kv_pairs == kv)].mean())
          for seq_len, kv in dataset.slices()}


class MQARTask:
  """MQAR for a population: each model trains and is evaluated on the data of its own seed."""

  name = "mqar"

  def __init__(self, config: Any, seeds: list[int]):
    self.config = config
    self.seeds = list(seeds)
    by_seed = {s: {split: build_split(config, split, s) for split in ("train", "validation", "test")}
               for s in sorted(set(seeds))}
    self.sets = {split: [by_seed[s][split] for s in seeds] for split in ("train", "validation", "test")}
    train0 = self.sets["train"][0]
    self.batch_size = config.train.batch_size
    self.eval_batch_size = config.train.eval_batch_size
    if len(train0) < self.batch_size:  # the config check catches this first; kept for hand-made configs
      raise ValueError(f"train.batch_size ({self.batch_size}) exceeds the training examples ({len(train0)})")
    self.k = max(ds.max_labels_per_example for sets in self.sets.values() for ds in sets)
    self.steps_per_epoch = mqar.steps_per_epoch(len(train0), self.batch_size)
    self.epochs = config.train.epochs
    self.total_steps = self.steps_per_epoch * self.epochs
    self.tokens_per_step = self.batch_size * train0.inputs.shape[1]
    self.group_counts = length_group_counts(config.data, self.batch_size)
    if self.group_counts:
      self.tokens_per_step = sum(l * n for l, n in self.group_counts.items())  # real tokens, no padding
    self.early_stop_accuracy = config.train.early_stop_accuracy

  # Data.
  def _stacked(self, split: str, epoch: int, start: int = 0, shuffle: bool = True, drop_remainder: bool = True,
               batch_size: int | None = None):
    seeds = self.seeds if shuffle else [0] * len(self.seeds)
    iterators = [mqar.epoch_batches(ds, batch_size or self.batch_size, seed=s, epoch=epoch, start_step=start,
                                    shuffle=shuffle, drop_remainder=drop_remainder)
                 for ds, s in zip(self.sets[split], seeds)]
    for batches in zip(*iterators):
      yield _stack_population([{k: b[k] for k in ("inputs", "labels", "weight")} for b in batches])

  def train_batches(self, start_step: int):
    """Batches are a pure function of (seed, epoch, step): a resumed run sees the same batches. With
    `data.fresh_examples` each step's batch is new examples drawn from (seed, step) (`mqar.fresh_batch`);
    an epoch is then steps_per_epoch steps of the training segments' sizes, a validation interval."""
    if self.config.data.get("fresh_examples", False):
      data = self.config.data
      for step in range(start_step, self.total_steps):
        yield _stack_population([
            group_by_length(b) if self.group_counts else {k: b[k] for k in ("inputs", "labels", "weight")}
            for b in (mqar.fresh_batch(data.train_segments, self.batch_size, vocab_size=data.vocab_size, seed=s,
                                       step=step, power_a=data.power_a, random_non_queries=data.random_non_queries)
                      for s in self.seeds)])
      return
    first_epoch, first = divmod(start_step, self.steps_per_epoch)
    for epoch in range(first_epoch, self.epochs):
      yield from self._stacked("train", epoch, first if epoch == first_epoch else 0)

  def get_data_state(self):
    return None

  def set_data_state(self, state) -> None:
    del state

  # Loss and metrics.
  def loss(self, model, batch, dropout_key=None):
    sums = grouped_mqar_sums(model, batch, self.k, dropout_key)
    return sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0), sums

  def step_metrics(self, sums):
    return dict(accuracy=sums["acc_sum"] / jnp.maximum(sums["examples"], 1.0))

  def eval_sums(self, model, batch):
    return mqar_sums(model, batch, self.k)

  # Evaluation.
  def eval_due(self, step: int) -> bool:
    return step % self.steps_per_epoch == 0

  def evaluate(self, eval_step, params, split: str, sh) -> list[dict[str, Any]]:
    """Per model: loss, accuracy (mean over examples of per-example accuracy) and per-slice accuracy."""
    datasets = self.sets[split]
    n = len(datasets[0])
    loss_sum, tokens = np.zeros(len(datasets)), np.zeros(len(datasets))
    acc_parts, weight_parts = [], []
    for batch in self._stacked(split, 0, shuffle=False, drop_remainder=False, batch_size=self.eval_batch_size):
      m = jax.device_get(eval_step(params, sharding.put(batch, sh.batch)))
      loss_sum += np.asarray(m["loss_sum"], np.float64)
      tokens += np.asarray(m["tokens"], np.float64)
      acc_parts.append(np.asarray(m["acc_b"]))
      weight_parts.append(np.asarray(m["weight_b"]))
    acc_pn, weight_pn = np.concatenate(acc_parts, axis=1), np.concatenate(weight_parts, axis=1)
    out = []
    for i, ds in enumerate(datasets):
      acc_n = acc_pn[i][weight_pn[i] > 0][:n]
      out.append(dict(loss=float(loss_sum[i] / max(tokens[i], 1.0)), accuracy=float(acc_n.mean()),
                      slices=slice_accuracies(acc_n, ds)))
    return out

  def better(self, result, best) -> bool:
    return result["accuracy"] > best["accuracy"]

  def should_stop(self, result) -> bool:
    return result["accuracy"] > self.early_stop_accuracy

  # Records and lines.
  def epoch_of(self, step: int) -> int:
    return math.ceil(step / self.steps_per_epoch)

  def history_entry(self, step: int, result) -> dict[str, Any]:
    return dict(epoch=self.epoch_of(step), accuracy=result["accuracy"], loss=result["loss"])

  def validation_scalars(self, result) -> dict[str, float]:
    return {"validation/loss": result["loss"], "validation/accuracy": result["accuracy"],
            **{f"validation/slices/{s}": a for s, a in result["slices"].items()}}

  def log_extra(self, step: int) -> dict[str, Any]:
    return dict(epoch=self.epoch_of(step))

  def progress_text(self, step: int, s: dict[str, float]) -> str:
    aux = f" aux {s['aux_loss']:.4f}" if "aux_loss" in s else ""
    return (f"epoch {self.epoch_of(step)}/{self.epochs} step {step}/{self.total_steps} loss {s['loss']:.4f}{aux} "
            f"acc {s['accuracy']:.3f}")

  def validation_text(self, step: int, results, active) -> str:
    epoch = self.epoch_of(step)
    if len(results) == 1:
      r = results[0]
      return (f"epoch {epoch}: validation loss {r['loss']:.4f} accuracy {r['accuracy']:.4f} "
              + " ".join(f"{s}={a:.3f}" for s, a in r["slices"].items()))
    accs = " ".join(f"{r['accuracy']:.3f}" if a else "  -  " for r, a in zip(results, active))
    return f"epoch {epoch}/{self.epochs}: validation accuracy [{accs}] ({int(np.sum(active))} active)"


# ---------------------------------------------------------------------------------------------- LM


def token_logprobs(model, tokens_bl: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
  """log p(x_t | x_<t) for t = 1..l-1, (b, l-1) float32: the training loss is minus their mean, evaluation
  reports them. Logits are float32 (`LanguageModel.head`). With `model.cfg.loss_chunk` = c > 0 the head and
  the log-softmax run c positions at a time (a lax.map of a rematerialised chunk), so neither the forward
  nor the backward holds the (b, l, vocab) float32 logits; the same numbers up to float32 round-off.
  `dropout_key`: the training forward's dropout (`zoo_jax.model`); None (evaluation): none."""
  chunk = getattr(getattr(model, "cfg", None), "loss_chunk", 0)
  keyed = {} if dropout_key is None else dict(dropout_key=dropout_key)
  if not chunk:
    logits_blv = model(tokens_bl, **keyed)[:, :-1]
    return -optax.softmax_cross_entropy_with_integer_labels(logits_blv.astype(jnp.float32), tokens_bl[:, 1:])
  h_bld = model.hidden(tokens_bl, **keyed)[:, :-1]
  b, l, d = h_bld.shape
  chunk = min(chunk, l)
  n = -(-l // chunk)
  pad = ((0, 0), (0, n * chunk - l))
  h_nbcd = jnp.pad(h_bld, pad + ((0, 0),)).reshape(b, n, chunk, d).swapaxes(0, 1)
  targets_nbc = jnp.pad(tokens_bl[:, 1:], pad).reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint  # the backward recomputes each chunk's logits rather than keeping all of them
  def chunk_logprobs(h_bcd, targets_bc):
    logits_bcv = model.head(h_bcd).astype(jnp.float32)
    return -optax.softmax_cross_entropy_with_integer_labels(logits_bcv, targets_bc)

  logp_nbc = jax.lax.map(lambda args: chunk_logprobs(*args), (h_nbcd, targets_nbc))
  return logp_nbc.swapaxes(0, 1).reshape(b, n * chunk)[:, :l]


def all_rows(x: jax.Array) -> np.ndarray:
  """A data-sharded global array as one numpy array on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class LMTask:
  """Language modelling on packed rows. The models of a population read the same batches (the order of the
  first model's seed); each process reads only its rows of every global batch."""

  name = "lm"

  def __init__(self, config: Any, train_source, valid_source, seeds: list[int]):
    from zoo_jax.data import text  # pylint: disable=g-import-not-at-top
    self._text = text
    self.config = config
    self.population = len(seeds)
    self.train_source, self.valid_source = train_source, valid_source
    self.batch_size = config.train.batch_size
    self.eval_batch_size = config.train.eval_batch_size
    self.eval_max_rows = config.train.eval_max_rows
    self.eval_every = config.train.eval_every_steps
    self.seq_len = config.data.seq_len
    self.total_steps = config.train.steps
    self.tokens_per_step = self.batch_size * self.seq_len
    num_epochs = max(1, math.ceil((self.total_steps + 1) * self.batch_size / len(train_source)))
    self.batches = text.train_batches(train_source, batch_size=self.batch_size, seed=seeds[0],
                                      num_epochs=num_epochs, process_index=jax.process_index(),
                                      process_count=jax.process_count())
    self.record_batches: list | None = None  # test hook: (step, this process's tokens) of every batch

  # Data.
  def train_batches(self, start_step: int):
    step = start_step
    for batch in self.batches:
      if self.record_batches is not None:
        self.record_batches.append((step, batch["tokens"].copy()))
      step += 1
      yield {"tokens": np.broadcast_to(batch["tokens"], (self.population, *batch["tokens"].shape))}

  def get_data_state(self):
    return self.batches.get_state()

  def set_data_state(self, state) -> None:
    self.batches.set_state(state)

  # Loss and metrics.
  def loss(self, model, batch, dropout_key=None):
    logp_bl = token_logprobs(model, batch["tokens"], dropout_key)
    return -logp_bl.mean(), {}

  def step_metrics(self, sums):
    del sums
    return {}

  def eval_sums(self, model, batch):
    return dict(logprobs=token_logprobs(model, batch["tokens"]))

  # Evaluation.
  def eval_due(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.total_steps

  def evaluate(self, eval_step, params, split: str, sh, *, keep: bool = False) -> list[dict[str, Any]]:
    """Per model: mean NLL and perplexity over the split; with `keep`, also `token_rows` (N, l) and
    `logprob_rows` (N, l), NaN in column 0 (the layout of `zoo_jax.analysis.ar_hits.save_eval`)."""
    source = {"validation": self.valid_source, "train": self.train_source}[split]
    pi, pc = jax.process_index(), jax.process_count()
    nll, count = np.zeros(self.population), 0
    kept_tokens, kept_logprobs = [], []
    for batch in self._text.eval_batches(source, batch_size=self.eval_batch_size, max_rows=self.eval_max_rows,
                                         process_index=pi, process_count=pc):
      stacked = {k: np.broadcast_to(v, (self.population, *v.shape)) for k, v in batch.items()}
      global_batch = sharding.put(stacked, sh.batch)
      logp_pbl = np.asarray(eval_step(params, global_batch)["logprobs"])
      rows = all_rows(global_batch["weight"])[0] > 0
      nll -= logp_pbl[:, rows].sum(axis=(1, 2))
      count += int(rows.sum()) * logp_pbl.shape[2]
      if keep:
        kept_tokens.append(all_rows(global_batch["tokens"])[0][rows])
        kept_logprobs.append(logp_pbl[:, rows])
    out = []
    for i in range(self.population):
      loss = float(nll[i] / max(count, 1))
      r = dict(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=count)
      if keep:
        logp = np.concatenate([lp[i] for lp in kept_logprobs])
        r["token_rows"] = np.concatenate(kept_tokens).astype(np.int32)
        r["logprob_rows"] = np.concatenate([np.full((len(logp), 1), np.nan, np.float32), logp], 1).astype(np.float32)
      out.append(r)
    return out

  def better(self, result, best) -> bool:
    return result["loss"] < best["loss"]

  def should_stop(self, result) -> bool:
    del result
    return False

  # Records and lines.
  def history_entry(self, step: int, result) -> dict[str, Any]:
    del step
    return dict(loss=result["loss"], perplexity=result["perplexity"])

  def validation_scalars(self, result) -> dict[str, float]:
    return {"validation/loss": result["loss"], "validation/perplexity": result["perplexity"]}

  def log_extra(self, step: int) -> dict[str, Any]:
    del step
    return {}

  def progress_text(self, step: int, s: dict[str, float]) -> str:
    aux = f" aux {s['aux_loss']:.4f}" if "aux_loss" in s else ""
    return f"step {step}/{self.total_steps} loss {s['loss']:.4f}{aux} (ppl {math.exp(min(s['loss'], 700)):.1f})"

  def validation_text(self, step: int, results, active) -> str:
    del active
    r = results[0]
    return (f"step {step}: validation loss {r['loss']:.4f} perplexity {r['perplexity']:.2f} "
            f"({r['tokens']:,} tokens)")
