"""Does a language model use its context? Two diagnostics for induction heads (Olsson et al. 2022).

Dimension legend: n rows, l positions, h half of a repeated row, v vocabulary.

- `induction_score(model, ...)`: rows of h uniformly random tokens repeated once, [x_0 .. x_{h-1}, x_0 ..
  x_{h-1}]. The first copy is unpredictable (NLL ≈ log v for a model that has learned nothing from it); in
  the second, every token after its first, x_{h+j} for j >= 1, follows a token seen once before, so a model
  with induction heads (find the earlier occurrence of the current token, copy the token after it) predicts
  it. The score is mean NLL(first copy, positions 1..h-1) − mean NLL(second copy, positions h+1..2h-1), in
  nats: ~0 without in-context copying, up to ~log v with perfect copying. Position h (x_0 again, after
  x_{h-1}, a pair never seen) is in neither mean.
- `nll_by_position(logprobs_nl)`: mean NLL of real text by position in the row, in log2-spaced buckets
  [1, 2), [2, 4), ..., up to the row length. A model that uses long context gets better further into the
  row; a flat curve past the first few tokens says it does not.

Both read the model through `zoo_jax.tasks.token_logprobs` (the training loss's log-probabilities).
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx
import numpy as np

from zoo_jax import tasks


@dataclasses.dataclass(frozen=True)
class InductionScore:
  """Mean NLL (nats) of the first and second copy of repeated random rows; `score` = first − second."""
  nll_first: float
  nll_second: float
  rows: int
  half_len: int
  vocab_size: int

  @property
  def score(self) -> float:
    return self.nll_first - self.nll_second

  def text(self) -> str:
    return (f"induction: NLL first copy {self.nll_first:.3f}, second {self.nll_second:.3f} nats, score "
            f"{self.score:.3f} (log v = {math.log(self.vocab_size):.2f}; {self.rows} rows of 2 × {self.half_len})")


def _check_int(name: str, value, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  return int(value)


def repeated_random_rows(rows: int, half_len: int, vocab_size: int, seed: int = 0,
                         exclude: tuple[int, ...] = ()) -> np.ndarray:
  """(rows, 2·half_len) int32: each row h tokens drawn uniformly from [0, vocab_size) minus `exclude`
  (e.g. the end-of-text token), then the same h tokens again."""
  rows = _check_int("rows", rows, 1)
  half_len = _check_int("half_len", half_len, 2)
  vocab_size = _check_int("vocab_size", vocab_size, 2)
  allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(exclude, dtype=np.int64))
  if allowed.size < 2:
    raise ValueError(f"exclude must leave at least 2 of the vocab_size={vocab_size} tokens, got {exclude!r}")
  half_nh = np.random.default_rng(seed).choice(allowed, size=(rows, half_len))
  return np.concatenate([half_nh, half_nh], axis=1).astype(np.int32)


def induction_score(model, vocab_size: int, rows: int = 16, half_len: int = 256, seed: int = 0,
                    exclude: tuple[int, ...] = (), batch_size: int = 8,
                    halves_nh: np.ndarray | None = None) -> InductionScore:
  """`InductionScore` of `model` (a LanguageModel, or any nnx module giving (b, l, v) logits) on `rows`
  repeated random rows of 2 × `half_len` tokens (module docstring); `vocab_size`: the tokens drawn from.

  `halves_nh`: (n, h) first copies to use instead of random tokens (e.g. held-out text: the score is then
  what copying earns on text, where a bigram model already predicts part of the first copy); `rows`,
  `half_len`, `seed` and `exclude` are then unused."""
  batch_size = _check_int("batch_size", batch_size, 1)
  if halves_nh is None:
    tokens_nl = repeated_random_rows(rows, half_len, vocab_size, seed, exclude)
  else:
    halves_nh = np.asarray(halves_nh)
    if halves_nh.ndim != 2 or halves_nh.shape[1] < 2 or not np.issubdtype(halves_nh.dtype, np.integer):
      raise ValueError(f"halves must be integer tokens of shape (rows, half_len >= 2), got {halves_nh.dtype} "
                       f"{halves_nh.shape}")
    half_len = halves_nh.shape[1]
    tokens_nl = np.concatenate([halves_nh, halves_nh], axis=1).astype(np.int32)
  logprobs = nnx.jit(tasks.token_logprobs)
  # token_logprobs' column j is position j + 1: first copy = positions 1..h-1, second = h+1..2h-1.
  lp_nl = np.concatenate([np.asarray(logprobs(model, tokens_nl[i:i + batch_size]))
                          for i in range(0, len(tokens_nl), batch_size)])
  return InductionScore(nll_first=float(-lp_nl[:, :half_len - 1].mean()),
                        nll_second=float(-lp_nl[:, half_len:].mean()), rows=len(tokens_nl), half_len=half_len,
                        vocab_size=vocab_size)


def nll_by_position(logprobs_nl: np.ndarray) -> list[tuple[int, int, float]]:
  """[(start, stop, mean NLL over positions start..stop-1 of every row)] in log2-spaced buckets [1, 2), [2,
  4), ..., the last cut at the row length. `logprobs_nl`: log p(x_t | x_<t) at column t, column 0 NaN (the
  layout of `zoo_jax.analysis.ar_hits.save_eval`); NaN entries (positions not evaluated) are skipped."""
  logprobs_nl = np.asarray(logprobs_nl, dtype=np.float64)
  if logprobs_nl.ndim != 2 or logprobs_nl.shape[1] < 2:
    raise ValueError(f"logprobs must be (rows, positions >= 2), got shape {logprobs_nl.shape}")
  length = logprobs_nl.shape[1]
  out = []
  start = 1
  while start < length:
    stop = min(2 * start, length)
    block = logprobs_nl[:, start:stop]
    out.append((start, stop, float(-np.nanmean(block)) if (~np.isnan(block)).any() else math.nan))
    start = stop
  return out
