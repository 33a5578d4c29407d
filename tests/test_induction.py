"""zoo_jax.analysis.induction: repeated random rows, the induction score of a copier and of a know-nothing
model, NLL by position bucket, one-line errors."""

import math

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax.analysis import induction


class Uniform(nnx.Module):
  """Logits 0 everywhere: NLL log v at every position, no use of context."""

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size

  def __call__(self, tokens_bl):
    return jnp.zeros((*tokens_bl.shape, self.vocab_size))


class Copier(Uniform):
  """An ideal induction head: at position t, finds the last s < t with x_s = x_t and predicts x_{s+1}."""

  def __call__(self, tokens_bl):
    l = tokens_bl.shape[1]
    earlier_ll = jnp.arange(l)[None, :] < jnp.arange(l)[:, None]  # [t, s]: s < t
    match_bll = (tokens_bl[:, :, None] == tokens_bl[:, None, :]) & earlier_ll
    last_bl = jnp.argmax(match_bll * (jnp.arange(l) + 1), axis=-1)
    found_bl = match_bll.any(-1)
    next_bl = jnp.take_along_axis(tokens_bl, jnp.minimum(last_bl + 1, l - 1), axis=1)
    return 20.0 * found_bl[..., None] * jnp.eye(self.vocab_size)[next_bl]


def test_repeated_random_rows():
  rows_nl = induction.repeated_random_rows(3, 8, 10, seed=1, exclude=(0, 9))
  assert rows_nl.shape == (3, 16) and rows_nl.dtype == np.int32
  np.testing.assert_array_equal(rows_nl[:, :8], rows_nl[:, 8:])
  assert rows_nl.min() >= 1 and rows_nl.max() <= 8
  np.testing.assert_array_equal(rows_nl, induction.repeated_random_rows(3, 8, 10, seed=1, exclude=(0, 9)))
  assert not np.array_equal(rows_nl, induction.repeated_random_rows(3, 8, 10, seed=2, exclude=(0, 9)))


def test_score_of_uniform_is_zero_and_of_copier_near_log_v():
  v = 1000
  flat = induction.induction_score(Uniform(v), v, rows=4, half_len=16, batch_size=2)
  assert flat.nll_first == pytest.approx(math.log(v), rel=1e-5)
  assert flat.score == pytest.approx(0.0, abs=1e-4)
  copy = induction.induction_score(Copier(v), v, rows=4, half_len=16, batch_size=2)
  assert copy.nll_second < 0.01
  assert copy.score > 0.9 * math.log(v)
  assert "score" in copy.text()
  # Given first copies: in [0..13, 0, 1] the copier predicts position 15 of the first copy (1 after 0).
  halves_nh = np.array([list(range(14)) + [0, 1], list(range(100, 116))])
  text = induction.induction_score(Copier(v), v, halves_nh=halves_nh, batch_size=2)
  assert (text.rows, text.half_len) == (2, 16)
  assert text.nll_first == pytest.approx((14 + 15) / 30 * math.log(v), rel=1e-3)
  assert text.score > 0.5 * math.log(v)


def test_nll_by_position_buckets():
  lp_nl = -np.array([[np.nan, 1, 2, 4, 3, 5], [np.nan, 3, 2, np.nan, 1, 1]])
  buckets = induction.nll_by_position(lp_nl)
  assert [(a, b) for a, b, _ in buckets] == [(1, 2), (2, 4), (4, 6)]
  np.testing.assert_allclose([x for _, _, x in buckets], [2.0, 8 / 3, 2.5])


@pytest.mark.parametrize("call, message", [
    (lambda: induction.repeated_random_rows(0, 8, 10), "rows must be an integer >= 1"),
    (lambda: induction.repeated_random_rows(2, 1, 10), "half_len must be an integer >= 2"),
    (lambda: induction.repeated_random_rows(2, 8, 3, exclude=(0, 1)), "exclude must leave"),
    (lambda: induction.induction_score(Uniform(4), 4, batch_size=0), "batch_size must be"),
    (lambda: induction.nll_by_position(np.zeros(5)), "logprobs must be"),
    (lambda: induction.induction_score(Uniform(4), 4, halves_nh=np.zeros((2, 1), int)), "halves must be"),
])
def test_bad_input_one_line(call, message):
  with pytest.raises(ValueError, match=message) as e:
    call()
  assert "\n" not in str(e.value)
