r"""Zoology's README trade-off experiment for the gated and delta-rule recurrences, as a sweep.

  python experiments/sweep.py --config=experiments/configs/tradeoff.py:cpu --workdir=/tmp/zoo_jax_tradeoff
  python experiments/sweep.py --config=experiments/configs/tradeoff.py:paper --workdir=/data/tradeoff

Mixers mamba2, gla, delta_net, gated_delta_net, rwkv7, each in the hybrid [BaseConv k=3, mixer] with 2
heads and short convolutions of width 4 (`mqar.tradeoff_models`), plus attention and BaseConv for
reference; widths 64, 128, 256; the runs built in Python as in `configs/figure2.py` (`figure2.grid`). The
figure to look at is `state_tradeoff.png`: MQAR accuracy against recurrent state size. scale=paper uses
the Figure-2 data grid (vocabulary 8192, (L, kv) in {(64, 4), (128, 8), (256, 16), (512, 64)}, 100,000
training examples, 64 epochs, 4 learning rates); scale=cpu one short length, 2 learning rates and few
examples (a smoke-sized sweep, not a result).
"""

import ml_collections

from zoo_jax.configs import figure2
from zoo_jax.configs import mqar

SCALES = ("cpu", "paper")
MIXERS = ("attention", "base_conv", *mqar.tradeoff_models())
CPU_LENGTHS = ((32, 4, 8_000, 500, None),)


def models(seq_len: int) -> dict[str, dict]:
  """Attention and BaseConv for reference (as in Figure 2), then the recurrences."""
  return {**mqar.figure2_models(seq_len), **mqar.tradeoff_models()}


def get_config(scale: str | None = None) -> ml_collections.ConfigDict:
  scale = scale or "cpu"
  if scale not in SCALES:
    raise ValueError(f"tradeoff scale must be one of {SCALES}, got {scale!r}")
  c = figure2.base_config(scale)
  if scale == "cpu":
    c.train.epochs = 4
  c.runs = figure2.grid(models, MIXERS, (64, 128, 256),
                        figure2.PAPER_LENGTHS if scale == "paper" else CPU_LENGTHS)
  return c
