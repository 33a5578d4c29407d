"""Spec of the MQAR generator (zoo_jax/data/mqar.py), Zoology's multiquery_ar task.

Layout of an example with kv pairs, length L, vocab V (token 0 = filler):
  inputs[0:2kv]   = k1 v1 k2 v2 ... (keys distinct in [1, V//2), values distinct in [V//2, V))
  inputs[2kv+2g_i] = k_i, gaps g_i drawn without replacement from p(g) ∝ (g+1)^(a-1)
  labels[2kv+2g_i] = v_i, every other label IGNORE_INDEX (-100)
"""

import hashlib
import math

import chex
import numpy as np
import pytest

from zoo_jax.data import mqar
from zoo_jax.data.mqar import (
    IGNORE_INDEX,
    MQARDataset,
    build_dataset,
    epoch_batches,
    generate_mqar,
    steps_per_epoch,
    validate_mqar,
)


def assert_mqar_structure(inputs, labels, *, vocab_size, num_kv_pairs, random_non_queries=False):
    """Every MQAR rule that can be checked on a single example, vectorised over rows."""
    n, seq_len = inputs.shape
    kv = num_kv_pairs
    chex.assert_type([inputs, labels], np.int32)
    chex.assert_equal_shape([inputs, labels])

    keys, values = inputs[:, 0 : 2 * kv : 2], inputs[:, 1 : 2 * kv : 2]
    assert keys.min() >= 1 and keys.max() < vocab_size // 2
    assert values.min() >= vocab_size // 2 and values.max() < vocab_size
    assert (np.diff(np.sort(keys, axis=1), axis=1) > 0).all(), "keys within an example must be distinct"
    assert (np.diff(np.sort(values, axis=1), axis=1) > 0).all(), "values within an example must be distinct"

    is_label = labels != IGNORE_INDEX
    assert (is_label.sum(axis=1) == kv).all(), "exactly one label per key"
    rows, query_pos = np.nonzero(is_label)
    assert (query_pos >= 2 * kv).all() and ((query_pos - 2 * kv) % 2 == 0).all(), "queries at 2kv + 2g"
    query_pos = query_pos.reshape(n, kv)
    query_keys = np.take_along_axis(inputs, query_pos, axis=1)
    query_labels = np.take_along_axis(labels, query_pos, axis=1)
    # Each key is queried exactly once: the query keys are a permutation of the context keys.
    np.testing.assert_array_equal(np.sort(query_keys, axis=1), np.sort(keys, axis=1))
    # The label at a query is the value paired with that key in the context.
    matches = query_keys[:, :, None] == keys[:, None, :]  # (n, query, context slot)
    assert (matches.sum(axis=2) == 1).all()
    np.testing.assert_array_equal(query_labels, values[np.arange(n)[:, None], matches.argmax(axis=2)])

    is_filler = np.ones_like(is_label)
    is_filler[:, : 2 * kv] = False
    is_filler &= ~is_label
    if random_non_queries:
        assert inputs[is_filler].min() >= 0 and inputs[is_filler].max() < vocab_size
    else:
        assert (inputs[is_filler] == 0).all(), "non-query positions after the context are filler 0"


def query_gaps(inputs, labels, num_kv_pairs):
    """(n, kv) gap of the query of context key i, so query position = 2kv + 2*gap."""
    kv = num_kv_pairs
    keys = inputs[:, 0 : 2 * kv : 2]
    rows, pos = np.nonzero(labels != IGNORE_INDEX)
    pos = pos.reshape(-1, kv)
    query_keys = np.take_along_axis(inputs, pos, axis=1)
    slot_of_query = (query_keys[:, :, None] == keys[:, None, :]).argmax(axis=2)
    gaps = np.empty_like(pos)
    np.put_along_axis(gaps, slot_of_query, (pos - 2 * kv) // 2, axis=1)
    return gaps


# ---------------------------------------------------------------------------------------
# Worked example
# ---------------------------------------------------------------------------------------


def test_worked_example_written_out_by_hand():
    # V=20, L=16, kv=2 (Zoology's docstring uses V=12, L=16, which its own V > L assert rejects).
    # Keys from [1, 10), values from [10, 20), gaps from [0, (16-4)//2) = [0, 6).
    inputs, labels = generate_mqar(vocab_size=20, seq_len=16, num_kv_pairs=2, num_examples=3, seed=0)
    expected_inputs = np.array(
        [
            # k1 v1  k2  v2 | queries start at 2kv = 4
            [8, 11, 9, 19, 0, 0, 9, 0, 0, 0, 0, 0, 8, 0, 0, 0],  # k2=9 at 4+2*1, k1=8 at 4+2*4
            [1, 14, 3, 16, 0, 0, 3, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # k2=3 at 4+2*1, k1=1 at 4+2*4
            [7, 16, 2, 19, 7, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0],  # k1=7 at 4+2*0, k2=2 at 4+2*3
        ],
        dtype=np.int32,
    )
    x = IGNORE_INDEX
    expected_labels = np.array(
        [
            [x, x, x, x, x, x, 19, x, x, x, x, x, 11, x, x, x],  # value of 9 is 19, of 8 is 11
            [x, x, x, x, x, x, 16, x, x, x, x, x, 14, x, x, x],  # value of 3 is 16, of 1 is 14
            [x, x, x, x, 16, x, x, x, x, x, 19, x, x, x, x, x],  # value of 7 is 16, of 2 is 19
        ],
        dtype=np.int32,
    )
    np.testing.assert_array_equal(inputs, expected_inputs)
    np.testing.assert_array_equal(labels, expected_labels)
    assert inputs.dtype == np.int32 and labels.dtype == np.int32
    assert_mqar_structure(inputs, labels, vocab_size=20, num_kv_pairs=2)
    np.testing.assert_array_equal(query_gaps(inputs, labels, 2), [[4, 1], [4, 1], [0, 3]])


# ---------------------------------------------------------------------------------------
# Structure and distributions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vocab_size,seq_len,num_kv_pairs,num_examples",
    [
        (8192, 512, 64, 200),  # the paper's largest setting
        (8192, 64, 4, 500),
        (65, 64, 16, 500),  # tightest: V = L+1, 4kv = L, 16 distinct keys from 31 tokens
        (67, 64, 1, 200),  # odd V: keys [1, 33), values [33, 67)
        (4096, 2048, 8, 1100),  # L=2048 spans several internal chunks (512 rows each)
    ],
)
def test_every_example_follows_the_mqar_rules(vocab_size, seq_len, num_kv_pairs, num_examples):
    inputs, labels = generate_mqar(
        vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs, num_examples=num_examples, seed=7
    )
    chex.assert_shape([inputs, labels], (num_examples, seq_len))
    assert_mqar_structure(inputs, labels, vocab_size=vocab_size, num_kv_pairs=num_kv_pairs)


def test_keys_are_a_uniform_ordered_distinct_pair():
    # V=20, kv=2: (k1, k2) must be uniform over the 9*8 = 72 ordered pairs of distinct
    # keys (redrawing duplicates must not bias toward any token or order).
    n = 36_000
    inputs, _ = generate_mqar(vocab_size=20, seq_len=16, num_kv_pairs=2, num_examples=n, seed=1)
    counts = np.zeros((20, 20))
    np.add.at(counts, (inputs[:, 0], inputs[:, 2]), 1)
    cells = counts[1:10, 1:10][~np.eye(9, dtype=bool)]
    assert cells.sum() == n
    expected = n / 72
    chi2 = ((cells - expected) ** 2 / expected).sum()
    # 71 degrees of freedom: mean 71, sd 12; a biased sampler lands far above 140.
    assert chi2 < 140, chi2
    value_counts = np.bincount(inputs[:, [1, 3]].ravel(), minlength=20)
    assert value_counts[:10].sum() == 0
    np.testing.assert_allclose(value_counts[10:] / (2 * n), 0.1, atol=0.006)


def _gap_probabilities(num_gap_slots, power_a):
    p = power_a * np.arange(1, num_gap_slots + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def test_query_gaps_follow_the_power_law_in_draw_order():
    # L=64, kv=4: 28 gap slots. Key i's gap is the i-th draw without replacement from p.
    n, kv, power_a = 20_000, 4, 0.01
    inputs, labels = generate_mqar(vocab_size=8192, seq_len=64, num_kv_pairs=kv, num_examples=n, seed=3)
    gaps = query_gaps(inputs, labels, kv)
    p = _gap_probabilities(28, power_a)

    # Exact marginals of the first two draws: P(g1=g) = p(g); P(g2=g) = sum_h p(h) p(g) / (1 - p(h)).
    second = p * ((p / (1 - p)).sum() - p / (1 - p))
    for slot, exact in [(0, p), (1, second)]:
        observed = np.bincount(gaps[:, slot], minlength=28)
        chi2 = ((observed - n * exact) ** 2 / (n * exact)).sum()
        assert chi2 < 80, (slot, chi2)  # 27 dof: mean 27, sd 7.3

    # Queries cluster early: mean gap far below the uniform mean 13.5, and later draws come later.
    slot_means = gaps.mean(axis=0)
    assert gaps.mean() < 9.0, gaps.mean()
    assert (np.diff(slot_means) > 0).all(), slot_means

    # Cross-check against Zoology's own sampler (per-row np.random choice without replacement).
    reference_rng = np.random.default_rng(0)
    reference = np.stack([reference_rng.choice(28, size=kv, replace=False, p=p) for _ in range(4000)])
    standard_error = np.sqrt(gaps.var(axis=0) / n + reference.var(axis=0) / len(reference))
    assert (np.abs(slot_means - reference.mean(axis=0)) < 5 * standard_error).all(), (
        slot_means,
        reference.mean(axis=0),
    )


def test_draw_order_matches_zoologys_sampler_at_the_largest_setting():
    # L=512, kv=64: 64 of 192 gap slots. The i-th key gets the i-th draw, so mean gaps
    # grow with the key's context slot (about 32 for the first key, 80 for the last).
    n, kv = 3000, 64
    inputs, labels = generate_mqar(vocab_size=8192, seq_len=512, num_kv_pairs=kv, num_examples=n, seed=8)
    gaps = query_gaps(inputs, labels, kv)
    p = _gap_probabilities(192, 0.01)
    reference_rng = np.random.default_rng(1)
    reference = np.stack([reference_rng.choice(192, size=kv, replace=False, p=p) for _ in range(n)])
    slots = [0, 1, 15, 31, 47, 63]
    standard_error = np.sqrt((gaps.var(axis=0) + reference.var(axis=0)) / n)[slots]
    difference = np.abs(gaps.mean(axis=0) - reference.mean(axis=0))[slots]
    assert (difference < 5 * standard_error).all(), (difference, standard_error)
    assert gaps[:, 0].mean() + 30 < gaps[:, 63].mean()


def test_power_a_one_gives_uniform_gaps():
    n = 20_000
    inputs, labels = generate_mqar(vocab_size=8192, seq_len=64, num_kv_pairs=4, num_examples=n, seed=4, power_a=1.0)
    gaps = query_gaps(inputs, labels, 4)
    assert abs(gaps.mean() - 13.5) < 0.15
    counts = np.bincount(gaps[:, 0], minlength=28)
    chi2 = ((counts - n / 28) ** 2 / (n / 28)).sum()
    assert chi2 < 80, chi2


def test_random_non_queries_only_replaces_fillers():
    kwargs = dict(vocab_size=8192, seq_len=128, num_kv_pairs=8, num_examples=400, seed=11)
    clean_inputs, clean_labels = generate_mqar(**kwargs)
    noisy_inputs, noisy_labels = generate_mqar(**kwargs, random_non_queries=True)
    np.testing.assert_array_equal(noisy_labels, clean_labels)
    is_filler = clean_inputs == 0
    np.testing.assert_array_equal(noisy_inputs[~is_filler], clean_inputs[~is_filler])
    noise = noisy_inputs[is_filler]
    assert noise.min() >= 0 and noise.max() < 8192
    # Uniform over [0, V): almost no zeros left, and both halves of the vocabulary appear.
    assert (noise == 0).mean() < 0.001
    assert abs((noise >= 4096).mean() - 0.5) < 0.01
    assert_mqar_structure(noisy_inputs, noisy_labels, vocab_size=8192, num_kv_pairs=8, random_non_queries=True)


# ---------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_different_data():
    kwargs = dict(vocab_size=8192, seq_len=64, num_kv_pairs=4, num_examples=300, random_non_queries=True)
    a_inputs, a_labels = generate_mqar(**kwargs, seed=5)
    b_inputs, b_labels = generate_mqar(**kwargs, seed=5)
    c_inputs, c_labels = generate_mqar(**kwargs, seed=6)
    assert a_inputs.tobytes() == b_inputs.tobytes() and a_labels.tobytes() == b_labels.tobytes()
    assert not np.array_equal(a_inputs, c_inputs)
    assert not np.array_equal(a_labels, c_labels)


def test_stream_is_pinned():
    # Checkpointed experiments rely on regenerating the same data: a change to the
    # sampling code or to NumPy's streams must show up here, not as a silent data change.
    inputs, labels = generate_mqar(
        vocab_size=8192, seq_len=64, num_kv_pairs=4, num_examples=100, seed=123, random_non_queries=True
    )
    digest = hashlib.sha256(inputs.tobytes() + labels.tobytes()).hexdigest()
    assert digest == PINNED_DIGEST, digest


PINNED_DIGEST = "c4c1db23dc5efca0fb18e6eb4307c4a5e8172f46a134cd1713ecda747fab1085"


# ---------------------------------------------------------------------------------------
# Datasets of several segments
# ---------------------------------------------------------------------------------------

SEGMENTS = [
    {"seq_len": 64, "num_kv_pairs": 4, "num_examples": 50},
    {"seq_len": 128, "num_kv_pairs": 8, "num_examples": 30},
]


def test_build_dataset_pads_mixed_lengths_and_tags_slices():
    data = build_dataset(SEGMENTS, vocab_size=8192, seed=0, split="train")
    assert len(data) == 80
    chex.assert_shape([data.inputs, data.labels], (80, 128))
    chex.assert_type([data.inputs, data.labels, data.seq_len, data.num_kv_pairs], np.int32)
    np.testing.assert_array_equal(data.seq_len, [64] * 50 + [128] * 30)
    np.testing.assert_array_equal(data.num_kv_pairs, [4] * 50 + [8] * 30)
    assert data.slices() == [(64, 4), (128, 8)]
    assert data.max_labels_per_example == 8
    # Short segment: right-padded with filler inputs and ignored labels.
    assert (data.inputs[:50, 64:] == 0).all()
    assert (data.labels[:50, 64:] == IGNORE_INDEX).all()
    assert_mqar_structure(data.inputs[:50, :64], data.labels[:50, :64], vocab_size=8192, num_kv_pairs=4)
    assert_mqar_structure(data.inputs[50:], data.labels[50:], vocab_size=8192, num_kv_pairs=8)


def test_splits_are_different_draws_and_each_is_reproducible():
    train, validation, test = (build_dataset(SEGMENTS, vocab_size=8192, seed=0, split=s) for s in mqar.SPLITS)
    assert not np.array_equal(train.inputs, validation.inputs)
    assert not np.array_equal(train.inputs, test.inputs)
    assert not np.array_equal(validation.inputs, test.inputs)
    again = build_dataset(SEGMENTS, vocab_size=8192, seed=0, split="validation")
    assert again.inputs.tobytes() == validation.inputs.tobytes()
    assert again.labels.tobytes() == validation.labels.tobytes()
    other_seed = build_dataset(SEGMENTS, vocab_size=8192, seed=1, split="validation")
    assert not np.array_equal(other_seed.inputs, validation.inputs)


def test_each_segment_has_its_own_seed():
    # Growing segment 1 must not change segment 0's examples.
    small = build_dataset(SEGMENTS, vocab_size=8192, seed=0, split="train")
    bigger = build_dataset(
        [SEGMENTS[0], {**SEGMENTS[1], "num_examples": 60}], vocab_size=8192, seed=0, split="train"
    )
    np.testing.assert_array_equal(bigger.inputs[:50], small.inputs[:50])
    np.testing.assert_array_equal(bigger.labels[:50], small.labels[:50])
    # Two identical segments are still different draws.
    twice = build_dataset([SEGMENTS[0], SEGMENTS[0]], vocab_size=8192, seed=0, split="train")
    assert not np.array_equal(twice.inputs[:50], twice.inputs[50:])


def test_build_dataset_accepts_config_dicts():
    ml_collections = pytest.importorskip("ml_collections")
    segments = [ml_collections.ConfigDict(s) for s in SEGMENTS]
    from_config = build_dataset(segments, vocab_size=8192, seed=0, split="test")
    from_dict = build_dataset(SEGMENTS, vocab_size=8192, seed=0, split="test")
    assert from_config.inputs.tobytes() == from_dict.inputs.tobytes()


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------

VALID = dict(vocab_size=8192, seq_len=64, num_kv_pairs=4, num_examples=10, power_a=0.01)


@pytest.mark.parametrize(
    "field,bad_value",
    [
        ("vocab_size", 0),
        ("vocab_size", 64),  # must exceed seq_len
        ("vocab_size", 100.0),
        ("seq_len", 0),
        ("seq_len", -64),
        ("seq_len", 63),  # odd
        ("num_kv_pairs", 0),
        ("num_kv_pairs", 17),  # 4 * 17 > 64
        ("num_kv_pairs", True),
        ("num_examples", 0),
        ("num_examples", -1),
        ("power_a", 0.0),
        ("power_a", -0.5),
        ("power_a", 1.5),
        ("power_a", float("nan")),
    ],
)
def test_each_invalid_field_is_named_in_a_one_line_error(field, bad_value):
    args = {**VALID, field: bad_value}
    with pytest.raises(ValueError, match=rf"^mqar\.{field} ") as err:
        validate_mqar(**args)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=rf"^mqar\.{field} "):
        generate_mqar(**args, seed=0)


def test_error_messages_state_the_accepted_range():
    with pytest.raises(ValueError, match=r"^mqar\.seq_len must be even, got 15$"):
        validate_mqar(**{**VALID, "seq_len": 15, "vocab_size": 8192})
    with pytest.raises(ValueError, match=r"^mqar\.vocab_size must be > seq_len \(64\), got 50$"):
        validate_mqar(**{**VALID, "vocab_size": 50})
    with pytest.raises(ValueError, match=r"^mqar\.num_kv_pairs must satisfy 4\*num_kv_pairs <= seq_len \(64\), got 20$"):
        validate_mqar(**{**VALID, "num_kv_pairs": 20})


def test_negative_seed_is_rejected():
    with pytest.raises(ValueError, match=r"^mqar\.seed "):
        generate_mqar(**VALID, seed=-1)


@pytest.mark.parametrize(
    "segment,pattern",
    [
        ({**SEGMENTS[0], "num_kv": 4}, r"unknown key 'num_kv'"),
        ({"seq_len": 64, "num_kv_pairs": 4}, r"missing key 'num_examples'"),
        ({**SEGMENTS[0], "seq_len": 66, "num_kv_pairs": 17}, r"^mqar\.num_kv_pairs .*\(segments\[1\]\)$"),
    ],
)
def test_bad_segment_is_rejected_before_anything_is_generated(monkeypatch, segment, pattern):
    def must_not_run(**kwargs):
        raise AssertionError("generated data before validating every segment")

    monkeypatch.setattr(mqar, "generate_mqar", must_not_run)
    with pytest.raises(ValueError, match=pattern):
        build_dataset([SEGMENTS[0], segment], vocab_size=8192, seed=0, split="train")


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match=r"^mqar\.split must be one of train, validation, test, got 'valid'$"):
        build_dataset(SEGMENTS, vocab_size=8192, seed=0, split="valid")


# ---------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------


def _numbered_dataset(n, seq_len=8):
    """Row i has inputs[i, 0] = i + 1, so batches can be traced back to dataset rows."""
    inputs = np.zeros((n, seq_len), dtype=np.int32)
    inputs[:, 0] = np.arange(1, n + 1)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)
    labels[:, 0] = 7
    return MQARDataset(
        inputs=inputs,
        labels=labels,
        seq_len=np.full((n,), seq_len, dtype=np.int32),
        num_kv_pairs=np.full((n,), 1, dtype=np.int32),
    )


def test_steps_per_epoch():
    assert steps_per_epoch(23, 5) == 4
    assert steps_per_epoch(23, 5, drop_remainder=False) == 5
    assert steps_per_epoch(20, 5, drop_remainder=False) == 4
    assert steps_per_epoch(3, 5) == 0
    with pytest.raises(ValueError, match=r"^mqar\.batch_size "):
        steps_per_epoch(23, 0)


def test_epoch_without_drop_covers_every_example_once_and_weights_padding():
    data = _numbered_dataset(23)
    batches = list(epoch_batches(data, 5, seed=0, epoch=0, drop_remainder=False))
    assert len(batches) == 5
    for batch in batches:
        chex.assert_shape([batch["inputs"], batch["labels"]], (5, 8))
        chex.assert_shape([batch["seq_len"], batch["num_kv_pairs"], batch["weight"]], (5,))
        assert batch["weight"].dtype == np.float32
    np.testing.assert_array_equal(batches[-1]["weight"], [1, 1, 1, 0, 0])
    assert all((b["weight"] == 1).all() for b in batches[:-1])
    padding = {k: v[3:] for k, v in batches[-1].items()}
    assert (padding["inputs"] == 0).all() and (padding["labels"] == IGNORE_INDEX).all()
    assert (padding["seq_len"] == 0).all() and (padding["num_kv_pairs"] == 0).all()

    real_ids = np.concatenate([b["inputs"][b["weight"] == 1, 0] for b in batches])
    np.testing.assert_array_equal(np.sort(real_ids), np.arange(1, 24))
    np.testing.assert_array_equal(real_ids - 1, np.random.default_rng([0, 0]).permutation(23))


def test_epoch_with_drop_remainder_has_only_full_batches():
    data = _numbered_dataset(23)
    batches = list(epoch_batches(data, 5, seed=0, epoch=0))
    assert len(batches) == 4
    ids = np.concatenate([b["inputs"][:, 0] for b in batches])
    assert len(np.unique(ids)) == 20
    assert all((b["weight"] == 1).all() for b in batches)


def test_shuffle_depends_on_seed_and_epoch_only():
    data = _numbered_dataset(40)

    def order(**kwargs):
        return np.concatenate([b["inputs"][:, 0] for b in epoch_batches(data, 8, **kwargs)])

    np.testing.assert_array_equal(order(seed=1, epoch=2), order(seed=1, epoch=2))
    assert not np.array_equal(order(seed=1, epoch=2), order(seed=1, epoch=3))
    assert not np.array_equal(order(seed=1, epoch=2), order(seed=2, epoch=2))
    np.testing.assert_array_equal(order(seed=1, epoch=2, shuffle=False), np.arange(1, 41))


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_start_step_resumes_with_the_tail_of_the_epoch(drop_remainder):
    data = _numbered_dataset(23)
    full = list(epoch_batches(data, 5, seed=3, epoch=1, drop_remainder=drop_remainder))
    resumed = list(epoch_batches(data, 5, seed=3, epoch=1, drop_remainder=drop_remainder, start_step=2))
    assert len(resumed) == len(full) - 2
    for expected, got in zip(full[2:], resumed):
        assert expected.keys() == got.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    assert list(epoch_batches(data, 5, seed=3, epoch=1, start_step=4)) == []


def test_start_step_past_the_epoch_is_rejected():
    with pytest.raises(ValueError, match=r"^mqar\.start_step must be in \[0, 4\]"):
        epoch_batches(_numbered_dataset(23), 5, seed=0, epoch=0, start_step=5)
