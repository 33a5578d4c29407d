r"""Training throughput at Zoology's Figure-2 shapes: zoo_jax's train step against a full-head variant of
itself and against a PyTorch port of Zoology's step.

    python experiments/bench_train.py                      # the full grid (over an hour on 2 CPU cores)
    python experiments/bench_train.py --batch_scale=4      # the full grid at a quarter of the batch sizes
    python experiments/bench_train.py --quick              # smoke run, under a minute
    python experiments/bench_train.py --mixers=attention --d_models=64 --seq_lens=64,512 --batch_scale=4

What it measures (a benchmark, not a test). For every mixer of `zoo_jax/configs/mqar.py` RUNS
(attention, base_conv, hybrid: their model settings; runs that differ only in data are skipped) and
every (d_model, L) of the grid: one optimizer step of the 2-layer Figure-2 model (vocabulary 8192,
Zoology's block, no MLP, AdamW), on real MQAR batches (the training data of `zoo_jax.tasks.MQARTask`),
with Zoology's batch sizes (512 for L <= 128, 256 for L = 256, 128 for L = 512, divided by --batch_scale)
and kv pairs (64->4, 128->8, 256->16, 512->64; L//8 for other lengths). (Zoology's own Figure-2 sweep gives the
non-attention mixers 4 layers; here every mixer has 2, in both implementations alike.)
Step times are wall-clock, each step ended by `block_until_ready`, median over --steps timed steps after
--warmup untimed ones; tokens/s counts every position, batch × L / step time.

Three trainers are timed in the same process, their steps interleaved (ours, full head, torch, ours, ...)
so that load from other jobs on the machine hits all of them alike:

- `zoo_jax`: the library's own jitted step, the training core's step for a population of one with the MQAR
  task (`trainer.single_step` over `trainer.init_state`, `make_train_step` and a `sharding.make_mesh()`
  mesh): the LM head runs only at the k labelled positions of each row (`LanguageModel.logits_at`).
- `full head`: the same step, params and optimizer, over another graphdef whose model's `logits_at` computes
  logits at EVERY position, (b, l, v), then gathers the labelled ones for the same loss and metrics. This
  is what Zoology pays: its loss is `CrossEntropyLoss` over all (b·l, v) logits.
- `torch` (when `import torch` works; else the column is left out): `experiments/zoology_torch_ref.py`, a
  minimal PyTorch port of Zoology's model and train step (head at every position,
  CrossEntropyLoss(ignore_index=-100), AdamW), eager, with `torch.set_num_threads` = the cores this process
  may use (XLA:CPU sizes its pool the same way). Its attention is `F.scaled_dot_product_attention` unless
  `--torch_attention=zoology` (Zoology's own einsum softmax, slower on CPU).

Like for like: both models are built from the same mixer configs, and every row checks that the torch
port has exactly as many trainable parameters as the zoo_jax model (the `params` column; a mismatch makes
the row an error). Same batches, same initial-loss scale (ln 8192 ≈ 9.01); the last losses are printed.

How to read the ratios. `vs full head` = zoo_jax tokens/s ÷ full-head tokens/s: the speed-up that comes
only from applying the head at labelled positions (same compiler, same everything else); it grows with
the vocabulary's share of the FLOPs, i.e. is largest at small d_model and shrinks where the mixer
dominates (attention at large L). `vs torch` = zoo_jax tokens/s ÷ torch tokens/s: head trick and
compiler together, against a Zoology-style PyTorch step on the same cores. `GFLOP ours/full` is XLA's
cost analysis of the two compiled steps (a check that the full-head variant really computes more).
Ratios > 1 mean zoo_jax is faster. Timings are noisy on a shared machine: compare within a row. The
last lines give min / median / max of each ratio over the rows, from the median step times (the table)
and from each trainer's fastest step, which is less sensitive to other jobs.

OpenMP on a shared machine. torch's CPU ops run on an OpenMP (libgomp) pool whose idle threads spin at
barriers by default. With other jobs on the cores, a spinning thread holds a core that its partner is
waiting for, and a torch step gets 10-20x slower (measured: hybrid d=256 L=512 batch 32, 2 threads,
30-68 s per step instead of 3.4 s, while the zoo_jax step next to it stayed near 1-2 s). So this script sets
OMP_WAIT_POLICY=PASSIVE (threads sleep at barriers) before anything loads libgomp, unless the
environment already sets OMP_WAIT_POLICY; the header says which. XLA:CPU does not use OpenMP.
"""

import os
import platform
import statistics
import sys
import time
from typing import Any

_OMP_WAIT_POLICY_DEFAULTED = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (libgomp) loads; see the docstring

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from zoo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from zoo_jax import sharding  # pylint: disable=g-import-not-at-top
from zoo_jax import tasks  # pylint: disable=g-import-not-at-top
from zoo_jax import trainer  # pylint: disable=g-import-not-at-top
from zoo_jax.configs import mqar as mqar_configs  # pylint: disable=g-import-not-at-top
from zoo_jax.model import LanguageModel, ModelConfig  # pylint: disable=g-import-not-at-top

_EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))


def _load_mixers() -> dict[str, dict]:
  """{run name: model settings} of `zoo_jax.configs.mqar` RUNS (the Figure-2 mixer settings). A run is a partial config (its `model` section is taken) or, in older layouts, the model
  settings themselves; runs whose model settings repeat an earlier run's (e.g. another data size) are
  left out, since this benchmark sets the shapes itself."""
  module = mqar_configs
  out = {}
  for name, run in module.RUNS.items():
    model = dict(run.get("model", run))
    if "mixer" in model and model not in out.values():
      out[name] = model
  return out


MIXERS = _load_mixers()
VOCAB_SIZE = 8192
N_LAYERS = 2
FIGURE2_KV = {64: 4, 128: 8, 256: 16, 512: 64}  # Zoology's Figure-2 (seq_len, num_kv_pairs) pairs
QUICK = dict(d_models=["32"], seq_lens=["64"], batch_scale=16, steps=3, warmup=1)

if __name__ == "__main__":  # flags of the command line only: accelerator_check.py imports bench_one
  _MIXERS = flags.DEFINE_list("mixers", list(MIXERS), "Mixers, names of RUNS in zoo_jax/configs/mqar.py "
                              f"({', '.join(MIXERS)}).")
  _D_MODELS = flags.DEFINE_list("d_models", ["64", "128", "256"], "Model widths.")
  _SEQ_LENS = flags.DEFINE_list("seq_lens", ["64", "256", "512"], "Sequence lengths.")
  _STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per trainer (the median is reported).", lower_bound=1)
  _WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps per trainer before timing (the JAX steps are "
                                 "compiled ahead of time).", lower_bound=0)
  _BATCH_SCALE = flags.DEFINE_integer("batch_scale", 1, "Divide Zoology's batch sizes by this.", lower_bound=1)
  _QUICK = flags.DEFINE_bool("quick", False, f"Smoke run: {QUICK} (flags given explicitly win).")
  _TORCH = flags.DEFINE_bool("torch", True, "Also time the PyTorch port of Zoology's step, if torch imports.")
  _FULL_HEAD = flags.DEFINE_bool("full_head", True, "Also time the full-head variant (--nofull_head: only "
                                 "zoo_jax and torch, for a shorter run).")
  _TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0: the CPU cores this "
                                        "process may use.", lower_bound=0)
  _TORCH_ATTENTION = flags.DEFINE_enum("torch_attention", "sdpa", ["sdpa", "zoology"],
                                       "The torch port's attention: fused SDPA, or Zoology's einsum softmax.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed for data and parameters.")


_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTEROP_THREADS",
               "TF_NUM_INTRAOP_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def zoology_batch_size(seq_len: int) -> int:
  if seq_len <= 128:
    return 512
  if seq_len <= 256:
    return 256
  if seq_len <= 512:
    return 128
  return 64


def num_kv_pairs(seq_len: int) -> int:
  return FIGURE2_KV.get(seq_len, max(1, seq_len // 8))


# ---------------------------------------------------------------------------------------------- JAX


class FullHeadLanguageModel(LanguageModel):
  """The library's model with Zoology's head: logits at every position, then the labelled ones gathered.

  Same parameters (same tree) as `LanguageModel`, so the training core's step runs its graphdef unchanged;
  only `logits_at`, the one call the MQAR loss (`tasks.mqar_sums`) makes, differs.
  """

  def logits_at(self, tokens_bl: jax.Array, positions_bk: jax.Array) -> jax.Array:
    logits_blv = self(tokens_bl)  # (b, l, v): the head at every position
    return jnp.take_along_axis(logits_blv, positions_bk[..., None], axis=1)


def run_config(mixer: str, d_model: int, seq_len: int, batch_size: int, num_examples: int, seed: int) -> dict:
  """A run config at one grid point: the mixer's Figure-2 model settings (2 layers, vocabulary 8192), MQAR data
  of `num_examples` examples per split, and the Figure-2 optimizer (AdamW lr 1e-3, wd 0.1, cosine, no clip)."""
  settings = MIXERS[mixer]
  if hasattr(mqar_configs, "figure2_models"):  # settings that depend on L (H3's d_state = L)
    settings = mqar_configs.figure2_models(seq_len).get(mixer, settings)
  c = config_lib.defaults().to_dict()
  segments = [dict(seq_len=seq_len, num_kv_pairs=num_kv_pairs(seq_len), num_examples=num_examples)]
  c["data"].update(vocab_size=VOCAB_SIZE, train_segments=segments, validation_segments=segments,
                   test_segments=segments)
  c["model"].update(d_model=d_model, n_layers=N_LAYERS, **settings)
  c["train"].update(epochs=1, batch_size=batch_size, eval_batch_size=batch_size)
  c["seed"] = seed
  return c


class JaxTrainer:
  """One compiled train step (a population of one) with its own state; `step()` runs one step."""

  def __init__(self, state: dict, sh: trainer.Shardings, step_fn, host_batches: list):
    self.batches = [sharding.put(b, sh.batch) for b in host_batches]
    t0 = time.perf_counter()
    self.compiled = step_fn.lower(state, self.batches[0]).compile()
    self.compile_s = time.perf_counter() - t0
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.gflop = float(cost.get("flops", float("nan"))) / 1e9 if cost else float("nan")
    self.num_params = trainer.count_params(jax.tree.map(lambda x: x[0], state["params"]))
    self.state = state  # donated to the step and replaced by its output
    self.i = 0
    self.last_metrics = None

  def step(self) -> None:
    self.state, metrics = self.compiled(self.state, self.batches[self.i % len(self.batches)])
    jax.block_until_ready((self.state, metrics))
    self.last_metrics = metrics
    self.i += 1

  def loss(self) -> float:
    return float(self.last_metrics["loss"][0])


def jax_trainers(task: tasks.MQARTask, model_cfg: ModelConfig, train_cfg, host_batches: list, mesh, seed: int,
                 total_steps: int, full_head: bool = True) -> dict[str, JaxTrainer]:
  """`zoo_jax` (the library's step) and, if `full_head`, `full_head` (the same step over
  `FullHeadLanguageModel`'s graphdef), each from its own copy of the same initial state (the same seed)."""
  abstract = nnx.eval_shape(lambda: FullHeadLanguageModel(model_cfg, rngs=nnx.Rngs(seed)))
  full_graphdef, _ = nnx.split(abstract, nnx.Param)  # the same parameter tree under the other class
  trainers = {}
  for name, graphdef in (("zoo_jax", None), ("full_head", full_graphdef))[:2 if full_head else 1]:
    _, state, sh, step_fn = trainer.single_step(task, model_cfg, train_cfg, mesh, seed, total_steps,
                                                graphdef=graphdef)
    trainers[name] = JaxTrainer(state, sh, step_fn, host_batches)
  return trainers


# ---------------------------------------------------------------------------------------------- torch


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def import_torch_ref(threads: int = 0, attention: str = "sdpa"):
  """(experiments/zoology_torch_ref as a module, a note) with torch's intra-op threads set (0: the usable
  cores), or (None, why not) when torch does not import."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"torch not importable ({e}): no torch column"
  sys.path.insert(0, _EXPERIMENTS)
  import zoology_torch_ref  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads or _cores())
  backend = next((line.split(":", 1)[1].strip() for line in torch.__config__.parallel_info().splitlines()
                  if line.startswith("ATen parallel backend")), "?")
  return zoology_torch_ref, (f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads "
                             f"({backend}), {torch.get_num_interop_threads()} inter-op, attention "
                             f"{attention}")


class TorchTrainer:

  def __init__(self, ref, mixer: str, d_model: int, seq_len: int, host_batches: list, seed: int,
               attention: str = "sdpa"):
    import torch  # pylint: disable=g-import-not-at-top
    torch.manual_seed(seed)
    run = MIXERS[mixer]
    model = ref.LanguageModel(mixer=run["mixer"], d_model=d_model, n_layers=N_LAYERS, vocab_size=VOCAB_SIZE,
                              l_max=seq_len, learned_positions=run.get("learned_positions", False),
                              attention_impl=attention)
    self.num_params = model.num_trainable_params()
    train_cfg = config_lib.defaults().train
    self.trainer = ref.Trainer(model, learning_rate=train_cfg.learning_rate,
                               weight_decay=train_cfg.weight_decay)
    as_long = lambda a: torch.from_numpy(a.astype(np.int64))
    self.batches = [(as_long(b["inputs"]), as_long(b["labels"])) for b in host_batches]
    self.i = 0
    self.last_loss = float("nan")

  def step(self) -> None:
    inputs, targets = self.batches[self.i % len(self.batches)]
    self.last_loss = self.trainer.step(inputs, targets)
    self.i += 1

  def loss(self) -> float:
    return self.last_loss


# ---------------------------------------------------------------------------------------------- Bench


def time_interleaved(trainers: dict[str, Any], warmup: int, steps: int) -> dict[str, list[float]]:
  """Warm-up steps, then timed steps round-robin over the trainers; seconds per step per trainer."""
  for _ in range(warmup):
    for t in trainers.values():
      t.step()
  times = {name: [] for name in trainers}
  for _ in range(steps):
    for name, t in trainers.items():
      t0 = time.perf_counter()
      t.step()  # ends with block_until_ready (JAX) / a synchronous CPU step (torch)
      times[name].append(time.perf_counter() - t0)
  return times


def bench_one(mixer: str, d_model: int, seq_len: int, mesh, torch_ref, *, batch_scale: int = 1, warmup: int = 1,
              steps: int = 5, seed: int = 0, torch_attention: str = "sdpa", full_head: bool = True
              ) -> dict[str, Any]:
  """One row of the table: the trainers' step times at (mixer, d_model, seq_len) (see the docstring);
  `full_head=False` times the library's step (and torch's) only."""
  kv = num_kv_pairs(seq_len)
  batch_size = max(1, zoology_batch_size(seq_len) // batch_scale)
  n_data = mesh.shape["data"]
  batch_size = max(n_data, batch_size // n_data * n_data)
  n_batches = min(warmup + steps, 4)  # distinct real batches, cycled
  config, model_cfg = config_lib.resolve(
      run_config(mixer, d_model, seq_len, batch_size, n_batches * batch_size, seed))
  task = tasks.MQARTask(config, [seed])
  host = list(task.train_batches(0))  # (1, b, l): a population of one
  k = task.k
  total_steps = 2 * (warmup + steps)

  trainers: dict[str, Any] = jax_trainers(task, model_cfg, config.train, host, mesh, seed, total_steps,
                                          full_head=full_head)
  n_params = trainers["zoo_jax"].num_params
  if torch_ref is not None and torch_ref.has_port(model_cfg.mixer):
    trainers["torch"] = TorchTrainer(torch_ref, mixer, d_model, seq_len, [{key: v[0] for key, v in b.items()}
                                                                          for b in host], seed, torch_attention)
    if trainers["torch"].num_params != n_params:
      raise ValueError(f"parameter counts differ, zoo_jax {n_params:,} vs torch port "
                       f"{trainers['torch'].num_params:,}: not a like-for-like comparison")

  times = time_interleaved(trainers, warmup, steps)
  tokens = batch_size * seq_len
  row = dict(mixer=mixer, d_model=d_model, seq_len=seq_len, kv=kv, k=k, batch=batch_size, params=n_params,
             gflop=trainers["zoo_jax"].gflop, gflop_full=trainers["full_head"].gflop if full_head else None,
             compile_s=sum(t.compile_s for t in trainers.values() if isinstance(t, JaxTrainer)))
  for name, ts in times.items():
    median = statistics.median(ts)
    row[f"{name}_ms"] = 1000 * median
    row[f"{name}_best_ms"] = 1000 * min(ts)
    row[f"{name}_tok_s"] = tokens / median
    row[f"{name}_loss"] = trainers[name].loss()
  return row


def _fmt_int(x: float) -> str:
  return f"{x:,.0f}"


def format_table(rows: list[dict], with_torch: bool) -> str:
  header = ["mixer", "d_model", "L", "kv", "batch", "params", "step ms", "tokens/s", "full-head ms",
            "full-head tok/s", "vs full head", "GFLOP ours/full"]
  if with_torch:
    header += ["torch ms", "torch tok/s", "vs torch"]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i > 0 else "---" for i in
                                                             range(len(header))) + "|"]
  for r in rows:
    if "error" in r:
      cells = [r["mixer"], str(r["d_model"]), str(r["seq_len"]), "", "", "", f"error: {r['error']}"]
      cells += [""] * (len(header) - len(cells))
    else:
      cells = [r["mixer"], str(r["d_model"]), str(r["seq_len"]), str(r["kv"]), str(r["batch"]),
               _fmt_int(r["params"]), f"{r['zoo_jax_ms']:.0f}", _fmt_int(r["zoo_jax_tok_s"])]
      if "full_head_ms" in r:
        cells += [f"{r['full_head_ms']:.0f}", _fmt_int(r["full_head_tok_s"]),
                  f"{r['zoo_jax_tok_s'] / r['full_head_tok_s']:.2f}x", f"{r['gflop']:.3g} / {r['gflop_full']:.3g}"]
      else:
        cells += ["–", "–", "–", f"{r['gflop']:.3g} / –"]
      if with_torch and "torch_ms" in r:
        cells += [f"{r['torch_ms']:.0f}", _fmt_int(r["torch_tok_s"]),
                  f"{r['zoo_jax_tok_s'] / r['torch_tok_s']:.2f}x"]
      elif with_torch:
        cells += ["–", "–", "no torch port"]
    lines.append("| " + " | ".join(cells) + " |")
  ok = [r for r in rows if "error" not in r]
  ratios = {"vs full head": "full_head"} | ({"vs torch": "torch"} if with_torch else {})
  if ok:
    lines.append("")
    for label, name in ratios.items():
      for stat, key in (("median steps", "ms"), ("fastest steps", "best_ms")):
        values = [r[f"{name}_{key}"] / r[f"zoo_jax_{key}"] for r in ok if f"{name}_{key}" in r]
        if not values:
          continue
        lines.append(f"{label} ({stat}): min {min(values):.2f}x, median {statistics.median(values):.2f}x, "
                     f"max {max(values):.2f}x over {len(values)} rows")
    if with_torch:
      lines.append(f"parameter counts equal (zoo_jax = torch port) in all "
                   f"{sum('torch_ms' in r for r in ok)} rows with a torch port")
  return "\n".join(lines)


def _apply_quick() -> None:
  if not _QUICK.value:
    return
  for name, value in QUICK.items():
    if not flags.FLAGS[name].present:
      flags.FLAGS[name].value = value


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # optax logs an INFO line per cosine schedule without warmup
    logging.set_verbosity(logging.WARNING)
  _apply_quick()
  for m in _MIXERS.value:
    if m not in MIXERS:
      raise app.UsageError(f"--mixers: unknown mixer {m!r}; accepted: {', '.join(MIXERS)}")
  d_models = [int(x) for x in _D_MODELS.value]
  seq_lens = [int(x) for x in _SEQ_LENS.value]
  mesh = sharding.make_mesh()
  torch_ref, torch_note = (None, "torch timing off (--notorch)")
  if _TORCH.value:
    torch_ref, torch_note = import_torch_ref(_TORCH_THREADS.value, _TORCH_ATTENTION.value)

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s) "
        f"({jax.devices()[0].device_kind}), mesh {dict(mesh.shape)}; python {platform.python_version()}",
        flush=True)
  thread_env = ", ".join(f"{v}={os.environ[v]!r}" + (" (set by this script)" if v == "OMP_WAIT_POLICY" and
                                                      _OMP_WAIT_POLICY_DEFAULTED else "")
                         for v in _THREAD_ENV if v in os.environ) or "none set"
  print(f"CPU: {_cores()} cores usable of {os.cpu_count()}; XLA:CPU intra-op pool = usable cores; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; thread env vars: {thread_env}; load average "
        f"{os.getloadavg()}", flush=True)
  print(torch_note, flush=True)
  print(f"2 layers, vocab {VOCAB_SIZE}, Zoology batch sizes / {_BATCH_SCALE.value}; median of {_STEPS.value} "
        f"timed steps after {_WARMUP.value} warm-up steps, trainers interleaved", flush=True)

  rows = []
  start = time.perf_counter()
  for mixer in _MIXERS.value:
    for d_model in d_models:
      for seq_len in seq_lens:
        t0 = time.perf_counter()
        try:
          row = bench_one(mixer, d_model, seq_len, mesh, torch_ref, batch_scale=_BATCH_SCALE.value,
                          warmup=_WARMUP.value, steps=_STEPS.value, seed=_SEED.value,
                          torch_attention=_TORCH_ATTENTION.value, full_head=_FULL_HEAD.value)
        except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: report, go on)
          row = dict(mixer=mixer, d_model=d_model, seq_len=seq_len, error=f"{type(e).__name__}: {e}"[:200])
        rows.append(row)
        if "error" in row:
          print(f"  {mixer} d={d_model} L={seq_len}: {row['error']}", flush=True)
        else:
          names = [n for n in ("zoo_jax", "full_head", "torch") if f"{n}_ms" in row]
          losses = ", ".join(f"{n} {row[f'{n}_loss']:.3f}" for n in names)
          print(f"  {mixer} d={d_model} L={seq_len} batch={row['batch']} k={row['k']} "
                f"params={row['params']:,}: "
                + " / ".join(f"{row[f'{n}_ms']:.0f}" for n in names) + " ms (fastest "
                + " / ".join(f"{row[f'{n}_best_ms']:.0f}" for n in names)
                + f"; compile {row['compile_s']:.1f}s; last loss {losses}) "
                f"[{time.perf_counter() - t0:.0f}s]", flush=True)

  print()
  print(format_table(rows, with_torch=torch_ref is not None))
  print(f"\ntotal {time.perf_counter() - start:.0f}s; load average after {os.getloadavg()}", flush=True)


if __name__ == "__main__":
  app.run(main)
