r"""The paper's Figure 2: MQAR accuracy against width, one panel per sequence length, one line per mixer.

  python experiments/figure2.py --workdir=/tmp/zoo_jax_figure2                 # scale=cpu, 2 cores (below)
  python experiments/figure2.py --scale=paper --workdir=/data/figure2          # Zoology's 448-run grid

The grids are Python in `zoo_jax/configs/figure2.py` (the `runs` of a sweep config, shimmed as
`experiments/configs/figure2.py`); `experiments/sweep.py --config=...figure2.py:cpu` runs the
same sweep with `--config.*` overrides. Writes results.csv, figure2.{png,pdf}, state_tradeoff.{png,pdf}
and best.md into the workdir; rerunning resumes (finished runs are skipped). scale=cpu trains one model
per (mixer, width) on a mixture of lengths and places it in each length's panel; its measured table,
wall time and load are in the config's docstring.
"""

import os
import sys
import time

from absl import flags
from absl import logging

from zoo_jax import cli
from zoo_jax import sweep
from zoo_jax import sweep_plots
from zoo_jax.configs import figure2 as figure2_configs

_SCALE = flags.DEFINE_enum("scale", "cpu", ["cpu", "paper"], "Grid: cpu (reduced) or paper (Zoology's).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the results table, checkpoints and figures.",
                               required=True)


def _config(scale: str):
  return figure2_configs.get_config(scale)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every checkpoint step at INFO
    logging.set_verbosity(logging.WARNING)
  config = _config(_SCALE.value)
  try:
    runs = sweep.expand_grid(config)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"figure 2, scale={_SCALE.value}: {len(runs)} runs", flush=True)
  start = time.time()
  rows = sweep.run_sweep(config, _WORKDIR.value)
  table = sweep_plots.write_outputs(rows, _WORKDIR.value)
  print(f"\nFigure 2 points (learning rate chosen on validation; test accuracy):\n{table}\n\n"
        f"{len(rows)} runs in {os.path.join(_WORKDIR.value, 'results.csv')}; this invocation took "
        f"{(time.time() - start) / 60:.1f} min\nfigures: {os.path.join(_WORKDIR.value, 'figure2.png')}, "
        f"{os.path.join(_WORKDIR.value, 'state_tradeoff.png')} (and .pdf)", flush=True)


if __name__ == "__main__":
  cli.run(main)
