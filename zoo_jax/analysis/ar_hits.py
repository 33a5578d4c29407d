r"""AR hits: the split of language-model perplexity behind Zoology's Table 1 (Arora et al. 2024, Section 3).

Dimension legend: n sequences (evaluation contexts), l positions, v vocabulary, u distinct bigrams.

**Definition** (the paper's Table 1). In an evaluated sequence x_0 .. x_{l-1}, token x_t (t >= 1) is an
*AR hit* when

  (1) the bigram (x_{t-1}, x_t) occurred earlier in the same context: (x_{s-1}, x_s) = (x_{t-1}, x_t) for
      some 1 <= s < t, and
  (2) the bigram is rare in the training data: its count c(x_{t-1}, x_t) in the tokens the model trained on
      is below a threshold tau (the paper: fewer than 1,250 occurrences in 10B training tokens).

Such a token can be predicted by looking the bigram up in context (associative recall) but not from
memorised bigram statistics. Position 0 never is a hit (no previous token), nor is a position that was not
evaluated (NaN log-probability).

**The context is the document, not the packed row.** Evaluation rows are packed: several documents, each
ended by the end-of-text token (EOT, `zoo_jax.data.text.pack`). With an `eot_id` (recorded in the bigram
counts by experiments/lm.py, `BigramCounts.eot_id`), the context of x_t is its own document within the
row: the positions after the last EOT before t. So (1) needs the earlier occurrence after that EOT (a bigram
seen only in an earlier document of the row does not count); a bigram across a boundary, (EOT, x), is never
a hit, and neither is the EOT itself (the bigram ending in it, (y, EOT), cannot recur within its document).
A document cut by the row's start has only its part inside the row as context (the model saw no more). With
`eot_id` None (counts written before it was recorded) the context is the whole row, as before.

**Slices.** With lp_t = log p(x_t | x_{<t}) under the model and E the evaluated positions, for a slice
S ⊆ E (AR hits H, other tokens E \ H, all E):  mean log-probability  (1/|S|) Σ_{t∈S} lp_t,  mean NLL
l_S = −that,  perplexity exp(l_S),  share |S| / |E|.  AR hits are further bucketed by the bigram's
training count c: {0}, {1}, [2, 3], [4, 7], ..., [2^k, tau − 1] (log2-spaced, count 0 on its own: bigrams
never seen in training are pure in-context recall).

**Share of the gap explained by AR hits** (paper, Section 3; M the attention/reference model, m the other):

  explained = min( (l_H^m − l_H^M) · p_H / (l^m − l^M), 1 ),

with l the mean NLL over all evaluated tokens, l_H over AR hits and p_H the AR-hit share (the same for both
models: both are evaluated on the same tokens with the same AR-hit mask). The ratio is a ratio of log-
probability differences, so the slices' token counts cancel except through p_H. When m is not worse than M
overall (l^m − l^M <= `GAP_TOLERANCE` nats) the formula would divide by ~0 or by a negative number; the
paper ascribes 100% to AR hits if m is nevertheless worse on AR hits, and we do the same, returning the
case explicitly (`GapExplained.reason`); if m is better on both there is no gap to explain (value None).

**Threshold for small corpora.** The paper's tau = 1,250 in 10B tokens is a rate of 1.25e-7 per training
token (`PAPER_THRESHOLD_RATE`). Scaled by rate alone it is meaningless below ~10M tokens (0.225 for the
embedded 1.8M-token Shakespeare corpus, i.e. "never seen", which would also count a bigram seen once as
frequent). `scaled_threshold(num_tokens)` = max(floor, round(rate · num_tokens)) with floor
`DEFAULT_THRESHOLD_FLOOR` = 10: it gives 1,250 for 10B tokens (the paper), 125 for 1B, 12 for 100M and the
floor, 10, for every corpus under 84M tokens, including the 1.8M-token Shakespeare corpus. A bigram seen
fewer than 10 times is one a small model cannot have memorised as a bigram statistic. Measured on the
embedded corpus (GPT-2 tokens; training on 35 plays, 1.65M tokens; Hamlet, The Tempest and Twelfth Night
held out, in windows of 512 / 1,024 tokens): 32% / 36% of held-out tokens repeat a bigram of their window,
and AR hits are 4.2% / 5.0% of held-out tokens at tau = 10 (3.6% / 4.2% at tau = 1, i.e. bigrams never
seen in training, mostly names; 5.7% / 6.9% at tau = 100); experiments/lm.py's validation split (rows of
256) gives 3.8-4.0% at tau = 10, against 6.4% on the Pile in the paper. The threshold is always printed and
can be overridden (`ar_gap.py --threshold`).

**Which training tokens are counted.** Exactly those the model trained on: experiments/lm.py replays the
loader (`zoo_jax.data.text.train_batches`, deterministic given the run's seed) over the steps the run
actually trained (summary.json's `steps`, so a resumed run is counted once, through its last step), every
row of each global batch (all processes' rows), and counts those batches only (`zoo_jax.lm.count_trained_
bigrams`) — not the whole training split (the tiny preset trains on 0.25M of its 1.65M tokens). Bigrams
are counted within each packed row as trained, *including* those across a document boundary, (EOT, x)
and (y, EOT): the model saw them, and neither kind can be an AR hit (above), so they never change a hit.
`num_tokens` is the tokens trained on, which scales the threshold.

**Bigram counts** are int64 codes prev · v + next, reduced by `np.unique` per chunk of ~4M bigrams; the
chunk tables are merged by a stable sort of two sorted runs (a linear merge) whenever the older table is at
most twice the newer (a binary-counter schedule: O(log) merges per bigram rather than one pass over the
whole table per chunk). A corpus streamed document by document holds at most a few times the final table
and one chunk; bigrams are counted within each sequence only.

Differences from the paper: Zoology released no code for this analysis; the definition above follows the
paper's text. "The same context" is the part of the source document inside the evaluated row (the model's
context is the whole row, so it could also recall from an earlier document of the row; those repeats are
not counted as hits, they fall in "other").
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterable

import numpy as np

PAPER_THRESHOLD_RATE = 1250 / 10e9  # fewer than 1,250 occurrences in 10B training tokens
DEFAULT_THRESHOLD_FLOOR = 10
GAP_TOLERANCE = 1e-6  # nats; an overall gap at most this is "no gap"
_CHUNK_BIGRAMS = 1 << 22  # bigrams buffered before a reduction (32 MiB of int64 codes)


def _check_vocab_size(vocab_size) -> int:
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or not (
      1 <= vocab_size <= 3_037_000_499):  # v² must fit in int64
    raise ValueError(f"vocab_size must be an integer in [1, 3037000499], got {vocab_size!r}")
  return int(vocab_size)


def _check_tokens(tokens: np.ndarray, vocab_size: int, name: str) -> None:
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {tokens.dtype}")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(f"{name} must be token ids in [0, {vocab_size}), got values in "
                     f"[{tokens.min()}, {tokens.max()}]")


def _row_codes(rows_nl: np.ndarray, vocab_size: int) -> np.ndarray:
  """Bigram codes prev · v + next within each row: (n, l) -> (n, l - 1) int64."""
  rows_nl = rows_nl.astype(np.int64, copy=False)
  return rows_nl[:, :-1] * vocab_size + rows_nl[:, 1:]


def _merge(codes_a, counts_a, codes_b, counts_b):
  """Sum two (sorted unique codes, counts) tables into one."""
  if not codes_a.size:
    return codes_b, counts_b
  if not codes_b.size:
    return codes_a, counts_a
  codes = np.concatenate([codes_a, codes_b])
  counts = np.concatenate([counts_a, counts_b])
  order = np.argsort(codes, kind="stable")  # two sorted runs: a linear merge
  codes, counts = codes[order], counts[order]
  starts = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]]))
  return codes[starts], np.add.reduceat(counts, starts)


def _read_npz(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  """The named arrays of an .npz file; a missing, unreadable or incomplete file is an error naming it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found")
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [k for k in keys if k not in data.files]
      if missing:
        raise ValueError(f"{path} lacks the arrays {missing} (has {sorted(data.files)})")
      return {k: data[k] for k in keys}
  except (OSError, EOFError) as e:
    raise ValueError(f"{path} is not a readable .npz file: {e}") from e
  except ValueError as e:
    if str(e).startswith(path):
      raise
    raise ValueError(f"{path} is not a readable .npz file: {e}") from e


def _read_optional(path: str, key: str) -> np.ndarray | None:
  """The array `key` of a readable .npz file (`_read_npz` has opened it), or None if it has none."""
  with np.load(path, allow_pickle=False) as data:
    return data[key] if key in data.files else None


def _check_eot_id(eot_id, vocab_size: int) -> int | None:
  if eot_id is None:
    return None
  if isinstance(eot_id, bool) or not isinstance(eot_id, (int, np.integer)) or not 0 <= eot_id < vocab_size:
    raise ValueError(f"eot_id must be None or a token id in [0, {vocab_size}), got {eot_id!r}")
  return int(eot_id)


def _write_npz(path: str, **arrays) -> None:
  """Writes exactly `path` (no '.npz' appended), atomically: a crash leaves the old file or none."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- Bigram counts


@dataclasses.dataclass
class BigramCounts:
  """Counts of bigrams (prev, next) in a corpus: `codes` = prev · vocab_size + next, sorted and unique (u,),
  `counts` (u,) their occurrences, `num_tokens` the tokens counted, `eot_id` the end-of-text token that
  separates documents in the counted rows and the evaluated ones (None: unknown, rows are contexts)."""
  codes: np.ndarray
  counts: np.ndarray
  vocab_size: int
  num_tokens: int
  eot_id: int | None = None

  def __post_init__(self):
    self.vocab_size = _check_vocab_size(self.vocab_size)
    self.eot_id = _check_eot_id(self.eot_id, self.vocab_size)
    self.codes = np.asarray(self.codes, np.int64)
    self.counts = np.asarray(self.counts, np.int64)
    self.num_tokens = int(self.num_tokens)
    if self.codes.ndim != 1 or self.codes.shape != self.counts.shape:
      raise ValueError(f"codes and counts must be 1-D of equal length, got shapes {self.codes.shape} and "
                       f"{self.counts.shape}")
    if (np.diff(self.codes) <= 0).any() or (self.counts < 0).any():
      raise ValueError("codes must be sorted and unique and counts non-negative (a BigramCounts table)")

  @property
  def num_bigrams(self) -> int:
    """Bigram occurrences counted (sum of counts)."""
    return int(self.counts.sum())

  def count_of(self, prev, next_) -> np.ndarray:
    """Training count of each bigram (prev, next) (broadcast arrays of token ids); 0 when never seen."""
    prev, next_ = np.asarray(prev), np.asarray(next_)
    _check_tokens(prev, self.vocab_size, "prev")
    _check_tokens(next_, self.vocab_size, "next")
    code = prev.astype(np.int64) * self.vocab_size + next_
    if not self.codes.size:
      return np.zeros(code.shape, np.int64)
    idx = np.minimum(np.searchsorted(self.codes, code), self.codes.size - 1)
    return np.where(self.codes[idx] == code, self.counts[idx], 0)

  def merge(self, other: BigramCounts) -> BigramCounts:
    """The counts of both corpora (e.g. per-host shards of the training split)."""
    if other.vocab_size != self.vocab_size:
      raise ValueError(f"cannot merge bigram counts over vocabularies of {self.vocab_size} and "
                       f"{other.vocab_size} tokens")
    if other.eot_id != self.eot_id:
      raise ValueError(f"cannot merge bigram counts with end-of-text tokens {self.eot_id} and {other.eot_id}")
    codes, counts = _merge(self.codes, self.counts, other.codes, other.counts)
    return BigramCounts(codes, counts, self.vocab_size, self.num_tokens + other.num_tokens, self.eot_id)

  def save(self, path: str) -> None:
    eot = {} if self.eot_id is None else {"eot_id": np.int64(self.eot_id)}
    _write_npz(path, codes=self.codes, counts=self.counts, vocab_size=np.int64(self.vocab_size),
               num_tokens=np.int64(self.num_tokens), **eot)

  @classmethod
  def load(cls, path: str) -> BigramCounts:
    data = _read_npz(path, ("codes", "counts", "vocab_size", "num_tokens"))
    eot_id = _read_optional(path, "eot_id")  # absent in counts written before it was recorded
    try:
      return cls(data["codes"], data["counts"], int(data["vocab_size"]), int(data["num_tokens"]),
                 None if eot_id is None else int(eot_id))
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e


def _as_rows(item) -> np.ndarray:
  rows = np.asarray(item)
  if rows.ndim == 1:
    rows = rows[None]
  if rows.ndim != 2:
    raise ValueError(f"sequences must be 1-D token arrays (or 2-D batches of rows), got shape {rows.shape}")
  return rows


def count_bigrams(sequences, vocab_size: int, eot_id: int | None = None) -> BigramCounts:
  """Counts the bigrams of `sequences` within each sequence (never across two).

  `sequences`: a 2-D int array (n, l), or an iterable (e.g. a generator, streamed) of 1-D int arrays
  (documents or packed chunks of any lengths; a 2-D item is a batch of rows). Memory: the table of distinct
  bigrams plus one chunk of ~4M codes. `eot_id` is recorded (it decides the contexts of `analyze`), not
  used: bigrams across a document boundary are counted (module docstring).
  """
  vocab_size = _check_vocab_size(vocab_size)
  eot_id = _check_eot_id(eot_id, vocab_size)
  if isinstance(sequences, np.ndarray):
    if sequences.ndim not in (1, 2):
      raise ValueError(f"sequences must be a 2-D (n, l) array or an iterable of 1-D arrays, got shape "
                       f"{sequences.shape}")
    rows = _as_rows(sequences)
    step = max(1, _CHUNK_BIGRAMS // max(1, rows.shape[1]))
    items: Iterable = (rows[i:i + step] for i in range(0, rows.shape[0], step))
  else:
    items = sequences
  tables = []  # (codes, counts) of decreasing sizes: merged like a binary counter, O(log) merges per bigram
  buffer, buffered, num_tokens = [], 0, 0

  def reduce():
    nonlocal buffer, buffered
    chunk_codes, chunk_counts = np.unique(np.concatenate(buffer), return_counts=True)
    tables.append((chunk_codes, chunk_counts.astype(np.int64)))
    while len(tables) >= 2 and tables[-2][0].size <= 2 * tables[-1][0].size:
      tables.append(_merge(*tables.pop(-2), *tables.pop()))
    buffer, buffered = [], 0

  for item in items:
    rows = _as_rows(item)
    _check_tokens(rows, vocab_size, "sequences")
    num_tokens += rows.size
    if rows.shape[1] < 2:
      continue
    buffer.append(_row_codes(rows, vocab_size).ravel())
    buffered += buffer[-1].size
    if buffered >= _CHUNK_BIGRAMS:
      reduce()
  if buffer:
    reduce()
  codes, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
  while tables:
    codes, counts = _merge(*tables.pop(), codes, counts)
  return BigramCounts(codes, counts, vocab_size, num_tokens, eot_id)


# ------------------------------------------------------------------------------------- Evaluation files


def _check_eval(tokens: np.ndarray, logprobs: np.ndarray) -> None:
  if tokens.ndim != 2 or tokens.shape != logprobs.shape:
    raise ValueError(f"tokens and logprobs must be 2-D (n, l) of the same shape, got {tokens.shape} and "
                     f"{logprobs.shape}")
  if not np.issubdtype(tokens.dtype, np.integer) or (tokens.size and tokens.min() < 0):
    raise ValueError(f"tokens must be non-negative integer token ids, got dtype {tokens.dtype}")
  if not np.issubdtype(logprobs.dtype, np.floating):
    raise ValueError(f"logprobs must be a float array, got dtype {logprobs.dtype}")
  evaluated = logprobs[~np.isnan(logprobs)]
  if evaluated.size and (np.isposinf(evaluated).any() or evaluated.max() > 1e-3):
    raise ValueError(f"logprobs must be log-probabilities (<= 0; NaN where not evaluated), got a maximum "
                     f"of {evaluated.max()} (negative log-likelihoods passed by mistake?)")


def save_eval(path: str, tokens, logprobs) -> None:
  """Writes an evaluation: `tokens` (n, l) and `logprobs` (n, l), logprobs[:, t] = log p(tokens[:, t] |
  tokens[:, :t]) under the model, NaN where not evaluated (column 0 at least). Stored as int32 / float32."""
  tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
  _check_eval(tokens, logprobs)
  _write_npz(path, tokens=tokens.astype(np.int32), logprobs=logprobs.astype(np.float32))


def load_eval(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 (n, l), logprobs float32 (n, l)) as written by `save_eval`."""
  data = _read_npz(path, ("tokens", "logprobs"))
  try:
    _check_eval(data["tokens"], data["logprobs"])
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return data["tokens"], data["logprobs"]


# ------------------------------------------------------------------------------------------ AR-hit mask


def scaled_threshold(num_tokens: int, rate: float = PAPER_THRESHOLD_RATE,
                     floor: int = DEFAULT_THRESHOLD_FLOOR) -> int:
  """The AR-hit count threshold for a training split of `num_tokens` tokens: max(floor, round(rate ·
  num_tokens)); 1,250 for the paper's 10B tokens, `floor` (10) below 84M tokens (see the module docstring)."""
  if not num_tokens >= 0:
    raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
  if not 0 <= rate < 1:
    raise ValueError(f"rate must be in [0, 1), got {rate}")
  if isinstance(floor, bool) or not isinstance(floor, (int, np.integer)) or floor < 1:
    raise ValueError(f"floor must be an integer >= 1, got {floor!r}")
  return max(int(floor), int(round(rate * num_tokens)))


def _check_threshold(threshold) -> int:
  if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or threshold < 1:
    raise ValueError(f"threshold must be an integer >= 1 (a bigram is rare when its training count is below "
                     f"it), got {threshold!r}")
  return int(threshold)


def seen_earlier_mask(tokens, eot_id: int | None = None) -> np.ndarray:
  """(n, l) bool: the bigram (tokens[:, t-1], tokens[:, t]) occurred at some earlier position s < t of the
  same row (condition (1)), and, with `eot_id`, of the same document: after the last `eot_id` before t,
  neither token of the bigram an `eot_id` (module docstring). False in column 0.

  Per row, a stable sort of the bigram codes (by document, then code) keeps equal ones in position order, so
  every occurrence but the first follows an equal one in sorted order: O(n l log l), no loop over tokens.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be a 2-D (n, l) integer array, got shape {tokens.shape} dtype {tokens.dtype}")
  mask = np.zeros(tokens.shape, bool)
  if tokens.shape[1] < 3 or tokens.shape[0] == 0:
    return mask
  _check_tokens(tokens, int(tokens.max()) + 1, "tokens")
  codes = _row_codes(tokens, int(tokens.max()) + 1)
  if eot_id is None:
    order = np.argsort(codes, axis=1, kind="stable")
    keys = (codes,)
  else:
    is_eot = tokens == eot_id
    doc_nl = np.cumsum(is_eot, axis=1) - is_eot  # EOTs before t: an EOT belongs to the document it ends
    doc = doc_nl[:, 1:]  # the document of the bigram's second token
    order = np.lexsort((codes, doc), axis=-1)  # by document, then code; stable: positions in order
    keys = (codes, doc)
  repeat_sorted = np.zeros(codes.shape, bool)
  repeat_sorted[:, 1:] = True
  for key in keys:
    sorted_key = np.take_along_axis(key, order, axis=1)
    repeat_sorted[:, 1:] &= sorted_key[:, 1:] == sorted_key[:, :-1]
  repeat = np.empty_like(repeat_sorted)
  np.put_along_axis(repeat, order, repeat_sorted, axis=1)
  if eot_id is not None:
    repeat &= ~is_eot[:, :-1] & ~is_eot[:, 1:]  # (EOT, x) spans a boundary; the EOT itself is no hit
  mask[:, 1:] = repeat
  return mask


def _training_counts(tokens: np.ndarray, counts: BigramCounts) -> np.ndarray:
  """(n, l) int64: training count of the bigram ending at each position; 0 in column 0."""
  out = np.zeros(tokens.shape, np.int64)
  if tokens.shape[1] >= 2:
    out[:, 1:] = counts.count_of(tokens[:, :-1], tokens[:, 1:])
  return out


def ar_hit_mask(tokens, counts: BigramCounts, threshold: int) -> np.ndarray:
  """(n, l) bool: AR hits, i.e. bigram seen earlier in the context (1) — the document within the row when
  `counts.eot_id` is set — and training count < threshold (2)."""
  threshold = _check_threshold(threshold)
  tokens = np.asarray(tokens)
  _check_tokens(tokens, counts.vocab_size, "tokens")
  return seen_earlier_mask(tokens, counts.eot_id) & (_training_counts(tokens, counts) < threshold)


# -------------------------------------------------------------------------------------------- Statistics


@dataclasses.dataclass(frozen=True)
class SliceStats:
  """Log-probability statistics of one slice of the evaluated tokens (NaN means for an empty slice)."""
  num_tokens: int
  share: float  # of all evaluated tokens
  mean_logprob: float
  mean_nll: float
  perplexity: float

  @classmethod
  def of(cls, logprobs: np.ndarray, mask: np.ndarray, num_evaluated: int) -> SliceStats:
    selected = logprobs[mask].astype(np.float64)
    n = int(selected.size)
    mean_logprob = float(selected.mean()) if n else math.nan
    return cls(num_tokens=n, share=n / num_evaluated if num_evaluated else math.nan,
               mean_logprob=mean_logprob, mean_nll=-mean_logprob,
               perplexity=math.inf if -mean_logprob >= 700 else math.exp(-mean_logprob))


@dataclasses.dataclass(frozen=True)
class BucketStats:
  """AR hits whose bigram's training count c is in [min_count, max_count]."""
  min_count: int
  max_count: int
  stats: SliceStats  # stats.share: of all evaluated tokens
  share_of_hits: float

  @property
  def label(self) -> str:
    return str(self.min_count) if self.min_count == self.max_count else f"{self.min_count}-{self.max_count}"


def frequency_buckets(threshold: int) -> list[tuple[int, int]]:
  """Inclusive count ranges covering [0, threshold): {0}, {1}, [2, 3], [4, 7], ..., [2^k, threshold - 1]."""
  threshold = _check_threshold(threshold)
  buckets, lo = [(0, 0)], 1
  while lo < threshold:
    buckets.append((lo, min(2 * lo - 1, threshold - 1)))
    lo *= 2
  return buckets


@dataclasses.dataclass(frozen=True)
class ArHitReport:
  """The AR-hit split of one model's evaluation: slices 'ar_hits', 'other', 'all' and AR-hit buckets."""
  threshold: int
  slices: dict[str, SliceStats]
  buckets: tuple[BucketStats, ...]

  def to_dict(self) -> dict:
    return {"threshold": self.threshold,
            "slices": {k: dataclasses.asdict(v) for k, v in self.slices.items()},
            "buckets": [{"label": b.label, "min_count": b.min_count, "max_count": b.max_count,
                         "share_of_hits": b.share_of_hits, **dataclasses.asdict(b.stats)}
                        for b in self.buckets]}


def analyze(tokens, logprobs, counts: BigramCounts, threshold: int | None = None) -> ArHitReport:
  """Splits one model's log-probabilities on `tokens` into AR hits / other / all (module docstring).

  threshold: bigrams with a training count below it can be AR hits; None = `scaled_threshold` of the
  training tokens counted (`counts.num_tokens`). Contexts are documents when `counts.eot_id` is set.
  """
  tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
  _check_eval(tokens, logprobs)
  threshold = scaled_threshold(counts.num_tokens) if threshold is None else _check_threshold(threshold)
  evaluated = ~np.isnan(logprobs)
  _check_tokens(tokens, counts.vocab_size, "tokens")
  train_counts = _training_counts(tokens, counts)
  hits = seen_earlier_mask(tokens, counts.eot_id) & (train_counts < threshold) & evaluated
  num_evaluated = int(evaluated.sum())
  slices = {"ar_hits": SliceStats.of(logprobs, hits, num_evaluated),
            "other": SliceStats.of(logprobs, evaluated & ~hits, num_evaluated),
            "all": SliceStats.of(logprobs, evaluated, num_evaluated)}
  num_hits = slices["ar_hits"].num_tokens
  buckets = []
  for lo, hi in frequency_buckets(threshold):
    in_bucket = hits & (train_counts >= lo) & (train_counts <= hi)
    stats = SliceStats.of(logprobs, in_bucket, num_evaluated)
    buckets.append(BucketStats(lo, hi, stats, stats.num_tokens / num_hits if num_hits else math.nan))
  return ArHitReport(threshold, slices, tuple(buckets))


@dataclasses.dataclass(frozen=True)
class GapExplained:
  """The share of model m's NLL gap to model M explained by AR hits; `value` None when there is no gap."""
  value: float | None
  gap: float  # l^m − l^M, nats
  reason: str  # '' when the formula applied without a cap


def gap_explained(nll_hits_m: float, nll_hits_ref: float, nll_all_m: float, nll_all_ref: float,
                  hit_share: float) -> GapExplained:
  """min(((l_H^m − l_H^M) · p_H) / (l^m − l^M), 1) (module docstring), with the no-gap cases made explicit.

  nll_*: mean negative log-probabilities (nats) over AR hits / all evaluated tokens of model m and of the
  reference (attention) model M; hit_share: p_H in [0, 1].
  """
  values = dict(nll_hits_m=nll_hits_m, nll_hits_ref=nll_hits_ref, nll_all_m=nll_all_m,
                nll_all_ref=nll_all_ref)
  for name, value in values.items():
    if not math.isfinite(value):
      raise ValueError(f"{name} must be finite, got {value}")
  if not 0 <= hit_share <= 1:
    raise ValueError(f"hit_share must be in [0, 1], got {hit_share}")
  gap = nll_all_m - nll_all_ref
  hit_gap = (nll_hits_m - nll_hits_ref) * hit_share
  if gap > GAP_TOLERANCE:
    ratio = hit_gap / gap
    return GapExplained(min(ratio, 1.0), gap, "" if ratio <= 1 else f"capped at 1 (ratio {ratio:.3f})")
  if hit_gap > 0:
    return GapExplained(1.0, gap, f"no overall gap (l^m - l^M = {gap:.4g} nats) but worse on AR hits: "
                                  "all of it ascribed to AR hits, as in the paper")
  return GapExplained(None, gap, f"no gap: not worse than the reference overall (l^m - l^M = {gap:.4g} nats) "
                                 "nor on AR hits")
