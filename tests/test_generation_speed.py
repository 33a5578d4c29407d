"""zoo_jax.analysis.generation_speed: the crossover context and the table (pure functions over rows)."""

import math

from zoo_jax.analysis import generation_speed


def rows(speeds: dict[str, list[float]], contexts=(1024, 4096, 16384), batch=8):
  return [dict(run=run, context=c, batch=batch, decode_tokens_per_s=v, state_bytes_per_seq=1024 * c)
          for run, values in speeds.items() for c, v in zip(contexts, values)]


def test_crossover_is_log_interpolated_between_the_contexts_it_falls_between():
  # attention / recurrent: 4x, 1x at 4096 exactly; then 1/4x.
  r = rows({"attention": [8000, 2000, 500], "rnn": [2000, 2000, 2000]})
  assert math.isclose(generation_speed.crossover(r, "rnn", 8), 4096.0)
  # halfway in log-ratio between 1024 (ratio 2) and 4096 (ratio 1/2): the geometric mean, 2048.
  r = rows({"attention": [4000, 1000, 250], "rnn": [2000, 2000, 2000]})
  assert math.isclose(generation_speed.crossover(r, "rnn", 8), 2048.0)


def test_no_crossover_in_range_and_one_below_it():
  r = rows({"attention": [8000, 4000, 3000], "slow": [100, 100, 100], "fast": [9000, 9000, 9000]})
  assert generation_speed.crossover(r, "slow", 8) is None
  assert generation_speed.crossover(r, "fast", 8) == 1024.0
  table = generation_speed.table(r, {"attention": 1.0})
  assert "| slow | 100 (1,024) | 100 (4,096) | 100 (16,384) | – | none in range |" in table
  assert "| fast | 9,000 (1,024) | 9,000 (4,096) | 9,000 (16,384) | – | ≤ 1,024 |" in table
  assert "| attention | 8,000 (1,024) | 4,000 (4,096) | 3,000 (16,384) | 1.000 | — |" in table
