"""The MQAR table and accuracy-against-length plot, from synthetic summaries (no training)."""

import numpy as np
import pytest

from zoo_jax import train


def _member(seed, slices, lr=3e-3):
  overall = sum(slices.values()) / len(slices)
  return dict(learning_rate=lr, seed=seed, validation_accuracy=overall, test_accuracy=overall,
              test_slices=slices, best_epoch=seed + 1, epochs_run=3, status="ok", num_params=10, state_size=20,
              tokens_per_sec=1.0, train_seconds=2.0)


def _mixed_run(seeds_slices, mixer="attention"):
  """A population summary of one run trained on a mixture of lengths, tested at each (as train_population
  writes it)."""
  summary = train.summarize_population([_member(i, s) for i, s in enumerate(seeds_slices)])
  return dict(summary, d_model=64, seq_len=16, num_kv_pairs=4, mixer=dict(name=mixer))


def test_a_seed_counts_as_solved_only_at_every_test_length():
  # Seed 0 solves both lengths; seed 1 has overall 0.991 (>= 0.99) but only 0.985 at L 32; seed 2 neither.
  run = _mixed_run([{"L16_kv4": 0.999, "L32_kv4": 0.995}, {"L16_kv4": 0.997, "L32_kv4": 0.985},
                    {"L16_kv4": 0.5, "L32_kv4": 0.3}])
  assert run["test_accuracies"][1] >= train.SOLVED_ACCURACY
  assert run["seeds_solved"] == 1 and run["num_seeds"] == 3
  assert run["test_slices_std"]["L32_kv4"] == pytest.approx(float(np.std([0.995, 0.985, 0.3])))
  table = train.format_table({"attention-mix": run})
  header, _, row = table.splitlines()
  assert "seeds ≥ 0.99 at every L" in header and "| 1/3 |" in row
  assert "| 0.832 | 0.760 |" in row  # the per-length test columns: means over seeds
  # A summary written before the every-length rule (seeds_solved counted overall accuracy) reads the same.
  assert "| 1/3 |" in train.format_table({"old": dict(run, seeds_solved=2)})
  # A single run (no members): its own slices decide.
  single = dict(d_model=8, num_params=1, state_size=2, validation_accuracy=0.996, test_accuracy=0.995,
                test_slices={"L16_kv4": 1.0, "L32_kv4": 0.98}, best_epoch=1, tokens_per_sec=1.0, train_seconds=1.0)
  assert "| 0/1 |" in train.format_table({"single": single})
  assert "| 1/1 |" in train.format_table({"single": dict(single, test_slices={"L16_kv4": 0.995})})


def test_solved_refuses_a_non_finite_slice():
  assert train.solved(0.995, {}) and not train.solved(0.98, {})
  assert not train.solved(0.995, {"L16_kv4": 1.0, "L32_kv4": float("nan")})


def test_plot_reads_a_mixed_length_run_at_each_of_its_test_lengths(tmp_path):
  attention = _mixed_run([{"L16_kv4": 0.999, "L32_kv4": 0.995}, {"L16_kv4": 0.997, "L32_kv4": 0.993}])
  base_conv = _mixed_run([{"L16_kv4": 0.28, "L32_kv4": 0.26}, {"L16_kv4": 0.30, "L32_kv4": 0.24}], "base_conv")
  points = train.length_points(base_conv)
  assert sorted(points) == [16, 32]
  assert points[16] == pytest.approx((0.29, 0.01)) and points[32] == pytest.approx((0.25, 0.01))
  path = tmp_path / "accuracy_vs_length.png"
  assert train.plot_accuracy_vs_length({"attention": attention, "base_conv": base_conv}, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # One length per mixer (single-length runs of different mixers): nothing to plot.
  single = dict(attention, test_slices={"L32_kv4": 0.99}, test_slices_std={"L32_kv4": 0.0})
  assert not train.plot_accuracy_vs_length({"a": single}, str(tmp_path / "none.png"))
  assert not (tmp_path / "none.png").exists()
  # Single-length runs of one mixer at two lengths (the `quick` preset's layout) still make a curve.
  assert sorted(train.length_points(single)) == [32]
  other = dict(single, test_slices={"L16_kv4": 1.0}, test_slices_std={"L16_kv4": 0.0})
  assert train.plot_accuracy_vs_length({"a16": other, "a32": single}, str(tmp_path / "two.png"))
