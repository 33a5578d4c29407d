r"""Trained MQAR models tested at other (L, kv pairs) than their config's, per model, without training.

  python experiments/mqar_probe.py /tmp/zoo_jax_mqar --segments=16x4,32x4,32x6,32x8
  python experiments/mqar_probe.py /tmp/zoo_jax_mqar/attention_L16_32 --segments=32x8 --num_examples=1000

WORKDIR is an `experiments/mqar.py` workdir (every run directory in it) or one run's directory. For every
model (each seed × learning rate of a population: `checkpoint.load_population_for_inference`) it prints
the accuracy on `--num_examples` test examples per segment `LxKV`, drawn as the run's test split is drawn
(`zoo_jax.data.mqar`, the run's vocabulary, the model's own seed unless `--seed`): the run's own test
segments give back its test accuracy. A segment longer than the model's `seq_len` is skipped ('–'):
learned positions and long-convolution filters are sized by it.

Why: a model can reach 0.99 at the pair count it was trained on by a solution that does not carry to more
pairs (docs/mqar_recipes.md: 2 of the quick start's 3 attention seeds recall only from the first 4 pairs).
"""

import os
import sys

from absl import flags
from absl import logging
import jax.numpy as jnp

from zoo_jax import checkpoint
from zoo_jax import cli
from zoo_jax import tasks
from zoo_jax.data import mqar

_SEGMENTS = flags.DEFINE_list("segments", None, "Test segments 'LxKV' (e.g. 32x8), comma-separated.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 500, "Test examples per segment.")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the test examples (default: each model's own seed).")


def parse_segments(values: list[str] | None) -> list[tuple[int, int]]:
  """[(seq_len, num_kv_pairs)] of 'LxKV' strings; a one-line ValueError naming --segments."""
  if not values:
    raise ValueError("--segments must name at least one test segment 'LxKV', e.g. --segments=32x4,32x8")
  out = []
  for value in values:
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise ValueError(f"--segments entries must be 'LxKV' with positive integers (e.g. 32x8), got {value!r}")
    out.append((int(parts[0]), int(parts[1])))
  return out


def run_dirs(workdir: str) -> list[str]:
  """The run directories of `workdir`: itself if it is one, else its subdirectories that are."""
  is_run = lambda d: os.path.isfile(os.path.join(d, "config.json"))
  if is_run(workdir):
    return [workdir]
  found = sorted(os.path.join(workdir, n) for n in os.listdir(workdir)) if os.path.isdir(workdir) else []
  runs = [d for d in found if is_run(d)]
  if not runs:
    raise ValueError(f"{workdir} is not a run directory and holds none (written by experiments/mqar.py)")
  return runs


def probe(workdir: str, segments: list[tuple[int, int]], num_examples: int = 500,
          seed: int | None = None) -> list[dict]:
  """One row per model of every run in `workdir`: {run, member, accuracy: {'L<l>_kv<k>': float or None}}."""
  if num_examples < 1:
    raise ValueError(f"--num_examples must be >= 1, got {num_examples}")
  rows = []
  for run_dir in run_dirs(workdir):
    for member, model, config in checkpoint.load_population_for_inference(run_dir):
      accuracy = {}
      for seq_len, kv in segments:
        key = f"L{seq_len}_kv{kv}"
        if seq_len > model.cfg.seq_len:
          accuracy[key] = None
          continue
        data = mqar.build_dataset([dict(seq_len=seq_len, num_kv_pairs=kv, num_examples=num_examples)],
                                  split="test", vocab_size=config.data.vocab_size,
                                  seed=config.seed if seed is None else seed, power_a=config.data.power_a,
                                  random_non_queries=config.data.random_non_queries)
        sums = tasks.mqar_sums(model, dict(inputs=jnp.asarray(data.inputs), labels=jnp.asarray(data.labels)),
                               data.max_labels_per_example)
        accuracy[key] = float(sums["acc_sum"] / sums["examples"])
      rows.append(dict(run=os.path.basename(os.path.normpath(run_dir)), member=member, accuracy=accuracy))
  return rows


def format_rows(rows: list[dict], segments: list[tuple[int, int]]) -> str:
  keys = [f"L{l}_kv{k}" for l, k in segments]
  lines = ["| run | model | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
  for row in rows:
    cells = ["–" if row["accuracy"][k] is None else f"{row['accuracy'][k]:.3f}" for k in keys]
    lines.append(f"| {row['run']} | {row['member']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every restore at INFO
    logging.set_verbosity(logging.WARNING)
  if len(argv) != 2:
    sys.exit(f"error: expected one workdir (experiments/mqar.py's, or one run's), got {argv[1:]}")
  try:
    segments = parse_segments(_SEGMENTS.value)
    rows = probe(argv[1], segments, _NUM_EXAMPLES.value, _SEED.value)
  except (ValueError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")
  print(format_rows(rows, segments))


if __name__ == "__main__":
  cli.run(main)
