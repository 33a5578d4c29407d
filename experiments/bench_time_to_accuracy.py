r"""Wall time and steps to 0.99 validation accuracy: attention at Figure 2's first cell, two recipes.

  python experiments/bench_time_to_accuracy.py            # 3 seeds; Zoology's 4 learning rates
  python experiments/bench_time_to_accuracy.py --quick    # 1 seed, capped steps: a measurement under load

The cell: attention (1 head, learned positions, Zoology's block, 2 layers) of width 64 at L = 64 with 4 kv
pairs and vocabulary 8,192 (the paper's Figure 2, first panel, smallest width). Both recipes train through
the same zoo_jax step (`train.train_and_evaluate`, one model per run) on this machine, in this process:

- zoology: Zoology's Figure-2 recipe as `zoo_jax/configs/figure2.py` copies it: a fixed set of 100,000
  training examples, batch 512, validation every epoch (195 steps), AdamW (weight decay 0.1), cosine decay
  over 64 epochs, each learning rate of logspace(-4, -2, 4) a separate run (Zoology reports the best);
- recipe: the `quick` preset's recipe (`zoo_jax/configs/mqar.py`, `quick_start_base`, and its attention):
  fresh examples every step (`data.fresh_examples`), batch 64, validation every 100 steps, constant
  learning rate 3e-3.

Each run stops early above 0.99 validation accuracy. Per recipe (at Zoology's best learning rate: the one
with the most seeds reaching 0.99, then the fewest median steps) the table gives the median over seeds of the steps and of the wall time to
that point (data generation, compilation and evaluations included: what a user waits), the time of the
whole learning-rate grid, and the ratio to the recipe's time, measured in the same run. A run that does not
reach 0.99 within its cap counts as the cap ('>' in the table); a cap also shortens the cosine schedule to
the capped epochs (whole epochs: Zoology's 195 steps, the recipe's 100). The load (`os.getloadavg`) is printed
before and after; CPU seconds of the process estimate the wall time on idle cores.
"""

import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

from absl import flags
from absl import logging

from zoo_jax import cli
from zoo_jax import config as config_lib
from zoo_jax import train
from zoo_jax.configs import mqar as mqar_configs

_QUICK = flags.DEFINE_bool("quick", False, "1 seed; Zoology's two largest learning rates; steps capped by "
                           "--max_steps.")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds (default 0,1,2; --quick: 0).")
_ZOOLOGY_LRS = flags.DEFINE_list("zoology_lrs", None, "Zoology's learning rates to run (default its grid "
                                 "logspace(-4, -2, 4); --quick: the two largest).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Cap on each run's steps (default: Zoology's 64 epochs "
                                  "for zoology and the recipe's own epochs; --quick: 3,000).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs write (default: a temporary directory, removed).")

D_MODEL, SEQ_LEN, NUM_KV_PAIRS, VOCAB = 64, 64, 4, 8192
ZOOLOGY_LRS = (1e-4, 4.64e-4, 2.15e-3, 1e-2)  # logspace(-4, -2, 4), Zoology's Figure-2 grid
ZOOLOGY_EXAMPLES, ZOOLOGY_BATCH, ZOOLOGY_EPOCHS = 100_000, 512, 64


def _segments(n: int) -> list[dict]:
  return [dict(seq_len=SEQ_LEN, num_kv_pairs=NUM_KV_PAIRS, num_examples=n)]


def _cell(config: dict, attention: dict) -> dict:
  """`config` at the cell: `attention` (1 head) of width 64, 2 layers, L 64, 4 kv pairs, V 8192."""
  config["model"].update(config_lib.as_dict(attention), d_model=D_MODEL, n_layers=2)
  config["data"].update(vocab_size=VOCAB, validation_segments=_segments(1_000), test_segments=_segments(1_000))
  config["train"].update(eval_batch_size=500, early_stop_accuracy=0.99, log_every_steps=10_000)
  return config


def zoology_config(learning_rate: float, max_steps: int | None) -> dict:
  c = config_lib.defaults().to_dict()  # Figure-2 values (weight decay 0.1, cosine, no warmup)
  c["data"].update(train_segments=_segments(ZOOLOGY_EXAMPLES), fresh_examples=False)
  c["train"].update(batch_size=ZOOLOGY_BATCH, learning_rate=learning_rate, epochs=ZOOLOGY_EPOCHS)
  c = _cell(c, mqar_configs.ATTENTION)  # Figure 2's attention: learned positions, as Zoology's
  if max_steps:
    c["train"]["epochs"] = min(ZOOLOGY_EPOCHS, -(-max_steps // (ZOOLOGY_EXAMPLES // ZOOLOGY_BATCH)))
  return c


def recipe_config(max_steps: int | None) -> dict:
  base = mqar_configs.get_config("quick")
  c = config_lib.as_dict(base)
  c.pop("runs")
  c.pop("sweep")
  c["data"]["train_segments"] = _segments(c["data"]["train_segments"][0]["num_examples"])
  c = _cell(c, mqar_configs.QUICK_RUNS["attention-L16"]["model"])  # the quick start's attention
  if max_steps:
    steps_per_epoch = c["data"]["train_segments"][0]["num_examples"] // c["train"]["batch_size"]
    c["train"]["epochs"] = max(1, min(c["train"]["epochs"], -(-max_steps // steps_per_epoch)))
    c["train"]["warmup_steps"] = min(c["train"]["warmup_steps"], c["train"]["epochs"] * steps_per_epoch)
  return c


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def time_to_accuracy(config: dict, workdir: str) -> dict:
  """One run: steps and wall seconds until it stopped above 0.99 (or its cap, reached=False)."""
  start, cpu = time.time(), _cpu_seconds()
  summary = train.train_and_evaluate(config, workdir)
  return dict(steps=summary["steps"], seconds=time.time() - start, cpu_seconds=_cpu_seconds() - cpu,
              reached=bool(summary["stopped_early"]), validation=summary["validation_accuracy"])


def _median(runs: list[dict], key: str) -> str:
  value = statistics.median(r[key] for r in runs)
  return f"{'>' if not all(r['reached'] for r in runs) else ''}{value:,.0f}"


def main(argv):
  del argv
  quick = _QUICK.value
  try:
    seeds = [int(s) for s in (_SEEDS.value or (["0"] if quick else ["0", "1", "2"]))]
  except ValueError:
    sys.exit(f"error: --seeds must be non-negative integers separated by commas, got {_SEEDS.value}")
  if _MAX_STEPS.value is not None and _MAX_STEPS.value < 1:
    sys.exit(f"error: --max_steps must be an integer >= 1, got {_MAX_STEPS.value}")
  max_steps = _MAX_STEPS.value or (3_000 if quick else None)
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every checkpoint step at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    lrs = tuple(float(x) for x in _ZOOLOGY_LRS.value) if _ZOOLOGY_LRS.value else (
        ZOOLOGY_LRS[2:] if quick else ZOOLOGY_LRS)
  except ValueError:
    sys.exit(f"error: --zoology_lrs must be numbers separated by commas, got {_ZOOLOGY_LRS.value}")
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="zoo_jax_tta_")
  try:  # every config checked before anything trains
    for seed in seeds:
      for lr in lrs:
        config_lib.validate(dict(zoology_config(lr, max_steps), seed=seed))
      config_lib.validate(dict(recipe_config(max_steps), seed=seed))
  except ValueError as e:
    sys.exit(f"error: {e}")
  load_before = os.getloadavg()
  print(f"attention d {D_MODEL}, L {SEQ_LEN}, {NUM_KV_PAIRS} kv pairs, vocabulary {VOCAB}; seeds {seeds}; "
        f"step cap {max_steps or 'none'}; load {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}",
        flush=True)
  results: dict[str, list[dict]] = {}
  for seed in seeds:  # seeds outermost, recipes alternating: load drifts hit both alike
    cfg = dict(recipe_config(max_steps), seed=seed)
    results.setdefault("recipe", []).append(time_to_accuracy(cfg, os.path.join(workdir, f"recipe-s{seed}")))
    print(f"recipe seed {seed}: {results['recipe'][-1]}", flush=True)
    for lr in lrs:
      cfg = dict(zoology_config(lr, max_steps), seed=seed)
      key = f"zoology lr {lr:.2e}"
      results.setdefault(key, []).append(time_to_accuracy(cfg, os.path.join(workdir, f"zoology-{lr:.2e}-s{seed}")))
      print(f"{key} seed {seed}: {results[key][-1]}", flush=True)
  load_after = os.getloadavg()
  zoology = {k: v for k, v in results.items() if k.startswith("zoology")}
  best = min(zoology, key=lambda k: (-sum(r["reached"] for r in zoology[k]),  # most seeds reaching 0.99 first
                                     statistics.median(r["steps"] for r in zoology[k]),
                                     statistics.median(r["seconds"] for r in zoology[k])))
  recipe_s = statistics.median(r["seconds"] for r in results["recipe"])
  grid_s = statistics.median(sum(runs[i]["seconds"] for runs in zoology.values()) for i in range(len(seeds)))
  best_label = f"{best} (Zoology's best)" if len(zoology) > 1 else f"{best} (the one learning rate run)"
  rows = [("recipe", results["recipe"], recipe_s), (best_label, zoology[best],
                                                   statistics.median(r["seconds"] for r in zoology[best]))]
  print(f"\nTime to 0.99 validation accuracy, median over seeds {seeds} (load {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after; '>': not reached within the cap)")
  print("| recipe | steps | wall s | CPU s | wall / recipe's |\n| --- | --- | --- | --- | --- |")
  for name, runs, seconds in rows:
    print(f"| {name} | {_median(runs, 'steps')} | {_median(runs, 'seconds')} | {_median(runs, 'cpu_seconds')} | "
          f"{seconds / recipe_s:.2f} |")
  print(f"| Zoology's grid of {len(lrs)} learning rates, all runs | – | {grid_s:,.0f} | – | {grid_s / recipe_s:.2f} |")
  for name, runs in results.items():
    print(f"  {name}: " + ", ".join(f"{r['steps']} steps {r['seconds']:.0f} s val {r['validation']:.3f}"
                                    for r in runs))
  if not _WORKDIR.value:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  cli.run(main)
