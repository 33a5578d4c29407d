r"""Chunked parallel form against the naive token-by-token recurrence, for every mixer that has both.

    python experiments/bench_recurrence.py                                  # L = 1024, 4096, every such mixer
    python experiments/bench_recurrence.py --mixers=mamba2,gla --seq_lens=1024 --chunk_sizes=16,64,256
    python experiments/bench_recurrence.py --quick                          # smoke run, L = 256, a minute

What it measures (a benchmark, not a test). For each mixer and length L, one mixer layer (d_model 128 by
default, batch 2, float32) on a random input, jitted:
- `chunked`: the module's own forward, `module(x)`: for these mixers the chunked parallel form (a
  `lax.scan` over chunks, matmuls inside them);
- `naive`: the recurrent form, `lax.scan` of `module.step` over the L tokens from `init_state` (the same
  function: tests/test_mixers.py checks they agree);
each as forward alone and as forward + backward (the gradient of Σ out ⊙ r with respect to the parameters
and the input, r a fixed random cotangent). Times are wall-clock medians of --reps calls after one
untimed call (compilation is not counted), the chunked and naive calls interleaved so that load from
other jobs hits both alike; `naive / chunked` > 1 means the chunked form is faster.

Which mixers: by default every registered mixer whose hyperparameters have a `chunk_size` and whose
module has `init_state` / `step` (mixers not registered in this checkout are simply absent), each with its
default hyperparameters except `MIXER_OVERRIDES` below (Based's chunked form is its 'linear'
implementation; Mamba-2 runs at d_state 16, the middle of Zoology's sweep {8, 16, 24}, rather than
mamba_ssm's 128, whose naive backward would keep 4096 × 2 × 32K floats of per-token states).
--chunk_sizes reruns each mixer at other chunk sizes (one row each).
"""

import dataclasses
import os
import platform
import statistics
import time

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from zoo_jax import mixers

MIXER_OVERRIDES = {"based": {"parallel_implementation": "linear"}, "mamba2": {"d_state": 16}}
QUICK = dict(seq_lens=["256"], reps=2)

_MIXERS = flags.DEFINE_list("mixers", None, "Mixers to time (default: every registered mixer with a "
                            "chunk_size hyperparameter and a step form).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "4096"], "Sequence lengths.")
_D_MODEL = flags.DEFINE_integer("d_model", 128, "Model width.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.", lower_bound=1)
_CHUNK_SIZES = flags.DEFINE_list("chunk_sizes", [], "Chunk sizes to time (default: each mixer's own).")
_REPS = flags.DEFINE_integer("reps", 5, "Timed calls per function (the median is reported).", lower_bound=1)
_QUICK = flags.DEFINE_bool("quick", False, f"Smoke run: {QUICK} (flags given explicitly win).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for inputs and parameters.")


def has_chunked_and_step_forms(name: str) -> bool:
  fields = {f.name for f in dataclasses.fields(mixers.get(name).hparams)}
  module = mixers.get(name).module
  return "chunk_size" in fields and callable(getattr(module, "step", None)) and callable(
      getattr(module, "init_state", None))


def default_mixers() -> list[str]:
  return [name for name in mixers.names() if has_chunked_and_step_forms(name)]


def functions(cfg: dict, d_model: int, seq_len: int, seed: int):
  """{'chunked', 'naive'} -> {'fwd', 'fwd+bwd'} -> jitted f(params, x), and the params."""
  module = mixers.build(cfg, d_model=d_model, seq_len=seq_len, layer_idx=0, n_layers=2, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def chunked(params_, x_bld):
    return nnx.merge(graphdef, params_, rest)(x_bld)

  def naive(params_, x_bld):
    m = nnx.merge(graphdef, params_, rest)
    _, y_lbd = jax.lax.scan(lambda state, x_bd: m.step(state, x_bd), m.init_state(x_bld.shape[0]),
                            jnp.swapaxes(x_bld, 0, 1))
    return jnp.swapaxes(y_lbd, 0, 1)

  cotangent = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((_BATCH.value, seq_len, d_model)),
                          jnp.float32)

  def with_backward(forward):
    return jax.grad(lambda params_, x: jnp.sum(forward(params_, x) * cotangent), argnums=(0, 1))

  return {form: {"fwd": jax.jit(f), "fwd+bwd": jax.jit(with_backward(f))}
          for form, f in (("chunked", chunked), ("naive", naive))}, params


def time_interleaved(calls: dict[str, callable], reps: int) -> dict[str, list[float]]:
  """One untimed call each (compiles), then `reps` rounds over the calls; seconds per call."""
  for call in calls.values():
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(reps):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - t0)
  return times


def bench_one(name: str, chunk_size: int | None, seq_len: int) -> dict:
  cfg = {"name": name, **MIXER_OVERRIDES.get(name, {})}
  if chunk_size is not None:
    cfg["chunk_size"] = chunk_size
  _, hparams = mixers.parse(dict(cfg))
  fns, params = functions(cfg, _D_MODEL.value, seq_len, _SEED.value)
  x = jnp.asarray(np.random.default_rng(_SEED.value).standard_normal((_BATCH.value, seq_len, _D_MODEL.value)),
                  jnp.float32)
  row = dict(mixer=name, chunk=hparams.chunk_size, seq_len=seq_len)
  for pass_ in ("fwd", "fwd+bwd"):
    calls = {form: (lambda f=fns[form][pass_]: f(params, x)) for form in ("chunked", "naive")}
    times = time_interleaved(calls, _REPS.value)
    for form, ts in times.items():
      row[f"{pass_} {form}"] = 1000 * statistics.median(ts)
  return row


def format_table(rows: list[dict]) -> str:
  header = ["mixer", "chunk", "L", "fwd chunked ms", "fwd naive ms", "naive/chunked",
            "fwd+bwd chunked ms", "fwd+bwd naive ms", "naive/chunked"]
  lines = [header]
  for r in rows:
    if "error" in r:
      lines.append([r["mixer"], str(r.get("chunk", "")), str(r["seq_len"]), r["error"], "", "", "", "", ""])
      continue
    cells = [r["mixer"], str(r["chunk"]), str(r["seq_len"])]
    for pass_ in ("fwd", "fwd+bwd"):
      chunked, naive = r[f"{pass_} chunked"], r[f"{pass_} naive"]
      cells += [f"{chunked:,.1f}", f"{naive:,.1f}", f"{naive / chunked:.1f}x"]
    lines.append(cells)
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines[1:]])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if _QUICK.value:
    for flag, value in QUICK.items():
      if not flags.FLAGS[flag].present:
        flags.FLAGS[flag].value = value
  names = _MIXERS.value or default_mixers()
  for name in names:
    if name not in mixers.names() or not has_chunked_and_step_forms(name):
      raise app.UsageError(f"--mixers: {name!r} is not a registered mixer with chunk_size and a step form; "
                           f"accepted: {', '.join(default_mixers())}")
  seq_lens = [int(s) for s in _SEQ_LENS.value]
  chunk_sizes = [int(c) for c in _CHUNK_SIZES.value] or [None]
  print(f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}); python "
        f"{platform.python_version()}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
  print(f"one mixer layer, d_model {_D_MODEL.value}, batch {_BATCH.value}, float32; median of {_REPS.value} "
        f"calls after one untimed call, chunked and naive interleaved; overrides {MIXER_OVERRIDES}", flush=True)
  rows = []
  for name in names:
    for chunk_size in chunk_sizes:
      for seq_len in seq_lens:
        t0 = time.perf_counter()
        try:
          row = bench_one(name, chunk_size, seq_len)
        except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: report, go on)
          row = dict(mixer=name, chunk=chunk_size or "", seq_len=seq_len, error=f"{type(e).__name__}: {e}"[:120])
        rows.append(row)
        print(f"  {name} chunk={row['chunk']} L={seq_len}: {time.perf_counter() - t0:.0f} s", flush=True)
  print(f"\nload average after: {os.getloadavg()[0]:.1f}")
  print(format_table(rows))


if __name__ == "__main__":
  app.run(main)
