r"""Runs a sweep (a grid of MQAR runs, trained vmapped in groups) and writes its table and figures.

  python experiments/sweep.py --config=experiments/configs/figure2.py:cpu --workdir=/tmp/zoo_jax_fig2
  python experiments/sweep.py --config=experiments/configs/figure2.py:cpu --workdir=/tmp/fig2 \
      --config.sweep.learning_rate='[1e-3]' --config.sweep.seed='[0,1,2]'

Writes `<workdir>/results.csv` (one row per run; rerunning skips finished runs and resumes unfinished
groups), `<workdir>/figure2.{png,pdf}` (accuracy vs width, a panel per sequence length, learning rate chosen
on validation, test accuracy plotted), `<workdir>/state_tradeoff.{png,pdf}` and `<workdir>/best.md` (the
plotted numbers). A sweep config is a run config with `runs` (the grid, built in Python in the config
file) and a `sweep` section (learning rates × seeds, trained together); see `zoo_jax/sweep.py`.
"""

import os
import sys

from absl import flags
from absl import logging

from zoo_jax import cli
from zoo_jax import sweep
from zoo_jax import sweep_plots

_CONFIG = cli.define_config_flag(os.path.join(os.path.dirname(__file__), "configs", "figure2.py"),
                                 "Sweep config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the results table, checkpoints and figures.",
                               required=True)


def run(config, workdir: str) -> list[dict]:
  try:
    sweep.expand_grid(config)  # every point is validated before anything is computed or written
  except ValueError as e:
    sys.exit(f"error: {e}")
  rows = sweep.run_sweep(config, workdir)
  table = sweep_plots.write_outputs(rows, workdir)
  print(f"\nBest learning rate per point (chosen on validation; test accuracy):\n{table}\n"
        f"table: {os.path.join(workdir, 'results.csv')}\nfigures: {os.path.join(workdir, 'figure2.png')}, "
        f"{os.path.join(workdir, 'state_tradeoff.png')} (and .pdf)", flush=True)
  return rows


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every checkpoint step at INFO
    logging.set_verbosity(logging.WARNING)
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
