"""The MQAR binary's start-up checks: a bad override exits non-zero with exactly one stderr line, `error: ...`,
naming the key, before any data is generated or anything is written to the workdir; no traceback.

The in-process cases are a sample of experiments/fuzz_config.py's (which runs them all and prints the
counts): the binary's own start-up (`cli.define_config_flag`, `cli.parse_flags`, `config.expand_runs`)
on a fresh absl FlagValues."""

import os
import subprocess
import sys

import pytest

from zoo_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(REPO, "experiments", "mqar.py")
CONFIG = os.path.join(REPO, "experiments", "configs", "mqar.py")
FUZZ = cli.load_module(os.path.join(REPO, "experiments", "fuzz_config.py"))
SAMPLE = FUZZ.sample(FUZZ.cases(), 100)  # every category


# Each case is a subprocess of the binary (~3-4 s idle, ~10 s at load 8: JAX and absl imports). The default
# suite keeps one case per path (a check of the resolved config; a key ml_collections rejects while absl
# parses argv) and the in-process sample below, which covers every category; the rest run with -m slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("override,expected", [
    pytest.param("--config.model.d_modell=3",
                 "config.model has no key 'd_modell'; its keys: ['block', 'd_model'", marks=SLOW),
    ("--config.train.learning_rate=-1", "train.learning_rate must be a finite number in (0, 10], got -1.0"),
    pytest.param("--config.model.d_model=0", "model.d_model must be an integer >= 1, got 0", marks=SLOW),
    pytest.param("--config.runs.attention_L16_32.model.mixer.num_heads=0",
                 "model.mixer.num_heads must be >= 1", marks=SLOW),
    pytest.param("--config.data.vocab_size=20", "vocab_size must be > seq_len", marks=SLOW),
    pytest.param("--config.train.schedule=linear", "train.schedule must be one of", marks=SLOW),
    # Raised by ml_collections while absl parses argv (a traceback before cli.run and the checks of
    # define_config_flag): an unknown key, an index past a list, a list-valued key; a value of the wrong type.
    (f"--config={CONFIG}:attention --config.train.lr=1", "config.train has no key 'lr'"),
    pytest.param(f"--config={CONFIG}:attention --config.data.train_segments[5].seq_len=3",
                 "index 5 is out of range", marks=SLOW),
    pytest.param("--config.runs.base_conv_L16_32.model.mixer.kernel_size=5",
                 "kernel_size is a list, which ml_collections cannot", marks=SLOW),
    pytest.param("--config.train.epochs=abc",
                 "train.epochs takes an integer (the config file has 40), got 'abc'", marks=SLOW),
])
def test_bad_override_fails_at_start_up_naming_the_key(tmp_path, override, expected):
  workdir = tmp_path / "run"
  out = subprocess.run([sys.executable, BINARY, f"--workdir={workdir}", *override.split()], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr[-2000:]
  assert not workdir.exists()


@pytest.mark.parametrize("case", SAMPLE, ids=[f"{c.category}-{i}" for i, c in enumerate(SAMPLE)])
def test_fuzzed_bad_override_is_one_line_naming_the_key(tmp_path, case):
  outcomes, message = FUZZ.run_in_process(case, str(tmp_path / "run"))
  assert outcomes == ["ok"], f"{case.command()}: {outcomes}: {message}"
  assert "\n" not in message and (case.expect in message or case.args[-1].split("=")[0][9:] in message)
  assert not (tmp_path / "run").exists()


def test_the_fuzz_sample_covers_every_category():
  assert {c.category for c in SAMPLE} == {c.category for c in FUZZ.cases()}
  assert len(FUZZ.cases()) >= 300
