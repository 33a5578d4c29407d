"""Spec of the AR-hit analysis (zoo_jax/analysis/ar_hits.py) and of experiments/ar_gap.py (Table 1).

Token x_t of a context is an AR hit when the bigram (x_{t-1}, x_t) occurred earlier in the same context and
its count in the training split is below a threshold; the share of a model's gap to attention explained by
AR hits is min(((l_H^m − l_H^M) · p_H) / (l^m − l^M), 1) over mean NLLs l.
"""

import collections
import json
import math
import os
import re
import subprocess
import sys
import zipfile

import chex
import numpy as np
import pytest

from zoo_jax import cli
from zoo_jax.analysis import ar_hits
from zoo_jax.analysis.ar_hits import BigramCounts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AR_GAP = os.path.join(REPO, "experiments", "ar_gap.py")


def naive_counts(rows) -> collections.Counter:
  return collections.Counter((int(r[i - 1]), int(r[i])) for r in rows for i in range(1, len(r)))


def as_counter(counts: BigramCounts) -> collections.Counter:
  v = counts.vocab_size
  return collections.Counter({(int(c) // v, int(c) % v): int(n) for c, n in zip(counts.codes, counts.counts)})


def naive_seen_earlier(tokens):
  mask = np.zeros(tokens.shape, bool)
  for i, row in enumerate(tokens):
    for t in range(1, len(row)):
      mask[i, t] = any((row[s - 1], row[s]) == (row[t - 1], row[t]) for s in range(1, t))
  return mask


# ----------------------------------------------------------------------------------------- count_bigrams


def test_count_bigrams_hand_made():
  counts = ar_hits.count_bigrams(np.array([[1, 2, 1, 2], [2, 1, 2, 1]]), vocab_size=3)
  chex.assert_trees_all_equal(counts.codes, np.array([1 * 3 + 2, 2 * 3 + 1]))
  chex.assert_trees_all_equal(counts.counts, np.array([3, 3]))
  assert counts.num_tokens == 8 and counts.num_bigrams == 6
  chex.assert_trees_all_equal(counts.count_of(np.array([1, 2, 0, 2]), np.array([2, 1, 1, 2])),
                              np.array([3, 3, 0, 0]))


def test_count_bigrams_never_across_rows():
  # rows [0 1] [2 0]: the pair (1, 2) only exists across the row boundary
  counts = ar_hits.count_bigrams(np.array([[0, 1], [2, 0]]), vocab_size=3)
  assert as_counter(counts) == {(0, 1): 1, (2, 0): 1}
  assert counts.count_of(1, 2) == 0
  streamed = ar_hits.count_bigrams([np.array([0, 1]), np.array([2, 0])], vocab_size=3)
  assert as_counter(streamed) == as_counter(counts)


def test_streamed_counts_equal_one_shot_and_naive(monkeypatch):
  rng = np.random.default_rng(0)
  vocab = 7
  rows = rng.integers(0, vocab, (40, 25))
  one_shot = ar_hits.count_bigrams(rows, vocab)
  monkeypatch.setattr(ar_hits, "_CHUNK_BIGRAMS", 10)  # many reductions and merges
  streamed = ar_hits.count_bigrams((r for r in rows), vocab)
  assert as_counter(one_shot) == naive_counts(rows)
  chex.assert_trees_all_equal((streamed.codes, streamed.counts), (one_shot.codes, one_shot.counts))
  assert streamed.num_tokens == one_shot.num_tokens == rows.size
  assert (np.diff(streamed.codes) > 0).all(), "codes must be sorted and unique"

  docs = [rng.integers(0, vocab, n) for n in (0, 1, 2, 30, 5, 17)]  # uneven, incl. empty and one token
  counts = ar_hits.count_bigrams(iter(docs), vocab)
  assert as_counter(counts) == naive_counts(docs) and counts.num_tokens == sum(map(len, docs))
  halves = ar_hits.count_bigrams(docs[:3], vocab).merge(ar_hits.count_bigrams(docs[3:], vocab))
  chex.assert_trees_all_equal((halves.codes, halves.counts, halves.num_tokens),
                              (counts.codes, counts.counts, counts.num_tokens))


def test_bigram_counts_save_load(tmp_path):
  counts = ar_hits.count_bigrams(np.random.default_rng(1).integers(0, 50257, (3, 100)), 50257)
  path = str(tmp_path / "bigram_counts.npz")
  counts.save(path)
  assert os.listdir(tmp_path) == ["bigram_counts.npz"]
  loaded = BigramCounts.load(path)
  chex.assert_trees_all_equal((loaded.codes, loaded.counts), (counts.codes, counts.counts))
  assert (loaded.vocab_size, loaded.num_tokens) == (50257, 300)
  with pytest.raises(ValueError, match="codes must be sorted and unique"):
    BigramCounts(np.array([5, 3]), np.array([1, 1]), vocab_size=10, num_tokens=3)


@pytest.mark.parametrize("sequences,vocab_size,expected", [
    (np.array([[0, 5]]), 5, r"sequences must be token ids in \[0, 5\)"),
    (np.array([[0, -1]]), 5, r"\[0, 5\)"),
    (np.array([[0.0, 1.0]]), 5, "integer array"),
    (np.zeros((2, 2, 2), int), 5, "2-D"),
    (np.array([[0, 1]]), 0, "vocab_size must be an integer in"),
])
def test_count_bigrams_bad_input(sequences, vocab_size, expected):
  with pytest.raises(ValueError, match=expected):
    ar_hits.count_bigrams(sequences, vocab_size)


# ---------------------------------------------------------------------------------------- AR-hit marking


def test_seen_earlier_hand_made():
  tokens = np.array([
      [5, 6, 7, 5, 6, 8],  # (5, 6) again at t = 4
      [5, 6, 7, 6, 8, 9],  # token 6 repeats at t = 3, but (7, 6) is a new bigram
      [3, 3, 3, 3, 1, 2],  # (3, 3) at t = 1, 2, 3: seen earlier from t = 2
      [7, 5, 6, 1, 1, 1],  # (5, 6) was in row 0, not in this context: not seen earlier
  ])
  expected = np.array([
      [0, 0, 0, 0, 1, 0],
      [0, 0, 0, 0, 0, 0],
      [0, 0, 1, 1, 0, 0],
      [0, 0, 0, 0, 0, 1],
  ], bool)
  chex.assert_trees_all_equal(ar_hits.seen_earlier_mask(tokens), expected)


def test_seen_earlier_matches_naive_loop():
  tokens = np.random.default_rng(2).integers(0, 4, (6, 40))
  chex.assert_trees_all_equal(ar_hits.seen_earlier_mask(tokens), naive_seen_earlier(tokens))


def naive_seen_earlier_in_document(tokens, eot):
  """The definition spelled out: an earlier (x_{s-1}, x_s) = (x_{t-1}, x_t) with no EOT in x_{s-1} .. x_t."""
  mask = np.zeros(tokens.shape, bool)
  for i, row in enumerate(tokens):
    for t in range(1, len(row)):
      mask[i, t] = any((row[s - 1], row[s]) == (row[t - 1], row[t]) and eot not in row[s - 1:t + 1]
                       for s in range(1, t))
  return mask


def test_seen_earlier_stays_within_a_document():
  eot = 9
  tokens = np.array([
      [5, 6, 9, 5, 6, 7, 5, 6],  # (5, 6) at t = 1 is in the previous document: first hit at t = 7
      [1, 2, 9, 1, 2, 9, 1, 2],  # the same document twice after a cut: never within one document
      [9, 3, 9, 3, 9, 3, 4, 4],  # (9, 3) repeats but spans a boundary each time; (3, 9) ends in the EOT
      [4, 9, 9, 4, 4, 4, 9, 9],  # (9, 9): an empty document, never a hit; (4, 4) twice after the last EOT
      [2, 3, 2, 3, 2, 3, 9, 0],  # no EOT before t = 3, 5: hits; nothing after the EOT repeats
  ])
  expected = np.array([
      [0, 0, 0, 0, 0, 0, 0, 1],
      [0, 0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 1, 0, 0],
      [0, 0, 0, 1, 1, 1, 0, 0],
  ], bool)
  chex.assert_trees_all_equal(ar_hits.seen_earlier_mask(tokens, eot_id=eot), expected)
  assert ar_hits.seen_earlier_mask(tokens)[1].sum() == 4, "without eot_id the row is the context"
  random_rows = np.random.default_rng(3).integers(0, 4, (8, 48))  # token 3 as EOT: ~1 in 4
  chex.assert_trees_all_equal(ar_hits.seen_earlier_mask(random_rows, eot_id=3),
                              naive_seen_earlier_in_document(random_rows, 3))


def test_ar_hits_use_the_counts_eot_id(tmp_path):
  tokens = np.array([[5, 6, 9, 5, 6, 7, 5, 6]])
  logprobs = np.full(tokens.shape, -1.0)
  logprobs[:, 0] = np.nan
  counts = ar_hits.count_bigrams(np.array([[0, 1, 9, 0, 1]]), vocab_size=10, eot_id=9)
  assert counts.count_of(9, 0) == 1, "bigrams across a boundary are counted"
  path = str(tmp_path / "counts.npz")
  counts.save(path)
  loaded = BigramCounts.load(path)
  assert loaded.eot_id == 9
  chex.assert_trees_all_equal(ar_hits.ar_hit_mask(tokens, loaded, 10)[0], np.arange(8) == 7)
  assert ar_hits.analyze(tokens, logprobs, loaded, 10).slices["ar_hits"].num_tokens == 1
  no_eot = BigramCounts(counts.codes, counts.counts, 10, counts.num_tokens)  # counts of an older run
  assert ar_hits.analyze(tokens, logprobs, no_eot, 10).slices["ar_hits"].num_tokens == 2  # t = 4, 7
  with pytest.raises(ValueError, match=r"eot_id must be None or a token id in \[0, 10\), got 10"):
    ar_hits.count_bigrams(tokens, vocab_size=10, eot_id=10)
  with pytest.raises(ValueError, match="end-of-text tokens 9 and None"):
    counts.merge(no_eot)


def test_ar_hit_needs_a_rare_bigram():
  tokens = np.array([[5, 6, 7, 5, 6, 7]])  # (5, 6) and (6, 7) seen earlier at t = 4, 5
  training = np.array([[5, 6] * 3 + [6, 7], [1, 2, 3, 4, 6, 7, 8, 9]])  # (5, 6) 3 times, (6, 7) twice
  counts = ar_hits.count_bigrams(training, vocab_size=10)
  assert counts.count_of(5, 6) == 3 and counts.count_of(6, 7) == 2
  chex.assert_trees_all_equal(ar_hits.ar_hit_mask(tokens, counts, threshold=3)[0],
                              np.array([0, 0, 0, 0, 0, 1], bool))  # (5, 6): 3 is not below 3
  chex.assert_trees_all_equal(ar_hits.ar_hit_mask(tokens, counts, threshold=4)[0],
                              np.array([0, 0, 0, 0, 1, 1], bool))
  chex.assert_trees_all_equal(ar_hits.ar_hit_mask(tokens, counts, threshold=2)[0], np.zeros(6, bool))
  with pytest.raises(ValueError, match="threshold must be an integer >= 1"):
    ar_hits.ar_hit_mask(tokens, counts, threshold=0)


def test_scaled_threshold():
  assert ar_hits.scaled_threshold(10_000_000_000) == 1250  # the paper
  assert ar_hits.scaled_threshold(1_000_000_000) == 125
  assert ar_hits.scaled_threshold(1_800_000) == ar_hits.DEFAULT_THRESHOLD_FLOOR == 10
  assert ar_hits.scaled_threshold(1_800_000, floor=3) == 3
  with pytest.raises(ValueError, match="floor must be an integer >= 1"):
    ar_hits.scaled_threshold(100, floor=0)


def test_frequency_buckets():
  assert ar_hits.frequency_buckets(1) == [(0, 0)]
  assert ar_hits.frequency_buckets(5) == [(0, 0), (1, 1), (2, 3), (4, 4)]
  buckets = ar_hits.frequency_buckets(1250)
  assert buckets[-2:] == [(512, 1023), (1024, 1249)]
  assert all(b[0] == a[1] + 1 for a, b in zip(buckets, buckets[1:])), "buckets must tile [0, threshold)"


# ---------------------------------------------------------------------------------- Slices and the gap


def test_slice_statistics_hand_made():
  tokens = np.array([[5, 6, 7, 5, 6, 9, 6, 9, 6, 9]])
  # seen earlier: t = 4 (5, 6), t = 7 (6, 9), t = 8 (9, 6), t = 9 (6, 9, not evaluated: NaN)
  logprobs = np.array([[np.nan, -1.0, -2.0, -3.0, -0.5, -4.0, -0.25, -1.0, -0.5, np.nan]])
  training = np.array([[9, 6, 9, 6, 9]])  # (9, 6) twice, (6, 9) twice; (5, 6) never
  report = ar_hits.analyze(tokens, logprobs, ar_hits.count_bigrams(training, 10), threshold=5)
  hits, other, everything = (report.slices[k] for k in ("ar_hits", "other", "all"))
  assert (hits.num_tokens, other.num_tokens, everything.num_tokens) == (3, 5, 8)
  np.testing.assert_allclose([hits.mean_logprob, other.mean_logprob, everything.mean_logprob],
                             [-2.0 / 3, -10.25 / 5, -12.25 / 8])
  np.testing.assert_allclose([hits.mean_nll, hits.perplexity], [2.0 / 3, math.exp(2.0 / 3)])
  np.testing.assert_allclose([hits.share, other.share, everything.share], [3 / 8, 5 / 8, 1.0])
  by_label = {b.label: b for b in report.buckets}
  assert list(by_label) == ["0", "1", "2-3", "4"]
  assert by_label["0"].stats.num_tokens == 1 and by_label["2-3"].stats.num_tokens == 2
  np.testing.assert_allclose(by_label["0"].stats.mean_logprob, -0.5)
  np.testing.assert_allclose(by_label["2-3"].stats.mean_logprob, -1.5 / 2)
  np.testing.assert_allclose([by_label["0"].share_of_hits, by_label["2-3"].share_of_hits], [1 / 3, 2 / 3])
  assert by_label["1"].stats.num_tokens == 0 and math.isnan(by_label["1"].stats.perplexity)
  assert report.to_dict()["slices"]["ar_hits"]["num_tokens"] == 3
  assert ar_hits.analyze(tokens, logprobs, ar_hits.count_bigrams(training, 10), threshold=2).slices[
      "ar_hits"].num_tokens == 1, "(9, 6) and (6, 9), seen twice, are not below 2"


def test_gap_explained_paper_numbers():
  # Table 1, H3 72M vs attention 72M (log-perplexities), AR hits 6.4% of tokens
  result = ar_hits.gap_explained(nll_hits_m=2.63, nll_hits_ref=0.88, nll_all_m=2.76, nll_all_ref=2.56,
                                 hit_share=0.064)
  np.testing.assert_allclose(result.value, (2.63 - 0.88) * 0.064 / (2.76 - 2.56))
  np.testing.assert_allclose(result.gap, 0.2)
  assert result.reason == ""


def test_gap_explained_cap_and_no_gap_cases():
  capped = ar_hits.gap_explained(3.0, 1.0, 2.1, 2.0, hit_share=0.5)  # ratio 10
  assert capped.value == 1.0 and "capped" in capped.reason
  better_overall = ar_hits.gap_explained(3.0, 1.0, 1.9, 2.0, hit_share=0.1)  # paper: all ascribed to AR
  assert better_overall.value == 1.0 and "no overall gap" in better_overall.reason
  assert better_overall.gap == pytest.approx(-0.1)
  no_gap = ar_hits.gap_explained(0.5, 1.0, 2.0, 2.0, hit_share=0.1)
  assert no_gap.value is None and "no gap" in no_gap.reason
  negative = ar_hits.gap_explained(0.5, 1.0, 2.5, 2.0, hit_share=0.2)  # m better on AR hits, worse overall
  np.testing.assert_allclose(negative.value, -0.2)
  with pytest.raises(ValueError, match=r"hit_share must be in \[0, 1\]"):
    ar_hits.gap_explained(1.0, 1.0, 2.0, 1.0, hit_share=1.5)
  with pytest.raises(ValueError, match="nll_all_m must be finite"):
    ar_hits.gap_explained(1.0, 1.0, math.nan, 1.0, hit_share=0.5)


# ----------------------------------------------------------------------------------- Evaluation files


def test_save_load_eval_round_trip(tmp_path):
  path = str(tmp_path / "ar_eval.npz")
  tokens = np.array([[1, 2, 3]], np.int64)
  logprobs = np.array([[np.nan, -0.5, -1.5]])
  ar_hits.save_eval(path, tokens, logprobs)
  loaded_tokens, loaded_logprobs = ar_hits.load_eval(path)
  chex.assert_type([loaded_tokens, loaded_logprobs], [np.int32, np.float32])
  chex.assert_trees_all_equal(loaded_tokens, tokens.astype(np.int32))
  np.testing.assert_array_equal(loaded_logprobs, logprobs.astype(np.float32))  # NaN where it was


def test_eval_file_errors(tmp_path):
  with pytest.raises(ValueError, match="same shape"):
    ar_hits.save_eval(str(tmp_path / "x.npz"), np.zeros((2, 3), int), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="negative log-likelihoods passed by mistake"):
    ar_hits.save_eval(str(tmp_path / "x.npz"), np.zeros((1, 2), int), np.array([[np.nan, 2.0]]))
  partial = str(tmp_path / "partial.npz")
  with open(partial, "wb") as f:
    np.savez(f, tokens=np.zeros((1, 2), np.int32))
  with pytest.raises(ValueError, match=re.escape(f"{partial} lacks the arrays ['logprobs']")):
    ar_hits.load_eval(partial)
  corrupt = str(tmp_path / "corrupt.npz")
  with zipfile.ZipFile(corrupt, "w") as z:
    z.writestr("tokens.npy", b"not an array")
  with pytest.raises(ValueError, match=re.escape(corrupt)):
    ar_hits.load_eval(corrupt)
  with pytest.raises(FileNotFoundError, match="missing.npz not found"):
    BigramCounts.load(str(tmp_path / "missing.npz"))


# ---------------------------------------------------------------------------------- experiments/ar_gap.py

# One context; the training split holds (1, 2) 100 times and nothing else of it. Seen earlier: t = 4 (1, 2),
# frequent, and t = 5 (2, 3), rare: the one AR hit (default threshold: the floor, 10) of 7 evaluated tokens.
TOKENS = np.array([[1, 2, 3, 1, 2, 3, 4, 5]])
HIT = np.array([[0, 0, 0, 0, 0, 1, 0, 0]], bool)


def write_run(workdir, hit_logprob, other_logprob, tokens=TOKENS, vocab_size=10, summary=None, eot_id=9):
  os.makedirs(workdir, exist_ok=True)
  if summary is not None:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
  logprobs = np.where(HIT, hit_logprob, other_logprob)
  logprobs[:, 0] = np.nan
  ar_hits.save_eval(os.path.join(workdir, "ar_eval.npz"), tokens, logprobs)
  ar_hits.count_bigrams(np.array([[1, 2] * 100]), vocab_size, eot_id).save(
      os.path.join(workdir, "bigram_counts.npz"))
  return str(workdir)


@pytest.fixture
def two_runs(tmp_path):
  # l^M = (0.5 + 6·2)/7, l^m = (2.5 + 6·2.2)/7; gap 3.2/7, AR-hit part (2.5 − 0.5)/7: explained 2/3.2 = 62.5%
  return (write_run(tmp_path / "attention", -0.5, -2.0, summary=dict(num_params=1234, train_tokens=5000)),
          write_run(tmp_path / "base_conv", -2.5, -2.2, summary=dict(num_params=999, train_tokens=5000)))


def run_ar_gap(*args):
  return subprocess.run([sys.executable, AR_GAP, *map(str, args)], capture_output=True, text=True,
                        timeout=120)


def test_ar_gap_prints_table_1(two_runs, tmp_path):
  out = run_ar_gap(*two_runs, f"--output_json={tmp_path / 'gap.json'}")
  assert out.returncode == 0, out.stderr
  assert "earlier in the same document and seen fewer than 10 times" in out.stdout
  assert "1 of 7 evaluated tokens (14.29%)" in out.stdout
  lines = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
  # perplexity (mean NLL): overall, AR hits, other
  assert (f"| 1,234 | 5,000 | {math.exp(12.5 / 7):.2f} ({12.5 / 7:.3f}) | 1.65 (0.500) | 7.39 (2.000) |"
          in lines["attention"])
  assert (f"| 999 | 5,000 | {math.exp(15.7 / 7):.2f} ({15.7 / 7:.3f}) | 12.18 (2.500) | 9.03 (2.200) | 62.5% |"
          in lines["base_conv"])
  assert "note:" not in out.stdout
  assert "overall +0.457, AR hits +2.000, other +0.200" in out.stdout
  assert "| 0 | 1 | 100.0% | 1.65 (0.500) | 12.18 (2.500) |" in out.stdout  # (2, 3) never in training
  # by position (rows of 8: buckets 1, 2-3, 4-7): attention's hit (-0.5) sits at position 5, in 4-7
  assert "| 1 | 2.000 | 2.200 |" in out.stdout
  assert "| 2-3 | 2.000 | 2.200 |" in out.stdout
  assert f"| 4-7 | {(0.5 + 3 * 2.0) / 4:.3f} | {(2.5 + 3 * 2.2) / 4:.3f} |" in out.stdout
  saved = json.loads((tmp_path / "gap.json").read_text())
  assert saved["explained"]["value"] == pytest.approx(0.625) and saved["threshold"] == 10
  assert saved["nll_by_position"]["attention"][2] == dict(start=4, stop=8, nll=pytest.approx(6.5 / 4))

  out = run_ar_gap(*two_runs, "--threshold=101")  # (1, 2), seen 100 times, becomes a hit too
  assert out.returncode == 0, out.stderr
  assert "fewer than 101 times in training (--threshold); 2 of 7" in out.stdout


def load_ar_gap_module():
  return cli.load_module(AR_GAP)


def test_ar_gap_errors(two_runs, tmp_path):
  ar_gap = load_ar_gap_module()
  attention, base_conv = two_runs
  other_tokens = write_run(tmp_path / "other_tokens", -1.0, -1.0, tokens=TOKENS[:, ::-1].copy())
  other_vocab = write_run(tmp_path / "other_vocab", -1.0, -1.0, vocab_size=11)
  no_counts = write_run(tmp_path / "no_counts", -1.0, -1.0)
  os.remove(os.path.join(no_counts, "bigram_counts.npz"))
  with pytest.raises(ValueError, match=re.escape(f"evaluated on different tokens: {attention}/ar_eval.npz")):
    ar_gap.compare(attention, other_tokens)
  with pytest.raises(ValueError, match=re.escape(f"different vocabularies: {attention}/bigram_counts.npz has 10")):
    ar_gap.compare(attention, other_vocab)
  with pytest.raises(FileNotFoundError, match=re.escape(f"{no_counts}/bigram_counts.npz not found")):
    ar_gap.compare(no_counts, base_conv)
  with pytest.raises(ValueError, match="--threshold must be an integer >= 1"):
    ar_gap.compare(attention, base_conv, threshold=0)
  shorter = write_run(tmp_path / "shorter", -1.0, -1.0, summary=dict(train_tokens=4000))
  assert "different token budgets (5,000 vs 4,000)" in ar_gap.compare(attention, shorter)["notes"][0]
  older = write_run(tmp_path / "older", -1.0, -1.0, eot_id=None)  # counts written before eot_id
  assert "names no end-of-text token" in ar_gap.compare(older, base_conv)["notes"][-1]

  os.remove(os.path.join(base_conv, "ar_eval.npz"))  # the binary: one line naming the file, exit code 1
  out = run_ar_gap(attention, base_conv)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines() == [
      f"error: {base_conv}/ar_eval.npz not found (written by experiments/lm.py at the end of training)"]
