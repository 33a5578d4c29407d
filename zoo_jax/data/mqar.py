"""Multi-query associative recall (MQAR) data, as in Zoology's ``multiquery_ar``.

The task (Arora et al. 2024, "Zoology: Measuring and Improving Recall in Efficient
Language Models", Section 3): a sequence first lists ``num_kv_pairs`` key-value
pairs, then asks for every key again later in the sequence; the model must emit the
value bound to each key right after the key re-appears. Keys and values are disjoint
halves of the vocabulary, so a model cannot succeed by memorising a fixed mapping: it
has to recall the binding made in-context.

Layout of one example (vocab V, length L, kv pairs; token 0 is filler), for
V=20, L=16, kv=2 (the worked example in tests/test_mqar_data.py)::

    position:  0    1    2    3    4 .. 15
    inputs:    k1   v1   k2   v2   queries: k_i at 2*kv + 2*g_i, 0 elsewhere
    labels:  -100 -100 -100 -100   v_i at 2*kv + 2*g_i, -100 elsewhere

* keys of one example are distinct, uniform over [1, V//2); values distinct, uniform
  over [V//2, V).
* the query gaps g_1..g_kv are drawn without replacement from
  p(g) ∝ a * (g+1)^(a-1), g in [0, (L - 2*kv)//2), a = ``power_a``. With the default
  a = 0.01 the queries cluster right after the context (the paper motivates this
  by the power-law distance between repeated bigrams in natural text). Gap g_i
  belongs to key i, and the g_i are in draw order, as in Zoology (the first draw is
  stochastically the earliest, so draw order is part of the distribution).
* Zoology builds length L+1 arrays and returns ``inputs = seq[:-1]``,
  ``labels = labels_full[1:]``; the net effect, which we build directly, is that the
  label at a query-key position is that key's value and every other label is
  ``IGNORE_INDEX``.

Deliberate differences from Zoology's PyTorch/numpy code:

1. Noise RNG. With ``random_non_queries=True`` the filler zeros of ``inputs`` become
   uniform tokens in [0, V). Zoology draws that noise from the global torch RNG (so it
   depends on the model's seed); here it comes from this generator's own seeded
   stream, a child stream separate from the one that draws keys/values/gaps, so the
   labels and the non-filler tokens are identical with and without noise.
2. Splits. Zoology's test data doubles as its validation data. ``build_dataset``
   derives a different seed for 'train', 'validation' and 'test' (and for each
   segment), so a held-out test split is never used for model selection.
3. Mixed lengths. Zoology concatenates segments of equal length only; here segments
   of different ``seq_len`` are right-padded to the longest (inputs with 0, labels with
   ``IGNORE_INDEX``) and every example carries (seq_len, num_kv_pairs) slice tags.
4. Vectorised sampling. Zoology calls ``np.random.choice`` once per row. We sample the
   same distributions for all rows at once: distinct uniform keys/values by drawing
   with replacement and redrawing later duplicates (the procedure is symmetric in the
   token labels, so the result is exactly a uniform ordered distinct tuple), and the
   weighted gaps without replacement by an exponential race (the k smallest
   E_g / p(g), E_g ~ Exp(1), in ascending order, are distributed exactly like k
   sequential draws without replacement; this is the Gumbel-top-k trick in
   multiplicative form). Same distribution, different byte stream: arrays are
   not bit-equal to Zoology's for the same seed.
5. Validation raises ``ValueError`` naming the field instead of bare asserts, and
   ``num_passes`` (JRT repeated contexts) is not implemented.

Determinism: the arrays are a pure function of the arguments and the seed (NumPy's
PCG64 streams and integer/exponential samplers are platform-stable). The only
floating point involved is the gap weights; two race scores would have to agree to
within an ulp for a libm difference to change a result. The draws are made chunk by
chunk (keys, then values, then gaps for a block of rows), so changing num_examples
changes earlier examples too: a dataset is reproducible only as a whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

IGNORE_INDEX = -100

SPLITS = ("train", "validation", "test")
SEGMENT_KEYS = ("seq_len", "num_kv_pairs", "num_examples")

# Rows per chunk are chosen so one chunk holds about this many tokens: bounds the
# scratch memory (race scores, sort buffers) independently of num_examples. It is a
# constant, not a function of the machine, because chunking decides RNG order.
_CHUNK_TOKENS = 1 << 20


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _require_positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"mqar.{name} must be a positive integer, got {value!r}")


def _require_nonnegative_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"mqar.{name} must be a non-negative integer, got {value!r}")


def validate_mqar(*, vocab_size, seq_len, num_kv_pairs, num_examples, power_a=0.01) -> None:
    """Raise a one-line ValueError naming the first field outside its accepted range."""
    _require_positive_int("vocab_size", vocab_size)
    _require_positive_int("seq_len", seq_len)
    _require_positive_int("num_kv_pairs", num_kv_pairs)
    _require_positive_int("num_examples", num_examples)
    if seq_len % 2 != 0:
        raise ValueError(f"mqar.seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"mqar.vocab_size must be > seq_len ({seq_len}), got {vocab_size}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"mqar.num_kv_pairs must satisfy 4*num_kv_pairs <= seq_len ({seq_len}), got {num_kv_pairs}"
        )
    is_real = isinstance(power_a, numbers.Real) and not isinstance(power_a, bool)
    if not is_real or not (0.0 < float(power_a) <= 1.0):
        raise ValueError(f"mqar.power_a must be in (0, 1], got {power_a!r}")
    # Distinct keys fit in [1, V//2) because V > L >= 4*kv implies V//2 - 1 >= 2*kv - 1 >= kv,
    # and there are >= 2*kv gap slots because L - 2*kv >= 2*kv: no further checks needed.


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def _distinct_uniform(rng: np.random.Generator, num_rows: int, k: int, low: int, high: int) -> np.ndarray:
    """(num_rows, k) int32; each row an ordered tuple of distinct tokens, uniform over [low, high).

    Draw with replacement, then redraw every position that repeats a token seen at an
    earlier position of its row, until no row has repeats. Which positions are redrawn
    depends only on the pattern of equalities, never on the token values, so the final
    law is invariant under relabelling the tokens; as it only puts mass on distinct
    tuples, and any two distinct tuples are relabellings of each other, it is uniform.
    """
    draws = rng.integers(low, high, size=(num_rows, k), dtype=np.int32)
    # Sorting token*k + position (all distinct) finds repeats with a plain, fast sort and
    # still orders equal tokens by position, so the earliest copy is the one kept.
    composite_dtype = np.int32 if high * k < 2**31 else np.int64
    position = np.arange(k, dtype=composite_dtype)
    rows_to_check = np.arange(num_rows)
    while rows_to_check.size:
        composite = np.sort(draws[rows_to_check].astype(composite_dtype) * k + position, axis=1)
        sorted_tokens = composite // k
        is_later_copy = np.zeros(composite.shape, dtype=bool)
        is_later_copy[:, 1:] = sorted_tokens[:, 1:] == sorted_tokens[:, :-1]
        has_repeat = is_later_copy.any(axis=1)
        rows_to_check = rows_to_check[has_repeat]
        row_in_sub, col_in_sorted = np.nonzero(is_later_copy[has_repeat])
        repeat_position = composite[has_repeat][row_in_sub, col_in_sorted] % k
        draws[rows_to_check[row_in_sub], repeat_position] = rng.integers(
            low, high, size=row_in_sub.size, dtype=np.int32
        )
    return draws


def _race_multiplier(num_gap_slots: int, power_a: float) -> np.ndarray:
    """1/p(g) up to a constant, p(g) ∝ (g+1)^(a-1): score_g = Exp(1) * (g+1)^(1-a)."""
    return np.arange(1, num_gap_slots + 1, dtype=np.float64) ** (1.0 - float(power_a))


def _weighted_without_replacement(
    rng: np.random.Generator, num_rows: int, k: int, race_multiplier: np.ndarray
) -> np.ndarray:
    """(num_rows, k) indices drawn sequentially without replacement, in draw order.

    Exponential race: with E_g ~ Exp(1) i.i.d., the smallest E_g / p(g) is g with
    probability p(g), and by memorylessness the remaining scores race again over the
    rest; so sorting the k smallest scores ascending reproduces k sequential draws.
    """
    num_slots = race_multiplier.shape[0]
    scores = rng.standard_exponential(size=(num_rows, num_slots)) * race_multiplier
    if k < num_slots:
        chosen = np.argpartition(scores, k - 1, axis=1)[:, :k]
    else:
        chosen = np.broadcast_to(np.arange(num_slots), (num_rows, num_slots))
    chosen_scores = np.take_along_axis(scores, chosen, axis=1)
    # Ties between float64 race scores have probability ~2**-50, so the fast unstable sort is safe.
    draw_order = np.argsort(chosen_scores, axis=1)
    return np.take_along_axis(chosen, draw_order, axis=1).astype(np.int32)


def generate_mqar(
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    seed: int,
    power_a: float = 0.01,
    random_non_queries: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """MQAR examples as (inputs, labels), each int32 of shape (num_examples, seq_len).

    labels[i, t] is the value of key inputs[i, t] when t is a query position, else
    IGNORE_INDEX. Same arguments and seed give identical bytes.
    """
    validate_mqar(
        vocab_size=vocab_size,
        seq_len=seq_len,
        num_kv_pairs=num_kv_pairs,
        num_examples=num_examples,
        power_a=power_a,
    )
    _require_nonnegative_int("seed", seed)

    kv = int(num_kv_pairs)
    context_len = 2 * kv
    num_gap_slots = (seq_len - context_len) // 2
    key_low, key_high = 1, vocab_size // 2
    value_low, value_high = vocab_size // 2, vocab_size
    race_multiplier = _race_multiplier(num_gap_slots, power_a)

    # Two child streams: noise must not shift the structure draws, so that turning
    # random_non_queries on changes only filler tokens.
    structure_seq, noise_seq = np.random.SeedSequence(int(seed)).spawn(2)
    structure_rng = np.random.Generator(np.random.PCG64(structure_seq))
    noise_rng = np.random.Generator(np.random.PCG64(noise_seq))

    inputs = np.zeros((num_examples, seq_len), dtype=np.int32)
    labels = np.empty((num_examples, seq_len), dtype=np.int32)
    rows_per_chunk = max(1, _CHUNK_TOKENS // seq_len)
    for start in range(0, num_examples, rows_per_chunk):
        stop = min(start + rows_per_chunk, num_examples)
        n = stop - start
        keys = _distinct_uniform(structure_rng, n, kv, key_low, key_high)
        values = _distinct_uniform(structure_rng, n, kv, value_low, value_high)
        gaps = _weighted_without_replacement(structure_rng, n, kv, race_multiplier)

        chunk_inputs = inputs[start:stop]
        chunk_labels = labels[start:stop]
        chunk_labels.fill(IGNORE_INDEX)  # per chunk, while the chunk is hot in cache
        chunk_inputs[:, 0:context_len:2] = keys
        chunk_inputs[:, 1:context_len:2] = values
        query_pos = context_len + 2 * gaps
        np.put_along_axis(chunk_inputs, query_pos, keys, axis=1)
        np.put_along_axis(chunk_labels, query_pos, values, axis=1)

        if random_non_queries:
            is_filler = chunk_inputs == 0
            chunk_inputs[is_filler] = noise_rng.integers(
                0, vocab_size, size=int(is_filler.sum()), dtype=np.int32
            )
    return inputs, labels


# ---------------------------------------------------------------------------------------
# Datasets of several segments
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no scalar ==; hash by identity
class MQARDataset:
    """Examples of one split; n = number of examples, L_max = longest segment seq_len."""

    inputs: np.ndarray  # (n, L_max) int32, right-padded with 0
    labels: np.ndarray  # (n, L_max) int32, right-padded with IGNORE_INDEX
    seq_len: np.ndarray  # (n,) int32: the example's own (unpadded) length
    num_kv_pairs: np.ndarray  # (n,) int32

    def __post_init__(self):
        n = self.inputs.shape[0]
        if self.inputs.ndim != 2 or self.labels.shape != self.inputs.shape:
            raise ValueError(
                f"MQARDataset.labels shape {self.labels.shape} must equal inputs shape {self.inputs.shape} (2-D)"
            )
        for name in ("seq_len", "num_kv_pairs"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"MQARDataset.{name} must have shape ({n},), got {getattr(self, name).shape}")

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @functools.cached_property
    def max_labels_per_example(self) -> int:
        if len(self) == 0:
            return 0
        return int((self.labels != IGNORE_INDEX).sum(axis=1).max())

    def slices(self) -> list[tuple[int, int]]:
        pairs = np.unique(np.stack([self.seq_len, self.num_kv_pairs], axis=1), axis=0)
        return [(int(l), int(k)) for l, k in pairs]


def _segment_fields(segment: Any, index: int) -> dict[str, Any]:
    if isinstance(segment, Mapping) or hasattr(segment, "keys"):
        names = list(segment.keys())
    else:
        raise ValueError(f"mqar.segments[{index}] must be a mapping with keys {SEGMENT_KEYS}, got {type(segment).__name__}")
    for name in names:
        if name not in SEGMENT_KEYS:
            raise ValueError(f"mqar.segments[{index}] has unknown key {name!r}; accepted keys: {', '.join(SEGMENT_KEYS)}")
    for name in SEGMENT_KEYS:
        if name not in names:
            raise ValueError(f"mqar.segments[{index}] is missing key {name!r}; required keys: {', '.join(SEGMENT_KEYS)}")
    return {name: segment[name] for name in SEGMENT_KEYS}


def _segment_seed(seed: int, split: str, segment_index: int) -> int:
    state = np.random.SeedSequence([seed, SPLITS.index(split), segment_index]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def build_dataset(
    segments: Sequence[Any],
    *,
    vocab_size: int,
    seed: int,
    split: str,
    power_a: float = 0.01,
    random_non_queries: bool = False,
) -> MQARDataset:
    """Concatenate one generate_mqar draw per segment, in segment order, for one split."""
    if split not in SPLITS:
        raise ValueError(f"mqar.split must be one of {', '.join(SPLITS)}, got {split!r}")
    _require_nonnegative_int("seed", seed)
    if len(segments) == 0:
        raise ValueError("mqar.segments must be a non-empty sequence of segments, got 0 segments")
    fields = [_segment_fields(segment, i) for i, segment in enumerate(segments)]
    for i, f in enumerate(fields):
        try:
            validate_mqar(vocab_size=vocab_size, power_a=power_a, **f)
        except ValueError as err:
            raise ValueError(f"{err} (segments[{i}])") from None

    max_len = max(int(f["seq_len"]) for f in fields)
    total = sum(int(f["num_examples"]) for f in fields)
    inputs = np.zeros((total, max_len), dtype=np.int32)
    labels = np.full((total, max_len), IGNORE_INDEX, dtype=np.int32)
    seq_len_tag = np.empty((total,), dtype=np.int32)
    kv_tag = np.empty((total,), dtype=np.int32)
    row = 0
    for i, f in enumerate(fields):
        seg_inputs, seg_labels = generate_mqar(
            vocab_size=vocab_size,
            seq_len=int(f["seq_len"]),
            num_kv_pairs=int(f["num_kv_pairs"]),
            num_examples=int(f["num_examples"]),
            seed=_segment_seed(seed, split, i),
            power_a=power_a,
            random_non_queries=random_non_queries,
        )
        n, length = seg_inputs.shape
        inputs[row : row + n, :length] = seg_inputs
        labels[row : row + n, :length] = seg_labels
        seq_len_tag[row : row + n] = length
        kv_tag[row : row + n] = int(f["num_kv_pairs"])
        row += n
    return MQARDataset(inputs=inputs, labels=labels, seq_len=seq_len_tag, num_kv_pairs=kv_tag)


def _fresh_rows(segments: Sequence[Any], batch_size: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(the segments' checked fields, rows of each in every fresh batch): in proportion to num_examples,
    largest remainders first."""
    _require_positive_int("batch_size", batch_size)
    fields = [_segment_fields(segment, i) for i, segment in enumerate(segments)]
    if not fields:
        raise ValueError("mqar.segments must be a non-empty sequence of segments, got 0 segments")
    shares = np.asarray([int(f["num_examples"]) for f in fields], np.float64)
    exact = batch_size * shares / shares.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: batch_size - counts.sum()]:
        counts[i] += 1
    return fields, counts


def fresh_rows_per_length(segments: Sequence[Any], batch_size: int) -> dict[int, int]:
    """{seq_len: rows of that length in every `fresh_batch`} (lengths with no rows left out)."""
    out: dict[int, int] = {}
    for f, n in zip(*_fresh_rows(segments, batch_size)):
        if n:
            out[int(f["seq_len"])] = out.get(int(f["seq_len"]), 0) + int(n)
    return dict(sorted(out.items()))


def fresh_batch(
    segments: Sequence[Any],
    batch_size: int,
    *,
    vocab_size: int,
    seed: int,
    step: int,
    power_a: float = 0.01,
    random_non_queries: bool = False,
) -> dict[str, np.ndarray]:
    """A training batch of new examples, a pure function of (seed, step): the option of drawing fresh
    examples every step instead of epochs over a fixed set (Zoology's protocol). Rows are split over the
    segments in proportion to their num_examples (largest remainders first), shuffled, and padded to the
    segments' longest seq_len; the keys are those of epoch_batches'. The draws use seeds apart from the
    fixed splits' (build_dataset), so a fresh batch is never a copy of validation or test by construction
    of the seeds (random coincidences aside).
    """
    _require_nonnegative_int("seed", seed)
    _require_nonnegative_int("step", step)
    fields, counts = _fresh_rows(segments, batch_size)
    max_len = max(int(f["seq_len"]) for f in fields)
    parts = []
    for i, (f, n) in enumerate(zip(fields, counts)):
        if n == 0:
            continue
        draw_seed = int(np.random.SeedSequence([seed, len(SPLITS), step, i]).generate_state(1, np.uint64)[0])
        inputs, labels = generate_mqar(vocab_size=vocab_size, seq_len=int(f["seq_len"]),
                                       num_kv_pairs=int(f["num_kv_pairs"]), num_examples=int(n), seed=draw_seed,
                                       power_a=power_a, random_non_queries=random_non_queries)
        pad = ((0, 0), (0, max_len - inputs.shape[1]))
        parts.append(dict(inputs=np.pad(inputs, pad), labels=np.pad(labels, pad, constant_values=IGNORE_INDEX),
                          seq_len=np.full(n, inputs.shape[1], np.int32),
                          num_kv_pairs=np.full(n, int(f["num_kv_pairs"]), np.int32)))
    order = np.random.default_rng([seed, len(SPLITS), step]).permutation(batch_size)
    batch = {key: np.concatenate([p[key] for p in parts])[order] for key in parts[0]}
    batch["weight"] = np.ones((batch_size,), dtype=np.float32)
    return batch



# ---------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    _require_nonnegative_int("num_examples", num_examples)
    _require_positive_int("batch_size", batch_size)
    if drop_remainder:
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


def epoch_batches(
    dataset: MQARDataset,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches of one epoch: dicts of inputs, labels, seq_len, num_kv_pairs, weight.

    Every batch has exactly batch_size rows. With drop_remainder=False the last short
    batch is filled with padding rows (inputs 0, labels IGNORE_INDEX, slice tags 0,
    weight 0); 'weight' is 1.0 for real rows and is present in every batch, so
    evaluation can average over real examples only.
    """
    num_steps = steps_per_epoch(len(dataset), batch_size, drop_remainder)
    _require_nonnegative_int("seed", seed)
    _require_nonnegative_int("epoch", epoch)
    if not _is_int(start_step) or not 0 <= start_step <= num_steps:
        raise ValueError(f"mqar.start_step must be in [0, {num_steps}] (steps in this epoch), got {start_step!r}")
    n = len(dataset)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return _iterate_batches(dataset, order, batch_size, start_step, num_steps)


def _iterate_batches(dataset, order, batch_size, start_step, num_steps):
    # A separate generator so epoch_batches validates eagerly, at call time.
    for step in range(start_step, num_steps):
        rows = order[step * batch_size : (step + 1) * batch_size]
        num_real = rows.shape[0]
        batch = {
            "inputs": dataset.inputs[rows],
            "labels": dataset.labels[rows],
            "seq_len": dataset.seq_len[rows],
            "num_kv_pairs": dataset.num_kv_pairs[rows],
            "weight": np.ones((batch_size,), dtype=np.float32),
        }
        if num_real < batch_size:
            pad = batch_size - num_real
            batch["inputs"] = np.pad(batch["inputs"], ((0, pad), (0, 0)))
            batch["labels"] = np.pad(batch["labels"], ((0, pad), (0, 0)), constant_values=IGNORE_INDEX)
            batch["seq_len"] = np.pad(batch["seq_len"], (0, pad))
            batch["num_kv_pairs"] = np.pad(batch["num_kv_pairs"], (0, pad))
            batch["weight"][num_real:] = 0.0
        yield batch
