r"""Speed and memory of the convolution kernels' paths: one table per backend.

    python experiments/bench_kernels.py            # the backend's default shapes (below)
    python experiments/bench_kernels.py --lengths=256,1024 --batch=8 --channels=128 --repeats=10
    python experiments/bench_kernels.py --ops=gated_conv --paths=xla,pallas

What it measures (a benchmark, not a test). For every op (`gated_conv`: y = out_gate ⊙ (h ∗ (in_gate ⊙ u)),
FlashFFTConv's gated convolution; `long_conv`: y = h ∗ u; `short_conv`: width-4 depthwise conv + SiLU)
and every path (`xla`, `monarch`, `pallas`; the O(L²) `reference` is left out), at each length L:
  fwd ms       one forward call, jitted, ended by `block_until_ready`: the median of --repeats timed calls
               after a compile-and-warm-up call;
  fwd+bwd ms   the same for the value and the gradients with respect to every input (u, h, both gates);
  ×xla         the path's time ÷ the `xla` path's time of the same op in the same run (for fwd and fwd+bwd;
               < 1 means faster than `xla`; the `xla` path of the long convolutions is `rfft`/`irfft`);
  peak MiB     the compiled fwd+bwd program's arguments + outputs + XLA temporaries
               (`compiled.memory_analysis()`); on a GPU also the device allocator's peak over the row
               (`memory_stats()['peak_bytes_in_use']`, cumulative, so it only grows down the table).
Inputs are --dtype (bfloat16 by default), filters float32, the same shapes for every path.

Shapes. On an accelerator (GPU/TPU): FlashFFTConv's (Fu et al. 2023, Table 4): batch 64, 768 channels,
L ∈ {256, 1K, 4K, 8K, 16K}, bfloat16 inputs; the last column prints their published H100 time for the
gated convolution (0.29 ms at 1K, 1.43 at 4K, 3.58 at 8K, 12.2 at 16K; none published at 256 in that
table). The targets (the issue): the Pallas gated core >= 2× faster than `xla` from 1K up, and within
1.5× of those figures. On CPU: a scaled-down set (batch 4, 128 channels, L ∈ {256, 1K, 4K}) and no Pallas
(interpret mode is a test tool, orders of magnitude slower; --paths=pallas forces it, at small shapes).
Timings on a shared machine are inflated by other jobs: the header prints the load average.
"""

import os
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from zoo_jax.ops import gated_conv, long_conv, short_conv

FLASHFFTCONV_H100_MS = {1024: 0.29, 4096: 1.43, 8192: 3.58, 16384: 12.2}  # gated conv, bf16, B=64, C=768
ACCELERATOR_SHAPES = dict(batch=64, channels=768, lengths=[256, 1024, 4096, 8192, 16384])
CPU_SHAPES = dict(batch=4, channels=128, lengths=[256, 1024, 4096])
SHORT_WIDTH = 4

if __name__ == "__main__":  # flags of the command line only: accelerator_check.py imports the functions
  _OPS = flags.DEFINE_list("ops", ["gated_conv", "long_conv", "short_conv"], "Ops to time.")
  _PATHS = flags.DEFINE_list("paths", None, "Paths to time (default: xla, monarch, and pallas on an "
                             "accelerator; an op skips the paths it does not have).")
  _LENGTHS = flags.DEFINE_list("lengths", None, "Sequence lengths (default: by backend, see the docstring).")
  _BATCH = flags.DEFINE_integer("batch", None, "Batch size (default: by backend).")
  _CHANNELS = flags.DEFINE_integer("channels", None, "Channels (default: by backend).")
  _DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "dtype of u and the gates.")
  _REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (the median is reported).",
                                  lower_bound=1)


def op_fn(op: str, path: str):
  """(f(u, h, g_in, g_out) -> y, differentiable argnums) for an op and path, or None if it lacks the path."""
  if op == "gated_conv" and path in gated_conv.IMPLEMENTATIONS:
    return (lambda u, h, gi, go: gated_conv.gated_conv(u, h, in_gate=gi, out_gate=go, implementation=path),
            (0, 1, 2, 3))
  if op == "long_conv" and path in long_conv.IMPLEMENTATIONS:
    return (lambda u, h, gi, go: long_conv.causal_conv(u, h, implementation=path)), (0, 1)
  if op == "short_conv" and path in short_conv.IMPLEMENTATIONS:
    return (lambda u, h, gi, go: short_conv.short_conv(u, h[:SHORT_WIDTH], activation="silu",
                                                       implementation=path)), (0, 1)
  return None


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _peak_mib(jitted, args) -> float:
  m = jitted.lower(*args).compile().memory_analysis()
  if m is None:
    return float("nan")
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**20


def _device_peak_mib() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / 2**20


def measure(op: str, path: str, args, repeats: int) -> dict[str, float]:
  f, argnums = op_fn(op, path)
  fwd = jax.jit(f)
  loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32))
  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=argnums))
  return dict(fwd=_time(fwd, args, repeats), fwd_bwd=_time(fwd_bwd, args, repeats),
              peak=_peak_mib(fwd_bwd, args), device_peak=_device_peak_mib())


def inputs(batch: int, length: int, channels: int, dtype):
  """u, h, g_in, g_out: standard normal, drawn on the device (host numpy took ~minutes at B=64, L=16K)."""
  k_u, k_h, k_in, k_out = jax.random.split(jax.random.key(0), 4)
  u, g_in, g_out = (jax.random.normal(k, (batch, length, channels), dtype) for k in (k_u, k_in, k_out))
  h = jax.random.normal(k_h, (length, channels), jnp.float32) / np.sqrt(length)
  return u, h, g_in, g_out


def main(argv):
  del argv
  backend = jax.default_backend()
  defaults = CPU_SHAPES if backend == "cpu" else ACCELERATOR_SHAPES
  lengths = [int(x) for x in _LENGTHS.value] if _LENGTHS.value else defaults["lengths"]
  batch = _BATCH.value or defaults["batch"]
  channels = _CHANNELS.value or defaults["channels"]
  paths = _PATHS.value or (["xla", "monarch"] + ([] if backend == "cpu" else ["pallas"]))
  dtype = jnp.dtype(_DTYPE.value)
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  print(f"# backend {backend}: {jax.devices()[0].device_kind}; jax {jax.__version__}; {platform.node()}; "
        f"load average {load}; {os.cpu_count()} CPUs")
  print(f"# batch {batch}, channels {channels}, u and gates {dtype.name}, filter float32; "
        f"median of {_REPEATS.value} calls; short_conv width {SHORT_WIDTH} + SiLU")
  flash = backend == "gpu"
  header = (f"{'op':<11} {'path':<8} {'L':>6} {'fwd ms':>9} {'×xla':>6} {'fwd+bwd ms':>11} {'×xla':>6} "
            f"{'peak MiB':>9}" + (f" {'dev peak MiB':>12} {'FlashFFTConv H100 ms':>21}" if flash else ""))
  print(header)
  print("-" * len(header))
  for op in _OPS.value:
    for length in lengths:
      args = inputs(batch, length, channels, dtype)
      base = None
      for path in (["xla"] + [p for p in paths if p != "xla"]):
        if op_fn(op, path) is None:
          continue
        try:
          r = measure(op, path, args, _REPEATS.value)
        except Exception as e:  # pylint: disable=broad-except  (out of memory, a lowering gap: report, go on)
          print(f"{op:<11} {path:<8} {length:>6}  error: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
          continue
        if path == "xla":
          base = r
        rel = lambda k: r[k] / base[k] if base else float("nan")  # pylint: disable=cell-var-from-loop
        row = (f"{op:<11} {path:<8} {length:>6} {r['fwd']:>9.3f} {rel('fwd'):>6.2f} {r['fwd_bwd']:>11.3f} "
               f"{rel('fwd_bwd'):>6.2f} {r['peak']:>9.1f}")
        if flash:
          ref = FLASHFFTCONV_H100_MS.get(length) if op == "gated_conv" else None
          row += f" {r['device_peak']:>12.1f} {('%.2f' % ref) if ref else '–':>21}"
        print(row, flush=True)


if __name__ == "__main__":
  app.run(main)
