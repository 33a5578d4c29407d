r"""Trains sequence mixers on MQAR and prints a comparison table.

  python experiments/mqar.py --workdir=/tmp/zoo_jax_mqar
  python experiments/mqar.py --config=experiments/configs/mqar.py:attention --config.model.d_model=128 \
      --workdir=/tmp/zoo_jax_attention

Each run of the config's `runs` trains in `<workdir>/<run name>` (config.json, metrics.jsonl, tb/,
checkpoints/, summary.json); the table — these runs and any other finished run already in the workdir — is
also written to `<workdir>/results.md`. Rerunning with the same workdir resumes unfinished runs from their
checkpoints and reports finished ones.

Seeds and learning rates (the config's `sweep` section, the sweep binaries' keys):
`--config.sweep.seed='[0,1,2]' --config.sweep.learning_rate='[1e-3,3e-3]'` trains each run at every seed ×
learning rate as ONE vmapped population (`train.train_population`; an empty list means the run's own `seed`
/ `train.learning_rate`, and a non-empty one replaces them). The table then follows Zoology's protocol: the
learning rate with the best validation accuracy (mean over seeds), and at it the test accuracy's mean ± std
over seeds and how many seeds reach 0.99 ("3/3"). A population of one model is a plain single run. With
runs at two or more lengths, or runs tested at two or more lengths (a run trained on a mixture),
`<workdir>/accuracy_vs_length.png` plots test accuracy against L per mixer (mean ± std over seeds); a seed
counts in the table's "seeds ≥ 0.99 at every L" only if it reaches 0.99 at each tested length.

`--parallel_runs` (default 2) runs train at once, each in a thread of this process, their progress lines
prefixed by `[run]`; on 2 CPU cores the default's two populations then share both cores.
"""

import concurrent.futures
import json
import os
import sys

from absl import logging
from absl import flags

from zoo_jax import checkpoint
from zoo_jax import cli
from zoo_jax import config as config_lib
from zoo_jax import sweep
from zoo_jax import train

_CONFIG = cli.define_config_flag(os.path.join(os.path.dirname(__file__), "configs", "mqar.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.",
                               required=True)
_PARALLEL_RUNS = flags.DEFINE_integer(
    "parallel_runs", 2, "How many runs train at once, each in its own thread of this process (their jitted "
    "steps share the CPU cores or the device); 1: one after another.", lower_bound=1)


format_table = train.format_table  # the table and the plot live in zoo_jax/train.py (unit-tested there)
plot_accuracy_vs_length = train.plot_accuracy_vs_length


def population_axes(config) -> tuple[dict, list[int], list[float]]:
  """(the config without its `sweep` section, its seeds, its learning rates): checked, one-line errors."""
  base = config_lib.as_dict(config)
  axes = base.pop("sweep", None) or {}
  for key in axes:
    if key not in ("seed", "learning_rate"):
      raise ValueError(f"sweep.{key} is not a key of an MQAR command's sweep; accepted: ['learning_rate', 'seed']")
  seeds, rates = list(axes.get("seed") or []), list(axes.get("learning_rate") or [])
  sweep.population(dict(sweep=dict(seed=seeds or [0], learning_rate=rates or [1e-3])))  # types and ranges
  return base, seeds, rates


def all_summaries(workdir: str, names: list[str]) -> dict[str, dict]:
  """Every finished run in `workdir` (the ones just trained first, in config order, then any others a
  previous command left there, by name): the table is merged, never rewritten without other runs' rows."""
  found = {}
  for name in names + sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name, "summary.json")
    if name not in found and os.path.isfile(path):
      try:
        with open(path) as f:
          found[name] = json.load(f)
        format_table({name: found[name]})  # holds every field the table shows
      except (OSError, ValueError, KeyError, TypeError) as e:
        found.pop(name, None)
        print(f"warning: {path} left out of the table: unreadable ({type(e).__name__}: {e})", file=sys.stderr)
  return found


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every checkpoint step at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    base, seeds, rates = population_axes(_CONFIG.value)
    configs = config_lib.expand_runs(base)
  except ValueError as e:  # a one-line message naming the key, before anything is computed or written
    sys.exit(f"error: {e}")
  parallel = min(_PARALLEL_RUNS.value, len(configs))

  def run(name: str, cfg: dict) -> str | None:
    """Trains one run; a one-line error, or None."""
    run_seeds = seeds or [cfg.get("seed", 0)]
    run_rates = rates or [cfg.get("train", {}).get("learning_rate", config_lib.defaults().train.learning_rate)]
    label = f"[{name}] " if parallel > 1 else ""
    if parallel == 1:
      print(f"\n=== {name} ===", flush=True)
    workdir = os.path.join(_WORKDIR.value, name)
    try:
      if len(run_seeds) * len(run_rates) == 1:  # a population of one: the plain single run
        cfg = config_lib.deep_merge(cfg, {"seed": run_seeds[0], "train": {"learning_rate": run_rates[0]}})
        train.train_and_evaluate(cfg, workdir, label=label)
      else:
        train.train_population(cfg, workdir, seeds=run_seeds, learning_rates=run_rates, name=name, label=label)
    except (ValueError, checkpoint.CheckpointError, train.NonFiniteLossError) as e:
      return f"error: {name}: {e}"
    return None

  if parallel == 1:  # one after another, stopping at the first error
    errors = []
    for name, cfg in configs.items():
      errors.append(run(name, cfg))
      if errors[-1]:
        break
  else:  # threads: a jitted step releases the GIL, so the runs' steps share the cores
    print(f"training {len(configs)} runs, {parallel} at a time (--parallel_runs)", flush=True)
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
      errors = list(pool.map(lambda item: run(*item), configs.items()))
  if any(errors):
    sys.exit(next(e for e in errors if e))
  summaries = all_summaries(_WORKDIR.value, list(configs))
  table = format_table(summaries)
  checkpoint.write_text(os.path.join(_WORKDIR.value, "results.md"), table + "\n")
  protocol = ("learning rate chosen on validation (mean over seeds), test accuracy mean ± std over seeds"
              if any(s.get("num_seeds", 1) > 1 for s in summaries.values()) else
              "model chosen on validation, accuracy on test")
  print(f"\nMQAR accuracy ({protocol}):\n" + table)
  print(f"(a seed counts in 'seeds ≥ {train.SOLVED_ACCURACY} at every L' only if it reaches "
        f"{train.SOLVED_ACCURACY} on every test length)")
  plot = os.path.join(_WORKDIR.value, "accuracy_vs_length.png")
  if plot_accuracy_vs_length({n: summaries[n] for n in configs if n in summaries}, plot):
    print(f"\naccuracy against length: {plot}")


if __name__ == "__main__":
  cli.run(main)
