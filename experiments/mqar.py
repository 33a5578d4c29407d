r"""Trains sequence mixers on MQAR and prints a comparison table.

  python experiments/mqar.py --workdir=/tmp/zoo_jax_mqar
  python experiments/mqar.py --config=experiments/configs/mqar.py:attention --config.model.d_model=128 \
      --workdir=/tmp/zoo_jax_attention

Each run of the config's `runs` trains in `<workdir>/<run name>` (config.json, metrics.jsonl, tb/,
checkpoints/, summary.json); the table — these runs and any other finished run already in the workdir — is
also written to `<workdir>/results.md`. Rerunning with the same workdir resumes unfinished runs from their
checkpoints and reports finished ones.
"""

import json
import os
import sys

from absl import logging
from absl import flags

from zoo_jax import checkpoint
from zoo_jax import cli
from zoo_jax import config as config_lib
from zoo_jax import train

_CONFIG = cli.define_config_flag(os.path.join(os.path.dirname(__file__), "configs", "mqar.py"))
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.",
                               required=True)


def format_table(summaries: dict) -> str:
  slices = sorted({s for summary in summaries.values() for s in summary["test_slices"]},
                  key=lambda s: [int(x) for x in s[1:].split("_kv")])
  header = ["run", "d_model", "params", "state size", "valid acc", "test acc", *(f"test {s}" for s in slices),
            "best epoch", "tok/s", "train s"]
  rows = [header, ["---"] * len(header)]
  for name, s in summaries.items():
    rows.append([name, str(s["d_model"]), f"{s['num_params']:,}", f"{s['state_size']:,}",
                 f"{s['validation_accuracy']:.3f}", f"{s['test_accuracy']:.3f}",
                 *(f"{s['test_slices'][sl]:.3f}" if sl in s["test_slices"] else "–" for sl in slices),
                 str(s["best_epoch"]), f"{s['tokens_per_sec']:,.0f}", f"{s['train_seconds']:.0f}"])
  return "\n".join("| " + " | ".join(r) + " |" for r in rows)


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
    configs = config_lib.expand_runs(_CONFIG.value)
  except ValueError as e:  # a one-line message naming the key, before anything is computed or written
    sys.exit(f"error: {e}")
  for name, cfg in configs.items():
    print(f"\n=== {name} ===", flush=True)
    try:
      train.train_and_evaluate(cfg, os.path.join(_WORKDIR.value, name))
    except (ValueError, checkpoint.CheckpointError, train.NonFiniteLossError) as e:
      sys.exit(f"error: {name}: {e}")
  table = format_table(all_summaries(_WORKDIR.value, list(configs)))
  checkpoint.write_text(os.path.join(_WORKDIR.value, "results.md"), table + "\n")
  print("\nMQAR accuracy (model chosen on validation, accuracy on test):\n" + table)


if __name__ == "__main__":
  cli.run(main)
