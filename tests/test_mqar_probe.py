"""experiments/mqar_probe.py: trained populations tested at other (L, kv) segments."""

import os
import subprocess
import sys

import pytest

from zoo_jax import cli
from zoo_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(REPO, "experiments", "mqar_probe.py")
sys.path.insert(0, os.path.join(REPO, "tests"))
from test_train import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.slow  # trains a 2-model population: ~15 s idle
def test_probe_gives_back_each_members_test_accuracy_at_its_own_segment(tmp_path):
  summary = train.train_population(tiny_config(epochs=1), str(tmp_path / "bc"), seeds=[0, 1],
                                   learning_rates=[3e-3], name="bc")
  probe = cli.load_module(PROBE)
  rows = probe.probe(str(tmp_path), [(16, 2), (32, 4), (64, 4)], num_examples=64)  # the run's test split: 64 of L16 kv2
  assert [r["member"] for r in rows] == [m["run_id"] for m in summary["members"]]
  for row, member in zip(rows, summary["members"]):
    assert row["accuracy"]["L16_kv2"] == pytest.approx(member["test_accuracy"], abs=1e-6)
    assert 0 <= row["accuracy"]["L32_kv4"] <= 1 and row["accuracy"]["L64_kv4"] is None  # longer than seq_len 32
  out = subprocess.run([sys.executable, PROBE, str(tmp_path / "bc"), "--segments=16x2,64x4", "--num_examples=64"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert f"| bc | {rows[1]['member']} | {rows[1]['accuracy']['L16_kv2']:.3f} | – |" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--segments=32"], "--segments entries must be 'LxKV' with positive integers (e.g. 32x8), got '32'"),
    ([], "--segments must name at least one test segment 'LxKV', e.g. --segments=32x4,32x8"),
])
def test_probe_bad_segments_are_one_line(tmp_path, args, message):
  out = subprocess.run([sys.executable, PROBE, str(tmp_path), *args], capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and out.stderr.strip() == f"error: {message}"
