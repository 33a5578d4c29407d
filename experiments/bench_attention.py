r"""The attention mixers' `implementation`s against each other: blockwise (FlashAttention-2 in plain JAX,
`zoo_jax.ops.attention`) against today's XLA path (`jax.nn.dot_product_attention`, l×l logits).

    python experiments/bench_attention.py              # the three sections below (~5 min on 2 idle cores)
    python experiments/bench_attention.py --quick      # smoke run at small sizes, under a minute
    python experiments/bench_attention.py --batch=32 --reps=9

What it measures (a benchmark, not a test). Times are wall-clock, each call ended by `block_until_ready`,
median (and min) over --reps calls after one untimed call (compilation is not counted), the
implementations interleaved call by call so that load from other jobs hits them alike; the load average
is printed before and after. Each call is one mixer layer (float32, Zoology's projections with biases)
forward + backward: the gradient of Σ out ⊙ r (r a fixed random cotangent) in the parameters and the input.

1. Train step at Zoology's Figure-2 attention shape: `attention` (1 head) at d_model 256, L 512, batch
   --batch, implementation 'xla' against 'blockwise'. `xla / blockwise` > 1: blockwise is faster. Also
   XLA's cost analysis of both compiled steps: their FLOP ratio is the speed-up to expect at equal FLOP
   rates (the projections are the same in both; blockwise skips the masked blocks but recomputes the
   scores in the backward).
2. Local attention at O(L·w): `sliding_window` w 64 at L 2,048, d_model 256, batch --batch // 4, against
   full `attention` at the same shape: both with 'xla' (today: the window is only a mask) and with
   'blockwise' (the band of key blocks within reach). `attention / sliding_window` is how much cheaper the
   window is; the target is >= 4x.
3. Memory: XLA's `memory_analysis()` of the compiled forward + backward of `attention` at the 125M LM's
   shape (L 1,024, 12 heads, d_model 768, batch 1): temporaries (temp_size_in_bytes) of 'xla' and
   'blockwise'. Not timed.
"""

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

_BATCH = flags.DEFINE_integer("batch", 16, "Batch of section 1 (section 2 uses batch // 4, at least 1).",
                              lower_bound=1)
_REPS = flags.DEFINE_integer("reps", 7, "Timed calls per function (median and min reported).", lower_bound=1)
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: L 128 / 512 / 256, batch 4, 3 reps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for inputs and parameters.")


def train_fn(cfg: dict, d_model: int, seq_len: int, batch: int, seed: int):
  """A jitted forward + backward of one mixer layer, and a thunk that calls it on fixed inputs."""
  module = mixers.build(cfg, d_model=d_model, seq_len=seq_len, layer_idx=0, n_layers=2, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(module)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, seq_len, d_model)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((batch, seq_len, d_model)), jnp.float32)

  def loss(p, x_, r_):
    return jnp.sum(nnx.merge(graphdef, p)(x_) * r_)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))  # r an argument, not a constant XLA would fold
  return step, (lambda: step(params, x, r)), (params, x, r)


def seconds(call) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(call())
  return time.perf_counter() - t0


def time_interleaved(calls: dict, reps: int) -> dict:
  """One untimed call each (compiles), then `reps` rounds over the calls; seconds per call."""
  jax.block_until_ready([call() for call in calls.values()])
  rounds = [{name: seconds(call) for name, call in calls.items()} for _ in range(reps)]
  return {name: [r[name] for r in rounds] for name in calls}


def report(times: dict, base: str) -> None:
  for name, ts in times.items():
    med, low = statistics.median(ts), min(ts)
    ratio = statistics.median(times[base]) / med
    ratio_min = min(times[base]) / low
    print(f"  {name:<36} median {1000 * med:9,.1f} ms   min {1000 * low:9,.1f} ms   "
          f"{base} / this: {ratio:5.2f}x (median), {ratio_min:5.2f}x (min)", flush=True)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  quick = _QUICK.value
  batch = 4 if quick else _BATCH.value
  reps = 3 if quick else _REPS.value
  l1, l2, l3 = (128, 512, 256) if quick else (512, 2048, 1024)
  print(f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}); python "
        f"{platform.python_version()}; {os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
  print(f"one mixer layer, float32, forward + backward (params and input); median / min of {reps} calls after "
        f"one untimed call, interleaved", flush=True)

  print(f"\n1. attention train step, d_model 256, L {l1}, 1 head, batch {batch}")
  calls, gflop = {}, {}
  for impl in ("xla", "blockwise"):
    step, calls[f"attention {impl}"], args = train_fn({"name": "attention", "implementation": impl}, 256, l1,
                                                      batch, _SEED.value)
    gflop[impl] = step.lower(*args).compile().cost_analysis()["flops"] / 1e9
  report(time_interleaved(calls, reps), "attention xla")
  print(f"  XLA cost analysis: xla {gflop['xla']:,.1f} GFLOP, blockwise {gflop['blockwise']:,.1f} GFLOP: "
        f"{gflop['xla'] / gflop['blockwise']:.2f}x fewer (the speed-up at equal FLOP rates; the blockwise "
        f"backward recomputes the scores)", flush=True)

  b2 = max(1, batch // 4)
  print(f"\n2. sliding_window w 64 against full attention, d_model 256, L {l2}, 1 head, batch {b2}")
  calls = {}
  for impl in ("xla", "blockwise"):
    calls[f"attention {impl}"] = train_fn({"name": "attention", "implementation": impl}, 256, l2, b2,
                                          _SEED.value)[1]
    calls[f"sliding_window w=64 {impl}"] = train_fn(
        {"name": "sliding_window", "window_size": 64, "implementation": impl}, 256, l2, b2, _SEED.value)[1]
  times = time_interleaved(calls, reps)
  report(times, "attention xla")
  med = {name: statistics.median(ts) for name, ts in times.items()}
  for impl in ("xla", "blockwise"):
    print(f"  attention {impl} / sliding_window {impl}: "
          f"{med[f'attention {impl}'] / med[f'sliding_window w=64 {impl}']:.2f}x cheaper")
  print(f"  attention xla (today's default) / sliding_window blockwise: "
        f"{med['attention xla'] / med['sliding_window w=64 blockwise']:.2f}x cheaper")

  print(f"\n3. compiled temporaries, attention forward + backward, L {l3}, 12 heads, d_model 768, batch 1")
  temps = {}
  for impl in ("xla", "blockwise"):
    step, _, args = train_fn({"name": "attention", "num_heads": 12, "implementation": impl}, 768, l3, 1,
                             _SEED.value)
    analysis = step.lower(*args).compile().memory_analysis()
    temps[impl] = analysis.temp_size_in_bytes if analysis is not None else float("nan")
    print(f"  {impl:<10} temp {temps[impl] / 2**20:9.1f} MiB", flush=True)
  print(f"  xla / blockwise temporaries: {temps['xla'] / temps['blockwise']:.1f}x "
        f"(one head's l×l float32 scores: {l3 * l3 * 4 / 2**20:.1f} MiB; 12 heads: {12 * l3 * l3 * 4 / 2**20:.0f} MiB)")
  print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
