"""The training core's reliability end to end (slow, ~1.5-3 min; 3.2-3.6 min niced at load 6-9.5): real
experiments/mqar.py subprocesses resumed past damaged checkpoints and raced on one workdir, a reduced
experiments/bench_reliability.py (its parts 1 and 2, measured once for both tests). In part 2 the process
holding the lock is paused until the other has exited, so load cannot let it finish before the other starts."""

import os

import pytest

from zoo_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bench = cli.load_module(os.path.join(REPO, "experiments", "bench_reliability.py"))

KINDS = ["truncate", "flip_one_bit", "stray_dir", "every_step_zeroed"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
  """{part title: (markdown, [verdict problems of each row])} of the reference run and parts 1 and 2."""
  results = bench.measure(str(tmp_path_factory.mktemp("reliability")), parts=[1, 2], kinds=KINDS, trials=1,
                          kills=0, seed=0)
  return {title: (markdown, [[] if v == "ok" else v.split("; ") for v in bench.verdicts(markdown)])
          for title, markdown, _ in results}


def is_noise(problem: str) -> bool:
  """Orbax's tracebacks after a failed restore, and the warning or error lines they print into."""
  return problem.endswith("traceback(s)") or problem.endswith("spliced with a traceback")


def rows_per_part():
  return [1, len(KINDS), 2]  # U; one per damage kind; two processes at once, and the second after a checkpoint


@pytest.mark.slow
def test_damaged_checkpoints_resume_exactly_and_a_second_process_is_refused(measured):
  """Every resume exits as expected from the expected step with the summary of a resume from that step and
  one `warning: ... skipped` line naming the damaged step; the second process on a workdir gets one line."""
  assert [len(problems) for _, problems in measured.values()] == rows_per_part(), list(measured)
  for title, (markdown, problems) in measured.items():
    wrong = [p for row in problems for p in row if not is_noise(p)]
    assert not wrong, f"{title}:\n{markdown}"


@pytest.mark.slow
def test_damaged_checkpoints_print_no_traceback(measured):
  for title, (markdown, problems) in measured.items():
    noisy = [p for row in problems for p in row if is_noise(p)]
    assert not noisy, f"{title}:\n{markdown}"
