"""The MQAR binary's start-up checks: a bad override exits non-zero with a one-line error naming the key,
before any data is generated or anything is written to the workdir."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(REPO, "experiments", "mqar.py")


@pytest.mark.parametrize("override,expected", [
    ("--config.model.d_modell=3", "d_modell"),
    ("--config.train.learning_rate=-1", "train.learning_rate must be a finite number in (0, 10], got -1.0"),
    ("--config.model.d_model=0", "model.d_model must be an integer >= 1, got 0"),
    ("--config.runs.attention.model.mixer.num_heads=0", "model.mixer.num_heads must be >= 1"),
    ("--config.data.vocab_size=20", "vocab_size must be > seq_len"),
    ("--config.train.schedule=linear", "train.schedule must be one of"),
])
def test_bad_override_fails_at_start_up_naming_the_key(tmp_path, override, expected):
  workdir = tmp_path / "run"
  out = subprocess.run([sys.executable, BINARY, f"--workdir={workdir}", override], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert expected in last, out.stderr[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  assert not workdir.exists()
