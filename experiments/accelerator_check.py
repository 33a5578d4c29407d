r"""One prepared accelerator check: the compiled Pallas kernels against their references, and the kernel,
training, sweep and LM benchmarks at their paper shapes, in one run of at most 8 minutes.

    python experiments/accelerator_check.py                                  # a GPU / TPU: --size=full
    python experiments/accelerator_check.py --size=tiny --out_dir=/tmp/acc   # CPU / CI: ~1 min of CPU time

Writes one markdown table (stdout and --out_dir/accelerator_check.md) and one JSON of the figures
(--out_dir/accelerator_check.json): device kind, backend, jax version, load average, and per section its
status, wall time, rows and numeric `figures`. Sections, in the order they run (`--sections` picks some):

  kernels        the Pallas kernels (`gated_conv`, `long_conv`, `short_conv`), called directly, against their
                 plain-jnp references: the value and the gradients with respect to every input, float32
                 and bfloat16 (tolerances: max |error| <= rtol · max |reference|, rtol 1e-4 / 2e-2 for the
                 value and 10× that for gradients, as tests/test_kernels_*.py). Compiled (interpret=False)
                 on an accelerator, interpreted on CPU; short sequences first. A shape a backend's kernel
                 does not take (short_conv on GPU; the GPU kernels when jax has no Triton backend, see
                 `zoo_jax/ops/_dispatch.py`) is an `unsupported` row, not a failure. Each row gives the
                 compile time and the median time of the compiled fwd+bwd call.
  lm_mfu         experiments/bench_lm.py's step for attention_125m at L 1,024 in bfloat16, at the largest
                 batch that fits: two compiled steps (batch 8 and 16) give the step's new bytes
                 (outputs − aliased + temporaries, `compiled.memory_analysis()`) as a line in the batch, the
                 largest multiple of 8 under 90% of the device's free memory is compiled and checked, then
                 timed. MFU = model FLOP/s (bench_lm's 6N + 12·layers·d·L per token) ÷ the device's dense
                 bf16 peak from `PEAK_BF16_TFLOPS` by device kind (blank when unknown, e.g. CPU).
  train          experiments/bench_train.py's `bench_one` at Figure-2 shapes (Zoology's batch sizes, 2 layers,
                 vocabulary 8192), the zoo_jax step only; the PyTorch port of Zoology's step runs on CPU
                 only, so it is compared only when the backend is CPU and torch imports.
  sweep          experiments/bench_sweep.py's `measure`: a group of 4 learning rates × 2 seeds vmapped as one
                 population against the same runs one after another.
  bench_kernels  experiments/bench_kernels.py's `measure` at FlashFFTConv's shapes (batch 64, 768 channels,
                 L 1K–16K, bfloat16): the xla and monarch paths of every op, then pallas (last: its long-L
                 compiles are the likeliest to take minutes). ×xla is a path's time ÷ xla's in this run.

Time guards. The whole run has --budget_s (default 480 s = 8 minutes). Each section gets a share of the
time left when it starts (`SHARES`) and checks its deadline between units (a kernel case, a benchmark
row): units it does not reach are `skipped (time guard)` rows. Each unit runs in a worker thread; one still
running `Guard.grace` after its section's deadline is a `timed out` row, left running in the background
(a compile cannot be interrupted), and its section's other units are skipped. A watchdog thread ends the
process at the budget whatever is running: it writes the table and the JSON with the running section
marked `timed out` and exits 1. `tiny` shrinks every shape (CPU, CI).

Exit status 0 when every kernel check passed and every section ran without an error or a timeout; 1
otherwise (benchmark rows skipped by a section's time guard do not fail the run; kernel checks skipped,
units timed out and sections left no time do).
"""

import functools
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
import traceback
import warnings

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from zoo_jax import cli
from zoo_jax.configs import lm as lm_configs
from zoo_jax.ops import _dispatch, _fftconv, gated_conv, long_conv, short_conv

_EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
# The order they run in: the kernel checks, then the LM MFU, and the Pallas benchmarks last (their long-L
# compiles are the likeliest to take minutes).
SECTIONS = ("kernels", "lm_mfu", "train", "sweep", "bench_kernels")
SHARES = {"kernels": 0.15, "lm_mfu": 0.25, "train": 0.2, "sweep": 0.15, "bench_kernels": 0.25}
MIN_SECTION_S = 5.0  # a section with less time than this left is skipped whole
UNIT_GRACE_S = 20.0  # at least this long past its section's deadline before a unit is `timed out`
WRITE_RESERVE = (0.05, 10.0)  # kept back from the sections for writing the outputs: 5% of the budget, <= 10 s

# Dense bfloat16 peak TFLOP/s by device kind (lower-case substring of `device_kind`, first match wins):
# NVIDIA's datasheets (SXM; H100 PCIe 756) and Google Cloud's TPU pages.
PEAK_BF16_TFLOPS = (("h200", 989.0), ("h100 pcie", 756.0), ("h100", 989.0), ("a100", 312.0),
                    ("tpu v4", 275.0), ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v5p", 459.0),
                    ("tpu v6 lite", 918.0), ("tpu v6e", 918.0))

# Shapes per size. Kernel checks: (batch, channels, {op: lengths}, dtypes).
KERNEL_CASES = {
    "tiny": dict(batch=2, channels=8, lengths={"gated_conv": [16], "long_conv": [16], "short_conv": [16]},
                 dtypes=("float32", "bfloat16")),
    "full": dict(batch=2, channels=32, lengths={"gated_conv": [256, 1024, 4096], "long_conv": [256, 1024, 4096],
                                                "short_conv": [256, 1024]},
                 dtypes=("float32", "bfloat16")),
}
RTOL = {"float32": 1e-4, "bfloat16": 2e-2}  # value; gradients 10×
BENCH_KERNELS = {
    "tiny": dict(batch=2, channels=16, lengths=[64], paths=["xla", "monarch"], repeats=5),
    "full": dict(batch=64, channels=768, lengths=[1024, 4096, 8192, 16384], paths=["xla", "monarch", "pallas"],
                 repeats=5),
}
TRAIN = {
    "tiny": dict(mixers=["base_conv"], d_models=[16], seq_lens=[16], batch_scale=64, warmup=1,
                 steps=2),
    "full": dict(mixers=["attention", "base_conv", "based", "hyena", "mamba"], d_models=[256],
                 seq_lens=[512, 64], batch_scale=1, warmup=2, steps=5),
}
SWEEP = {
    "tiny": dict(mixer="base_conv", d_model=16, seq_len=16, batch_size=8, steps=2, learning_rates=[1e-3, 3e-3],
                 seeds=[0]),
    "full": dict(mixer="base_conv", d_model=64, seq_len=64, batch_size=64, steps=100,
                 learning_rates=[1e-4, 3e-4, 1e-3, 3e-3], seeds=[0, 1]),
}
LM = {
    "tiny": dict(preset="attention", seq_len=32, dtype="float32", probe=(1, 2), multiple=1, max_batch=4, steps=2),
    "full": dict(preset="attention_125m", seq_len=1024, dtype="bfloat16", probe=(8, 16), multiple=8,
                 max_batch=1024, steps=5),
}

_SIZE = flags.DEFINE_enum("size", None, ["tiny", "full"], "Shapes: 'full' (the default on a GPU / TPU) or "
                          "'tiny' (the default on CPU).")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/zoo_jax_accelerator_check", "Where the .md and .json go.")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "Wall-clock budget of the whole run, seconds (10 to 3600).")
_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS), f"Sections to run, of {', '.join(SECTIONS)}.")
_MEMORY_GIB = flags.DEFINE_float("device_memory_gib", None, "Free device memory to size the LM batch against "
                                 "(GiB); default: the device's own (bytes_limit - bytes_in_use), none on CPU.")


def _load(name: str):
  return cli.load_module(os.path.join(_EXPERIMENTS, f"{name}.py"))


# ---------------------------------------------------------------------------------------------- Report


class Report:
  """Rows and figures of every section, written whole (table and JSON) once, by the main thread or by
  the watchdog, whichever gets there first."""

  def __init__(self, size: str, budget_s: float, out_dir: str):
    self.start = time.monotonic()
    self.out_dir = out_dir
    self.lock = threading.Lock()
    self.written = False
    self.current = None
    self.info = dict(
        device_kind=jax.devices()[0].device_kind, backend=jax.default_backend(), device_count=jax.device_count(),
        jax_version=jax.__version__, python=platform.python_version(), host=platform.node(),
        cpu_count=os.cpu_count(), size=size, budget_s=budget_s, load_average_start=list(os.getloadavg()),
        pallas_gpu_backend=_pallas_gpu_backend_and_warnings(),
        fastest={op.__name__.rsplit(".", 1)[-1]: dict(op.FASTEST) for op in (gated_conv, long_conv, short_conv)})
    self.sections = {}

  def open(self, name: str, budget_s: float) -> dict:
    section = dict(status="running", budget_s=round(budget_s, 1), wall_s=None, rows=[], figures={}, note="")
    self.sections[name] = section
    self.current = (name, time.monotonic())
    return section

  def close(self, name: str, status: str, note: str = "") -> None:
    section = self.sections[name]
    section.update(status=status, wall_s=round(time.monotonic() - self.current[1], 2))
    if note:
      section["note"] = note
    self.current = None

  def failed(self) -> list[str]:
    """What makes the run fail: kernel checks not passed, sections errored, timed out or not run."""
    bad = [f"{name}: {s['status']}" for name, s in self.sections.items()
           if s["status"] in ("error", "timed out", "skipped (time guard)")]
    bad += [f"kernels: {r['check']}: {r['status']}" for r in self.sections.get("kernels", {}).get("rows", [])
            if r["status"] not in ("pass", "unsupported")]
    return bad

  def write(self, timed_out: bool = False) -> tuple[str, bool] | None:
    """(table, passed), or None when it was already written."""
    with self.lock:
      if self.written:
        return None
      self.written = True
    if timed_out and self.current is not None:
      name, t0 = self.current
      self.sections[name].update(status="timed out", wall_s=round(time.monotonic() - t0, 2),
                                 note=f"the watchdog ended the run at the {self.info['budget_s']:.0f} s budget")
    failed = self.failed()
    doc = dict(self.info, total_s=round(time.monotonic() - self.start, 2), load_average_end=list(os.getloadavg()),
               passed=not failed, failed=failed, sections=self.sections)
    table = format_table(doc)
    os.makedirs(self.out_dir, exist_ok=True)
    for fname, text in (("accelerator_check.md", table + "\n"),
                        ("accelerator_check.json", json.dumps(doc, indent=1, default=_json_default) + "\n")):
      path = os.path.join(self.out_dir, fname)
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)
    return table, not failed


def _pallas_gpu_backend_and_warnings() -> str | None:
  """`_dispatch.pallas_gpu_backend()`, with the warnings its import raises (jax 0.11 deprecates Triton)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    backend = _dispatch.pallas_gpu_backend()
  notes = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught})[:3]
  return backend if not notes or backend is None else f"{backend} ({' / '.join(notes)})"


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return str(x)


def _cell(text) -> str:
  return str(text).replace("|", "/").replace("\n", " ")


def format_table(doc: dict) -> str:
  load = ", ".join(f"{x:.1f}" for x in doc["load_average_start"])
  lines = [f"# accelerator check: {doc['device_count']}× {doc['device_kind']} ({doc['backend']}), jax "
           f"{doc['jax_version']}, python {doc['python']}, {doc['host']} ({doc['cpu_count']} CPUs)",
           f"size {doc['size']}; total {doc['total_s']:.1f} s of a {doc['budget_s']:.0f} s budget; load average "
           f"{load} at the start; Pallas GPU backend: {doc['pallas_gpu_backend'] or 'none (no Triton)'}; "
           f"defaults (FASTEST): " + ", ".join(f"{op} {d}" for op, d in doc["fastest"].items()),
           "", "| section | check / row | status | figures | s |", "|---|---|---|---|---:|"]
  for name, s in doc["sections"].items():
    wall = "" if s["wall_s"] is None else f"{s['wall_s']:.1f}"
    lines.append(f"| **{name}** | (section, budget {s['budget_s']:.0f} s) | **{s['status']}** | "
                 f"{_cell(s['note'])} | {wall} |")
    for r in s["rows"]:
      lines.append(f"| {name} | {_cell(r['check'])} | {r['status']} | {_cell(r.get('text', ''))} | "
                   f"{r.get('seconds', 0.0):.1f} |")
  lines.append("")
  lines.append("PASSED" if doc["passed"] else "FAILED: " + "; ".join(doc["failed"]))
  return "\n".join(lines)


class Guard:
  """A section's deadline, and how long one unit may run past it (max(UNIT_GRACE_S, half the section's
  budget)) before it is reported `timed out` and left running in the background."""

  def __init__(self, budget_s: float):
    self.deadline = time.monotonic() + budget_s
    self.grace = max(UNIT_GRACE_S, 0.5 * budget_s)

  def expired(self) -> bool:
    return time.monotonic() >= self.deadline

  def unit_timeout(self) -> float:
    return max(self.deadline - time.monotonic(), 0.0) + self.grace


STUCK: list[str] = []  # units left running in a background thread (a compile cannot be interrupted)


def _timed_row(section: dict, check: str, fn, guard: Guard) -> dict:
  """Runs fn() -> (status, text, figures) in a worker thread and appends the row: an exception is an
  `error` row, a unit still running after `guard.unit_timeout()` a `timed out` row (left running)."""
  result = {}

  def work():
    try:
      result["value"] = fn()
    except Exception as e:  # pylint: disable=broad-except  (any failure is a row, never the end of the run)
      result["value"] = "error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", {}

  t0 = time.perf_counter()
  worker = threading.Thread(target=work, name=check, daemon=True)
  worker.start()
  worker.join(guard.unit_timeout())
  if worker.is_alive():
    STUCK.append(check)
    result["value"] = ("timed out", f"still running after {time.perf_counter() - t0:.0f} s (its section's deadline "
                       f"+ {guard.grace:.0f} s); left running in the background", {})
  status, text, figures = result["value"]
  row = dict(check=check, status=status, text=text, seconds=round(time.perf_counter() - t0, 2), **figures)
  section["rows"].append(row)
  print(f"  {check}: {status} {text} [{row['seconds']:.1f}s]", flush=True)
  return row


def _run_units(section: dict, guard: Guard, units: list[tuple[str, object]]) -> None:
  """Each (check, fn) as a row, until the section's deadline (the rest are `skipped (time guard)` rows) or
  a unit that times out (the device may be busy with it: the rest are skipped too)."""
  for i, (check, fn) in enumerate(units):
    if guard.expired() or (section["rows"] and section["rows"][-1]["status"] == "timed out"):
      for rest, _ in units[i:]:
        section["rows"].append(dict(check=rest, status="skipped (time guard)", text="", seconds=0.0))
      return
    _timed_row(section, check, fn, guard)


# ---------------------------------------------------------------------------------------------- kernels


def _rand(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _kernel_fns(op: str, batch: int, length: int, channels: int, dtype):
  """(pallas fn, reference fn, operands, why unsupported or None) of one op at one shape."""
  rng = np.random.default_rng(length)
  u = _rand(rng, (batch, length, channels), dtype)
  if op == "short_conv":
    operands = (u, _rand(rng, (4, channels), jnp.float32), _rand(rng, (channels,), jnp.float32))
    why = None if short_conv.pallas_supported(channels) else (
        f"short_conv has no compiled Pallas kernel on {jax.default_backend()} (Triton has no slices)")
    return (lambda *a: short_conv.short_conv_pallas(*a, "silu"), lambda *a: short_conv.short_conv_reference(*a, "silu"),
            operands, why)
  h = _rand(rng, (length, channels), jnp.float32) / np.sqrt(length)
  d = _rand(rng, (channels,), jnp.float32)
  why = None
  if not _fftconv.pallas_supported(length, channels):
    why = (f"no Triton backend in jax {jax.__version__}" if _dispatch.pallas_gpu_backend() is None
           else f"the compiled kernel on {jax.default_backend()} does not take L={length}, {channels} channels")
  if op == "long_conv":
    return long_conv.causal_conv_pallas, long_conv.causal_conv_reference, (u, h, d), why
  operands = (u, h, _rand(rng, u.shape, dtype), _rand(rng, u.shape, dtype), d)
  return gated_conv.gated_conv_pallas, gated_conv.gated_conv_reference, operands, why


def _value_and_grads(fn, operands):
  """jit(value_and_grad) of sum(fn(*operands) · w) with respect to every operand: (compiled fn, weights)."""
  w = jnp.asarray(np.random.default_rng(9).standard_normal(operands[0].shape), jnp.float32)

  def loss(*args):
    y = fn(*args)
    return jnp.sum(y.astype(jnp.float32) * w), y

  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(operands))), has_aux=True))


def _error_ratio(actual, expected) -> tuple[float, float]:
  """(max |actual - expected|, max |expected|)."""
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  if a.shape != e.shape:
    raise ValueError(f"shape {a.shape} != reference shape {e.shape}")
  return float(np.abs(a - e).max()), float(np.abs(e).max())


def kernel_case(op: str, batch: int, length: int, channels: int, dtype_name: str):
  dtype = jnp.dtype(dtype_name)
  pallas_fn, reference_fn, operands, why = _kernel_fns(op, batch, length, channels, dtype)
  if why is not None:
    return "unsupported", why, {}
  rtol = RTOL[dtype_name]
  (_, y_ref), g_ref = _value_and_grads(reference_fn, operands)(*operands)
  step = _value_and_grads(pallas_fn, operands)
  t0 = time.perf_counter()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    (_, y), g = jax.block_until_ready(step(*operands))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(step(*operands))
    times.append(time.perf_counter() - t0)
  worst, parts = 0.0, []
  for name, a, e, tol in [("y", y, y_ref, rtol)] + [(f"d{i}", ga, ge, 10 * rtol)
                                                     for i, (ga, ge) in enumerate(zip(g, g_ref))]:
    err, scale = _error_ratio(a, e)
    ratio = err / (tol * scale) if scale > 0 else (0.0 if err == 0 else float("inf"))
    worst = max(worst, ratio)
    if ratio > 1:
      parts.append(f"{name} err {err:.3g} > {tol:g}·{scale:.3g}")
  ok = np.isfinite(worst) and worst <= 1
  notes = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}" for w in caught})[:3]
  text = (f"worst error {worst:.3g} of tolerance (rtol {rtol:g} value, {10 * rtol:g} grads); compile "
          f"{compile_s:.2f} s, fwd+bwd {1e3 * statistics.median(times):.3f} ms"
          + ("; " + "; ".join(parts) if parts else "") + ("; warning: " + " / ".join(notes) if notes else ""))
  return ("pass" if ok else "fail"), text, dict(error_of_tolerance=worst, compile_s=compile_s,
                                                fwd_bwd_ms=1e3 * statistics.median(times))


def section_kernels(section: dict, guard: Guard, size: str) -> None:
  cfg = KERNEL_CASES[size]
  mode = "interpreted (CPU)" if _dispatch.interpret() else "compiled"
  section["note"] = f"Pallas {mode} vs the plain-jnp reference, batch {cfg['batch']}, {cfg['channels']} channels"
  cases = sorted(((length, op, dtype) for op, lengths in cfg["lengths"].items() for length in lengths
                  for dtype in cfg["dtypes"]), key=lambda c: c[0])  # short sequences (quick compiles) first
  _run_units(section, guard, [(f"{op} pallas {dtype} L={length}",
                               functools.partial(kernel_case, op, cfg["batch"], length, cfg["channels"], dtype))
                              for length, op, dtype in cases])
  rows = section["rows"]
  ran = [r for r in rows if "error_of_tolerance" in r]
  section["figures"] = dict(
      checks=len(rows), passed=sum(r["status"] == "pass" for r in rows),
      failed=sum(r["status"] not in ("pass", "unsupported") for r in rows),
      unsupported=sum(r["status"] == "unsupported" for r in rows),
      worst_error_of_tolerance=max((r["error_of_tolerance"] for r in ran), default=0.0),
      compile_s=sum(r["compile_s"] for r in ran))


# ----------------------------------------------------------------------------------------- bench_kernels


def section_bench_kernels(section: dict, guard: Guard, size: str) -> None:
  bench = _load("bench_kernels")
  cfg = BENCH_KERNELS[size]
  paths = [p for p in cfg["paths"] if p != "pallas" or jax.default_backend() != "cpu"]
  section["note"] = (f"bench_kernels.measure: batch {cfg['batch']}, {cfg['channels']} channels, bfloat16 u and "
                     f"gates, median of {cfg['repeats']} calls; ×xla = path time ÷ xla time in this run")
  ops = ("gated_conv", "long_conv", "short_conv")
  # The XLA paths of every op first, then Pallas (its long-L compiles are the likeliest to take minutes).
  units = [(op, length, path) for stage in ("xla", "pallas") for op in ops for length in cfg["lengths"]
           for path in paths if (path == "pallas") == (stage == "pallas") and bench.op_fn(op, path) is not None]
  base, cached = {}, {}

  def one(op, length, path):
    if length not in cached:
      cached.clear()
      cached[length] = bench.inputs(cfg["batch"], length, cfg["channels"], jnp.bfloat16)
    r = bench.measure(op, path, cached[length], cfg["repeats"])
    if path == "xla":
      base[(op, length)] = r
    b = base.get((op, length))
    rel = {k: r[k] / b[k] if b else float("nan") for k in ("fwd", "fwd_bwd")}
    supported = (path != "pallas" or (short_conv.pallas_supported(cfg["channels"]) if op == "short_conv"
                                      else _fftconv.pallas_supported(length, cfg["channels"])))
    flash = bench.FLASHFFTCONV_H100_MS.get(length) if op == "gated_conv" else None
    text = (f"fwd {r['fwd']:.3f} ms (×xla {rel['fwd']:.2f}), fwd+bwd {r['fwd_bwd']:.3f} ms (×xla "
            f"{rel['fwd_bwd']:.2f}), peak {r['peak']:.4g} MiB"
            + (f"; FlashFFTConv H100 {flash} ms" if flash else "")
            + ("" if supported else "; pallas not supported at this shape: the dispatcher ran its fallback"))
    return "ok", text, dict(fwd_ms=r["fwd"], fwd_bwd_ms=r["fwd_bwd"], fwd_x_xla=rel["fwd"],
                            fwd_bwd_x_xla=rel["fwd_bwd"], peak_mib=r["peak"], pallas_supported=supported)

  _run_units(section, guard, [(f"{op} {path} L={length}", functools.partial(one, op, length, path))
                              for op, length, path in units])
  section["figures"] = {f"{r['check']}.{k}": r[k] for r in section["rows"] for k in ("fwd_ms", "fwd_bwd_ms")
                        if k in r}


# ---------------------------------------------------------------------------------------------- train


def section_train(section: dict, guard: Guard, size: str) -> None:
  bench = _load("bench_train")
  from zoo_jax import sharding  # pylint: disable=g-import-not-at-top
  cfg = TRAIN[size]
  torch_ref, torch_note = None, "torch compared on CPU only (the port runs on CPU)"
  if jax.default_backend() == "cpu":
    torch_ref, torch_note = bench.import_torch_ref()
  section["note"] = (f"bench_train.bench_one, zoo_jax step; Zoology batch sizes / {cfg['batch_scale']}; "
                     f"median of {cfg['steps']} steps after {cfg['warmup']}; {torch_note}")
  mesh = sharding.make_mesh()

  def one(mixer, d_model, seq_len):
    r = bench.bench_one(mixer, d_model, seq_len, mesh, torch_ref, batch_scale=cfg["batch_scale"],
                        warmup=cfg["warmup"], steps=cfg["steps"], full_head=False)
    text = (f"batch {r['batch']}, {r['params']:,} params: {r['zoo_jax_ms']:.2f} ms/step, "
            f"{r['zoo_jax_tok_s']:,.0f} tokens/s, compile {r['compile_s']:.1f} s, loss {r['zoo_jax_loss']:.3f}")
    figures = dict(batch=r["batch"], step_ms=r["zoo_jax_ms"], tokens_per_s=r["zoo_jax_tok_s"],
                   compile_s=r["compile_s"])
    if "torch_ms" in r:
      text += f"; torch {r['torch_ms']:.1f} ms/step (zoo_jax {r['zoo_jax_tok_s'] / r['torch_tok_s']:.2f}× faster)"
      figures.update(torch_step_ms=r["torch_ms"], x_torch=r["zoo_jax_tok_s"] / r["torch_tok_s"])
    return "ok", text, figures

  _run_units(section, guard, [(f"{m} d={d} L={l}", functools.partial(one, m, d, l))
                              for l in cfg["seq_lens"] for d in cfg["d_models"] for m in cfg["mixers"]])
  section["figures"] = {f"{r['check']}.{k}": r[k] for r in section["rows"] for k in ("tokens_per_s", "step_ms")
                        if k in r}


# ---------------------------------------------------------------------------------------------- sweep


def section_sweep(section: dict, guard: Guard, size: str) -> None:
  bench = _load("bench_sweep")
  cfg = SWEEP[size]
  n = len(cfg["learning_rates"]) * len(cfg["seeds"])
  check = (f"{cfg['mixer']} d={cfg['d_model']} L={cfg['seq_len']} batch {cfg['batch_size']}: "
           f"{len(cfg['learning_rates'])} lr × {len(cfg['seeds'])} seeds × {cfg['steps']} steps")
  section["note"] = "bench_sweep.measure: the group vmapped as one population vs the runs one after another"

  def one():
    r = bench.measure(**cfg)
    speedup = r["sequential_s"] / r["vmapped_s"]
    text = (f"one after another {r['sequential_s']:.2f} s, vmapped {r['vmapped_s']:.2f} s: {speedup:.2f}× "
            f"({1e3 * r['vmapped_s'] / (n * cfg['steps']):.2f} ms per model-step vmapped)")
    return "ok", text, dict(runs=r["runs"], steps=r["steps"], sequential_s=r["sequential_s"],
                            vmapped_s=r["vmapped_s"], speedup=speedup)

  _run_units(section, guard, [(check, one)])
  row = section["rows"][0]
  section["figures"] = {k: row[k] for k in ("runs", "steps", "sequential_s", "vmapped_s", "speedup") if k in row}


# ---------------------------------------------------------------------------------------------- lm_mfu


def peak_bf16_tflops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  return next((peak for key, peak in PEAK_BF16_TFLOPS if key in kind), None)


def largest_batch(points: list[tuple[int, float]], free_bytes: float, multiple: int, max_batch: int,
                  fraction: float = 0.9) -> int:
  """The largest multiple of `multiple` (<= max_batch, >= multiple) whose bytes, on the line through the
  two (batch, bytes) points, fit in fraction · free_bytes."""
  (b0, m0), (b1, m1) = points
  per_example = max((m1 - m0) / (b1 - b0), 1.0)
  fixed = m0 - per_example * b0
  b = int((fraction * free_bytes - fixed) // per_example) // multiple * multiple
  return max(multiple, min(b, max_batch // multiple * multiple))


def _free_device_bytes() -> float | None:
  if _MEMORY_GIB.value is not None:
    return _MEMORY_GIB.value * 2**30
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def _new_bytes(compiled) -> float:
  """Bytes the step allocates beyond its (resident) arguments: outputs not aliased to a donated input,
  plus temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    raise ValueError("compiled.memory_analysis() is not available on this backend")
  return float(m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def section_lm(section: dict, guard: Guard, size: str) -> None:
  bench = _load("bench_lm")
  cfg = LM[size]
  check = f"{cfg['preset']} L={cfg['seq_len']} {cfg['dtype']}"
  section["note"] = ("bench_lm's step on synthetic tokens; batch: largest that fits by compiled "
                     "memory_analysis; MFU against the device kind's dense bf16 peak")

  def one():
    seq_len = cfg["seq_len"]
    model_cfg, state, sh, step_fn = bench.build(lm_configs.get_config(cfg["preset"]), seq_len, cfg["probe"][0],
                                                cfg["dtype"])
    struct = lambda b: {"tokens": jax.ShapeDtypeStruct((1, b, seq_len), jnp.int32, sharding=sh.batch)}
    free = _free_device_bytes()
    notes = []
    if free is None:
      batch = cfg["probe"][0]
      compiled = step_fn.lower(state, struct(batch)).compile()
      new_bytes = _new_bytes(compiled)
      notes.append(f"device memory unknown on {jax.default_backend()}: batch fixed at {batch}")
    else:
      points = [(b, _new_bytes(step_fn.lower(state, struct(b)).compile())) for b in cfg["probe"]]
      batch = largest_batch(points, free, cfg["multiple"], cfg["max_batch"])
      compiled = step_fn.lower(state, struct(batch)).compile()
      new_bytes = _new_bytes(compiled)
      if new_bytes > free and batch > cfg["multiple"]:  # the line underestimated: shrink once, in proportion
        batch = max(cfg["multiple"], int(batch * 0.9 * free / new_bytes) // cfg["multiple"] * cfg["multiple"])
        compiled = step_fn.lower(state, struct(batch)).compile()
        new_bytes = _new_bytes(compiled)
      notes.append(f"probes {', '.join(f'b={b}: {m / 2**30:.2f} GiB' for b, m in points)}; "
                   f"{free / 2**30:.1f} GiB free")
    batches = bench.synthetic_batches(sh, cfg["steps"] + 1, batch, seq_len)
    state, elapsed, metrics = bench.time_steps(compiled, state, batches)
    r = bench.throughput(model_cfg, state, cfg["steps"], batch, seq_len, elapsed)
    peak = peak_bf16_tflops(jax.devices()[0].device_kind)
    mfu = 100 * r["achieved_tflops"] / peak if peak else None
    text = (f"batch {batch} ({new_bytes / 2**30:.2f} GiB new per step), {r['n_params']:,} params: "
            f"{r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, {r['achieved_tflops']:.2f} "
            f"TFLOP/s model; MFU " + (f"{mfu:.1f}% of {peak:.0f} TFLOP/s" if peak else "– (peak unknown)")
            + f"; loss {float(metrics['loss'][0]):.3f}; " + "; ".join(notes))
    return "ok", text, dict(batch=batch, seq_len=seq_len, step_new_gib=new_bytes / 2**30,
                            free_gib=None if free is None else free / 2**30, peak_tflops=peak, mfu_percent=mfu,
                            **r)

  _run_units(section, guard, [(check, one)])
  row = section["rows"][0]
  section["figures"] = {k: row[k] for k in ("batch", "seq_len", "n_params", "ms_per_step", "tokens_per_s",
                                            "achieved_tflops", "peak_tflops", "mfu_percent") if k in row}


RUNNERS = {"kernels": section_kernels, "bench_kernels": section_bench_kernels, "train": section_train,
           "sweep": section_sweep, "lm_mfu": section_lm}


# ---------------------------------------------------------------------------------------------- main


def _finish(report: Report) -> int:
  result = report.write()
  if result is None:  # the watchdog got there first and ends the process
    time.sleep(60)
    return 1
  table, passed = result
  print("\n" + table, flush=True)
  print(f"wrote {os.path.join(report.out_dir, 'accelerator_check.md')} and accelerator_check.json", flush=True)
  return 0 if passed else 1


def main(argv):
  del argv
  if not 10 <= _BUDGET.value <= 3600:
    raise ValueError(f"--budget_s must be in [10, 3600], got {_BUDGET.value:g}")
  unknown = [s for s in _SECTIONS.value if s not in SECTIONS]
  if unknown or not _SECTIONS.value:
    raise ValueError(f"--sections must be a non-empty list of {', '.join(SECTIONS)}; got {_SECTIONS.value}")
  if _MEMORY_GIB.value is not None and _MEMORY_GIB.value <= 0:
    raise ValueError(f"--device_memory_gib must be > 0, got {_MEMORY_GIB.value:g}")
  if not flags.FLAGS["verbosity"].present:  # optax logs an INFO line per cosine schedule without warmup
    logging.set_verbosity(logging.WARNING)
  size = _SIZE.value or ("tiny" if jax.default_backend() == "cpu" else "full")
  report = Report(size, _BUDGET.value, _OUT_DIR.value)
  end = report.start + _BUDGET.value

  def watchdog():
    result = report.write(timed_out=True)
    if result is None:  # the main thread is writing them: let it finish
      return
    print("\n" + result[0], flush=True)
    print(f"accelerator check: the {_BUDGET.value:.0f} s budget was reached; outputs written to {_OUT_DIR.value}",
          file=sys.stderr, flush=True)
    os._exit(0 if result[1] else 1)  # pylint: disable=protected-access  (a compile cannot be interrupted)

  timer = threading.Timer(_BUDGET.value, watchdog)
  timer.daemon = True
  timer.start()
  print(f"# accelerator check, size {size}: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
        f"{jax.__version__}, budget {_BUDGET.value:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
  chosen = [s for s in SECTIONS if s in _SECTIONS.value]
  for i, name in enumerate(chosen):
    left = end - min(WRITE_RESERVE[0] * _BUDGET.value, WRITE_RESERVE[1]) - time.monotonic()
    share = SHARES[name] / sum(SHARES[s] for s in chosen[i:])
    budget = left * share
    section = report.open(name, budget)
    if budget < MIN_SECTION_S:
      report.close(name, "skipped (time guard)", f"{budget:.1f} s left for it")
      continue
    print(f"## {name} (budget {budget:.0f} s)", flush=True)
    try:
      RUNNERS[name](section, Guard(budget), size)
      statuses = {r["status"] for r in section["rows"]}
      status = "ok"
      if "timed out" in statuses:
        status = "timed out"
      elif name == "kernels" and statuses - {"pass", "unsupported"}:
        status = "failed"
      elif "error" in statuses:
        status = "error"
      elif any(s.startswith("skipped") for s in statuses):
        status = "partial (time guard)"
      report.close(name, status)
    except Exception as e:  # pylint: disable=broad-except  (a section that breaks is a row; the rest still runs)
      traceback.print_exc()
      report.close(name, "error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    gc.collect()
    jax.clear_caches()
  timer.cancel()
  code = _finish(report)
  if STUCK:  # a daemon thread inside a compile: do not wait for it, nor let interpreter shutdown meet it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  return code


if __name__ == "__main__":
  cli.run(main)
