r"""Pretrains a language model: the embedded Shakespeare corpus by default, or Pile-format local shards.

  python experiments/lm.py                                # tiny attention on Shakespeare → /tmp/zoo_jax_lm/attention
  python experiments/lm.py --config=experiments/configs/lm.py:base_conv    # → /tmp/zoo_jax_lm/base_conv
  python experiments/lm.py --config=experiments/configs/lm.py:attention_125m \
      --config.data.manual_dir=/data/pile --workdir=/ckpt/attention_125m
  # several hosts: the same command on each, with
  #   --coordinator_address=HOST0:1234 --num_processes=N --process_id=I

Without --workdir, a run goes to /tmp/zoo_jax_lm/<preset> (the argument after the config file's colon;
`attention` when there is none; the file's name for another config file), so the two tiny runs above land
where `experiments/ar_gap.py /tmp/zoo_jax_lm/attention /tmp/zoo_jax_lm/base_conv` reads them.
The workdir gets config.json, metrics.jsonl, tb/ (TensorBoard), checkpoints/ (Orbax), summary.json, and
the AR-hit analysis's inputs ar_eval.npz and bigram_counts.npz (`experiments/ar_gap.py RUN_A RUN_B`).
Rerunning with the same workdir resumes from the latest checkpoint, reading the same next batches.
"""

import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from zoo_jax import cli
from zoo_jax import lm


_CONFIG = cli.define_config_flag(os.path.join(os.path.dirname(__file__), "configs", "lm.py"), "LM run config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results (default: "
                                "/tmp/zoo_jax_lm/<preset>, see above).")
DEFAULT_ROOT = "/tmp/zoo_jax_lm"
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (several hosts).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes (hosts) taking part.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in [0, num_processes).")


def default_workdir(config_arg: str) -> str:
  """/tmp/zoo_jax_lm/<preset> for a --config argument 'FILE[:PRESET]' (module docstring)."""
  file, _, preset = config_arg.partition(":")
  if not preset:
    stem = os.path.splitext(os.path.basename(file))[0]
    preset = "attention" if stem == "lm" else stem  # configs/lm.py's default preset
  return os.path.join(DEFAULT_ROOT, preset)


def main(argv):
  del argv
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  if not flags.FLAGS["verbosity"].present:  # Orbax and tfds log every step at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    lm.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    lm.resolve(_CONFIG.value)  # a one-line message naming the key, before anything is built or written
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"workdir: {workdir}", flush=True)
  lm.train_lm(_CONFIG.value, workdir)


if __name__ == "__main__":
  cli.run(main)
