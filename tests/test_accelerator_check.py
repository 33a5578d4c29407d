"""experiments/accelerator_check.py: the one prepared accelerator run (kernels against references, the
benchmarks at paper shapes, LM MFU), its time guards, and the kernel defaults it relies on (`FASTEST` is
'xla' everywhere until measured on hardware; the GPU Pallas path is experimental and falls back to XLA
when jax has no Triton backend).

The end-to-end runs (`--size=tiny` on CPU, a subprocess each) take minutes on a loaded 2-core machine:
they are slow tests.
"""

import json
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from zoo_jax import cli
from zoo_jax.ops import _dispatch, _fftconv, gated_conv, long_conv, short_conv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "accelerator_check.py")
check = cli.load_module(SCRIPT)


def _run(tmp_path, *args, timeout=900):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, SCRIPT, f"--out_dir={tmp_path}", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)
  doc_path = tmp_path / "accelerator_check.json"
  doc = json.loads(doc_path.read_text()) if doc_path.exists() else None
  return result, doc


@pytest.mark.parametrize("op", [gated_conv, long_conv, short_conv], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_fastest_is_xla_on_every_backend_and_never_an_experimental_path(op):
  assert op.FASTEST == {"cpu": "xla", "gpu": "xla", "tpu": "xla"}, "change FASTEST only from hardware measurements"
  for backend, path in op.FASTEST.items():
    assert path not in _dispatch.EXPERIMENTAL.get(backend, ()), f"{backend} defaults to experimental {path}"


def test_gpu_pallas_path_needs_the_triton_backend(monkeypatch):
  """On a GPU whose jax has no Pallas Triton backend, the fused kernel is unsupported (dispatchers fall
  back to XLA) and an explicit call or compiler_params is one line naming the cause."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(_dispatch, "pallas_gpu_backend", lambda: "triton")
  assert _fftconv.pallas_supported(1024, 32)
  monkeypatch.setattr(_dispatch, "pallas_gpu_backend", lambda: None)
  assert not _fftconv.pallas_supported(1024, 32)
  with pytest.raises(ValueError, match=r"^the pallas path on gpu needs Pallas's Triton backend") as e:
    _fftconv.check_pallas_supported(1024, 32)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"Triton backend, which jax .* does not have") as e:
    _dispatch.compiler_params()
  assert "\n" not in str(e.value)


def test_largest_batch_fits_the_line_through_two_compiled_sizes():
  gib = 2**30
  points = [(8, 10 * gib), (16, 18 * gib)]  # 1 GiB per example over 2 GiB fixed
  assert check.largest_batch(points, 100 * gib, multiple=8, max_batch=1024) == 88  # (90 - 2) // 1, a multiple of 8
  assert check.largest_batch(points, 100 * gib, multiple=1, max_batch=1024) == 88
  assert check.largest_batch(points, 100 * gib, multiple=8, max_batch=60) == 56
  assert check.largest_batch(points, 1 * gib, multiple=8, max_batch=1024) == 8  # never below one multiple


def test_a_unit_past_its_grace_is_timed_out_and_the_rest_of_its_section_skipped(monkeypatch):
  monkeypatch.setattr(check, "UNIT_GRACE_S", 0.3)
  monkeypatch.setattr(check, "STUCK", [])
  section = dict(rows=[])
  release = threading.Event()

  def boom():
    raise RuntimeError("lowering\nfailed")

  units = [("fine", lambda: ("ok", "done", dict(x=1.0))), ("broken", boom),
           ("hangs", lambda: release.wait(30) and ("ok", "", {})), ("after", lambda: ("ok", "", {}))]
  t0 = time.monotonic()
  check._run_units(section, check.Guard(0.2), units)  # pylint: disable=protected-access
  release.set()
  assert time.monotonic() - t0 < 10
  assert [(r["check"], r["status"]) for r in section["rows"]] == [
      ("fine", "ok"), ("broken", "error"), ("hangs", "timed out"), ("after", "skipped (time guard)")]
  assert section["rows"][0]["x"] == 1.0 and section["rows"][1]["text"] == "RuntimeError: lowering failed"
  assert check.STUCK == ["hangs"]


def test_a_section_past_its_deadline_runs_no_more_units():
  section = dict(rows=[])
  guard = check.Guard(0.0)
  guard.deadline = time.monotonic() - 1
  check._run_units(section, guard, [("a", lambda: ("ok", "", {}))])  # pylint: disable=protected-access
  assert [r["status"] for r in section["rows"]] == ["skipped (time guard)"]


@pytest.mark.parametrize("kind,peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("cpu", None)])
def test_peak_by_device_kind(kind, peak):
  assert check.peak_bf16_tflops(kind) == peak


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
  # The default budget is the GPU check's 8 minutes; on 2 shared CPU cores the tiny run took 65 s alone but
  # 480 s beside another job (load 4.2), where the watchdog then failed it. The watchdog has its own test.
  result, doc = _run(tmp_path, "--size=tiny", "--budget_s=1800", timeout=2400)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert doc["size"] == "tiny" and doc["backend"] == jax.default_backend() and doc["passed"] is True
  assert doc["jax_version"] == jax.__version__ and doc["device_kind"]
  assert list(doc["sections"]) == list(check.SECTIONS)
  for name, section in doc["sections"].items():
    assert section["status"] == "ok", (name, section)
    assert isinstance(section["wall_s"], float) and section["wall_s"] > 0, name
    assert section["rows"], name
    numbers = {k: v for k, v in section["figures"].items() if v is not None}
    assert numbers and all(isinstance(v, (int, float)) and np.isfinite(v) for v in numbers.values()), (name, numbers)
  kernels = doc["sections"]["kernels"]
  ops = {r["check"].split()[0] for r in kernels["rows"]}
  assert ops == {"gated_conv", "long_conv", "short_conv"}
  assert all(r["status"] == "pass" for r in kernels["rows"]), kernels["rows"]
  assert kernels["figures"]["passed"] == len(kernels["rows"]) and kernels["figures"]["worst_error_of_tolerance"] <= 1
  assert doc["sections"]["lm_mfu"]["figures"]["tokens_per_s"] > 0
  assert doc["sections"]["sweep"]["figures"]["runs"] == 2
  table = (tmp_path / "accelerator_check.md").read_text()
  assert table.strip().endswith("PASSED") and table in result.stdout
  assert sum(line.startswith("| kernels |") for line in table.splitlines()) == len(kernels["rows"])


@pytest.mark.slow
def test_watchdog_writes_the_outputs_and_fails_the_run_at_the_budget(tmp_path):
  result, doc = _run(tmp_path, "--size=tiny", "--budget_s=10", "--sections=sweep", timeout=300)
  assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
  assert doc["sections"]["sweep"]["status"] == "timed out" and doc["passed"] is False
  assert doc["failed"] == ["sweep: timed out"] and doc["total_s"] < 60
  assert (tmp_path / "accelerator_check.md").read_text().strip().endswith("FAILED: sweep: timed out")


@pytest.mark.slow
@pytest.mark.parametrize("flag,message", [("--budget_s=5", "--budget_s must be in [10, 3600], got 5"),
                                          ("--sections=kernels,bogus", "--sections must be a non-empty list of"),
                                          ("--size=huge", "size")])
def test_bad_flags_are_one_line_errors(tmp_path, flag, message):
  result, doc = _run(tmp_path, flag, timeout=120)
  assert result.returncode != 0 and doc is None
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
