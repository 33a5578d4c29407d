"""MQAR recall measured by generation, against MQARTask's teacher-forced accuracy.

Training and `zoo_jax.tasks.MQARTask` score recall teacher-forced: one parallel forward over the whole
example, the argmax of the logits at each query position. Here the same examples are answered by
generation (`zoo_jax.generate`: a prefill through the parallel forms, then each mixer's recurrent `step`):

- `accuracy_by_generation` (prefill per query): for each query, the example up to and including its key
  is the prompt and the greedy next token is the answer. The model sees exactly the teacher-forced prefix,
  so the accuracy equals MQARTask's for the same parameters; it checks that prefill is the parallel form.
- `accuracy_with_generated_answers` ("recall with generation"): the context is prefilled once, then the
  model runs token by token through the query region, queries and filler given, and the token after each
  query is its own answer to that query (`feed='model'`), so its answers are part of the sequence it reads
  next. `feed='labels'` writes the true values there instead, and `feed='data'` keeps the dataset's tokens
  (then it is the teacher-forced accuracy again, through `step`). Zoology's MQAR puts a filler token, not
  the value, after each query, so `model` and `labels` show the model a sequence it was not trained on.

Accuracy is MQARTask's: per example, the fraction of its queries answered right; the mean over examples
(rows without queries, such as padding, left out).

Dimension legend: n examples, l sequence length, b batch.
"""

import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from zoo_jax import generate as generate_lib
from zoo_jax import tasks
from zoo_jax.data import mqar

FEEDS = ("model", "labels", "data")


def mean_example_accuracy(correct_nl: np.ndarray, labels_nl: np.ndarray) -> float:
  """MQARTask's accuracy: per example, right answers / queries; the mean over examples with queries."""
  queries_n = (labels_nl != mqar.IGNORE_INDEX).sum(axis=1)
  right_n = (correct_nl & (labels_nl != mqar.IGNORE_INDEX)).sum(axis=1)
  has = queries_n > 0
  return float((right_n[has] / queries_n[has]).mean())


def teacher_forced_accuracy(model, dataset: mqar.MQARDataset, batch_size: int = 256) -> float:
  """MQARTask's accuracy (`tasks.mqar_sums`: one forward, argmax at the labelled positions)."""
  k = dataset.max_labels_per_example
  step = nnx.jit(lambda m, x, y: tasks.mqar_sums(m, dict(inputs=x, labels=y), k))
  acc_sum = examples = 0.0
  for start in range(0, len(dataset), batch_size):
    sums = step(model, jnp.asarray(dataset.inputs[start:start + batch_size]),
                jnp.asarray(dataset.labels[start:start + batch_size]))
    acc_sum, examples = acc_sum + float(sums["acc_sum"]), examples + float(sums["examples"])
  return acc_sum / max(examples, 1.0)


def answers_by_generation(model, inputs_nl: np.ndarray, labels_nl: np.ndarray,
                          batch_size: int = 64) -> np.ndarray:
  """(n, l) the greedy answer to each query, generated from the prompt inputs[:q+1]; IGNORE_INDEX elsewhere.

  Queries are grouped by position (one compiled program per prompt length), batches padded to
  `batch_size` rows so every batch of a length has the same shape."""
  answers_nl = np.full(labels_nl.shape, mqar.IGNORE_INDEX, np.int32)
  rows, positions = np.nonzero(labels_nl != mqar.IGNORE_INDEX)
  for q in np.unique(positions):
    at_q = rows[positions == q]
    for start in range(0, len(at_q), batch_size):
      chunk = at_q[start:start + batch_size]
      padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
      tokens_b1 = generate_lib.generate(model, jnp.asarray(inputs_nl[padded, :q + 1]), 1)
      answers_nl[chunk, q] = np.asarray(tokens_b1)[:len(chunk), 0]
  return answers_nl


def accuracy_by_generation(model, dataset: mqar.MQARDataset, batch_size: int = 64) -> float:
  """MQAR accuracy with each answer generated from the example up to and including its query key."""
  answers_nl = answers_by_generation(model, dataset.inputs, dataset.labels, batch_size)
  return mean_example_accuracy(answers_nl == dataset.labels, dataset.labels)


@functools.partial(nnx.jit, static_argnames=("prefill", "feed"))
def _answer_in_sequence(model, inputs_bl, labels_bl, *, prefill: int, feed: str):
  """Prefill inputs[:, :prefill], then step through the rest; after a query, feed the answer chosen by
  `feed`. Returns the greedy prediction at every position from prefill - 1 on, (b, l - prefill + 1)."""
  h_bld, state = model.hidden(inputs_bl[:, :prefill], return_state=True)
  first_b = jnp.argmax(model.head(h_bld[:, -1:])[:, 0], axis=-1).astype(jnp.int32)
  is_query_bl = labels_bl != mqar.IGNORE_INDEX

  def decode(carry, xs):
    state, prev_pred_b = carry
    data_b, after_query_b, label_before_b = xs
    if feed == "model":
      token_b = jnp.where(after_query_b, prev_pred_b, data_b)
    elif feed == "labels":
      token_b = jnp.where(after_query_b, label_before_b, data_b)
    else:
      token_b = data_b
    state, logits_bv = model.step(state, token_b)
    pred_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return (state, pred_b), pred_b

  xs = (inputs_bl[:, prefill:].T, is_query_bl[:, prefill - 1:-1].T, labels_bl[:, prefill - 1:-1].T)
  _, preds_lb = jax.lax.scan(decode, (state, first_b), xs)
  return jnp.concatenate([first_b[:, None], preds_lb.T], axis=1)


def answers_in_sequence(model, inputs_nl: np.ndarray, labels_nl: np.ndarray, *, feed: str = "model",
                        batch_size: int = 64) -> np.ndarray:
  """(n, l) the greedy answer at each query position when the sequence is read token by token after the
  context, the token after each query replaced as `feed` says (the module docstring); IGNORE_INDEX elsewhere."""
  if feed not in FEEDS:
    raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
  n, l = inputs_nl.shape
  generate_lib.check_capacity(model, l, 0)
  is_query_nl = labels_nl != mqar.IGNORE_INDEX
  # The prefill ends with the earliest query key of any example: no answer is fed back before it.
  first_query = int(np.argmax(is_query_nl, axis=1)[is_query_nl.any(axis=1)].min())
  prefill = first_query + 1
  preds_nl = np.zeros((n, l), np.int32)
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
    preds_bl = _answer_in_sequence(model, jnp.asarray(inputs_nl[padded]),
                                   jnp.asarray(labels_nl[padded]), prefill=prefill, feed=feed)
    preds_nl[rows, prefill - 1:] = np.asarray(preds_bl)[:len(rows)]
  return np.where(is_query_nl, preds_nl, mqar.IGNORE_INDEX)


def accuracy_with_generated_answers(model, dataset: mqar.MQARDataset, *, feed: str = "model",
                                    batch_size: int = 64) -> float:
  """MQAR accuracy when the model writes its own answers into the sequence ("recall with generation")."""
  answers_nl = answers_in_sequence(model, dataset.inputs, dataset.labels, feed=feed, batch_size=batch_size)
  return mean_example_accuracy(answers_nl == dataset.labels, dataset.labels)


def evaluate_workdir(workdir: str, split: str = "test") -> dict[str, Any]:
  """Every accuracy of this module for a finished (or interrupted) MQAR run's best parameters."""
  from zoo_jax import checkpoint  # pylint: disable=g-import-not-at-top
  model, config = checkpoint.load_for_inference(workdir)
  dataset = tasks.build_split(config, split)
  return dict(teacher_forced=teacher_forced_accuracy(model, dataset),
              by_generation=accuracy_by_generation(model, dataset),
              **{f"generated_answers_feed_{feed}": accuracy_with_generated_answers(model, dataset, feed=feed)
                 for feed in FEEDS})
