r"""The paper's Figure 2 as a sweep: MQAR accuracy against width, a panel per sequence length.

  python experiments/figure2.py                     # scale=cpu (default), about 45 minutes on 2 CPU cores
  python experiments/figure2.py --scale=paper       # Zoology's grid (an accelerator job)
  python experiments/sweep.py --config=experiments/configs/figure2.py:cpu --config.sweep.seed='[0,1]' ...

A sweep config (see `zoo_jax.sweep`): the base run config, `runs` built below by loops over mixers ×
lengths × widths (each run's model, data segments and batch size written into its partial, as Zoology's
configs build their list of runs), and the population axes `sweep.learning_rate` × `sweep.seed`.

scale=paper is Zoology's Figure-2 grid (its iclr24_zoology_figure2 configs): (L, kv) in {(64, 4),
(128, 8), (256, 16), (512, 64)}, d_model in {64, 128, 256, 512}, learning rates logspace(-4, -2, 4),
vocabulary 8192, 100,000 training and 3,000 test examples per length (and 3,000 validation examples,
which Zoology does not have: it selects on test), 64 epochs, batch 512 for L <= 128, 256 at L = 256 and 128
at L = 512; mixers attention, base_conv, hyena, h3 (d_state = L), rwkv, based, mamba as
`configs.mqar` configures them (2 layers, no MLP, Zoology's block).

Dropout: scale=paper trains with Zoology's (`ZOOLOGY_DROPOUT`, `zoology_dropout`): its `ModelConfig` default
`embed_dropout = 0.1` on the embeddings of every `TransformerBlock` model (its `MambaBlock` has no dropout)
and `MHA(dropout=0.1)` on attention's probabilities (its Figure-2 configs). scale=cpu trains without dropout
(zoo_jax's default; the numbers below were measured so); `--config.runs.<run>.model.embed_dropout=0.1`
and `.mixer.dropout=0.1` turn it on per run.

scale=cpu keeps the design and shrinks every axis to what 2 CPU cores train in about 45 minutes:
attention and BaseConv, widths 64 and 128, (L, kv) in {(32, 4), (64, 8)}, learning rates 1e-3 and
3e-3, vocabulary 128, 24,000 training and 1,000 validation / test examples per length, batch 64, up to
10 epochs (early stop above 0.99 validation accuracy).

Measured (scale=cpu, one seed, 2 CPU cores shared with 2–6 other jobs: 72 min of wall time; the runs' own
throughputs on an idle machine put the grid at about 35–40 min), test accuracy at the learning rate chosen
on validation:
    L=32:  attention 1.000 (d=64), 0.993 (d=128);   BaseConv 0.260 (d=64), 0.831 (d=128)
    L=64:  attention 0.154 (d=64), 0.153 (d=128);   BaseConv 0.130 (d=64), 0.340 (d=128)
BaseConv falls with L and rises with width, as in the paper; attention solves L=32 but at L=64 neither width
leaves the ~0.15 plateau within 10 epochs of 24,000 examples (the paper trains 64 epochs on 100,000): at
this budget the CPU grid does not reproduce attention's flat line at the longer length.
"""

import copy
import itertools
from typing import Callable

import ml_collections
import numpy as np

from zoo_jax import config as config_lib
from zoo_jax.configs import mqar

SCALES = ("cpu", "paper")
PAPER_MIXERS = ("attention", "base_conv", "hyena", "h3", "rwkv", "based", "mamba")
# (seq_len, num_kv_pairs, training examples, validation = test examples, batch size; None: the base's)
PAPER_LENGTHS = ((64, 4, 100_000, 3_000, 512), (128, 8, 100_000, 3_000, 512), (256, 16, 100_000, 3_000, 256),
                 (512, 64, 100_000, 3_000, 128))
CPU_LENGTHS = ((32, 4, 24_000, 1_000, None), (64, 8, 24_000, 1_000, None))
# Zoology's Figure-2 dropout: `ModelConfig.embed_dropout` = 0.1 (its default: zoology/config.py at
# 0a76ef2, line 89), applied by `TransformerBlock` only; attention's `MHA(dropout=0.1)`
# (iclr24_zoology_figure2/configs.py at 0c59e61, line 58). resid_dropout stays 0, its default.
ZOOLOGY_DROPOUT = dict(embed_dropout=0.1, attention_dropout=0.1)


def zoology_dropout(model: dict) -> dict:
  """A copy of a model section with Zoology's Figure-2 dropout: `embed_dropout` 0.1 unless the block is
  'mamba' (Zoology's MambaBlock drops nothing), and `dropout` 0.1 on an 'attention' mixer."""
  model = copy.deepcopy(model)
  if model.get("block") != "mamba":
    model["embed_dropout"] = ZOOLOGY_DROPOUT["embed_dropout"]
  if model["mixer"]["name"] == "attention":
    model["mixer"]["dropout"] = ZOOLOGY_DROPOUT["attention_dropout"]
  return model


def zoology_figure2_models(seq_len: int) -> dict[str, dict]:
  """`configs.mqar.figure2_models(seq_len)`, each with Zoology's Figure-2 dropout (`zoology_dropout`)."""
  return {name: zoology_dropout(model) for name, model in mqar.figure2_models(seq_len).items()}


def data(seq_len: int, num_kv_pairs: int, train_examples: int, eval_examples: int) -> dict:
  """The data section of one length: a segment per split, validation and test of the same size."""
  return dict(train_segments=[dict(seq_len=seq_len, num_kv_pairs=num_kv_pairs, num_examples=train_examples)],
              validation_segments=[dict(seq_len=seq_len, num_kv_pairs=num_kv_pairs, num_examples=eval_examples)],
              test_segments=[dict(seq_len=seq_len, num_kv_pairs=num_kv_pairs, num_examples=eval_examples)])


def grid(models: Callable[[int], dict[str, dict]], names: tuple[str, ...], widths: tuple[int, ...],
         lengths: tuple[tuple, ...]) -> dict[str, dict]:
  """A sweep's `runs`: '<mixer>-d<width>-L<seq_len>-kv<kv pairs>' → partial run config, for every mixer ×
  length × width. `models(seq_len)` maps mixer names to model sections (H3's d_state is L); each length is
  (seq_len, num_kv_pairs, train_examples, eval_examples, batch_size or None)."""
  runs = {}
  for name, (seq_len, kv, train_examples, eval_examples, batch_size), d_model in itertools.product(
      names, lengths, widths):
    run = dict(model={**copy.deepcopy(models(seq_len)[name]), "d_model": d_model},
               data=data(seq_len, kv, train_examples, eval_examples))
    if batch_size:  # the paper halves the batch at longer lengths
      run["train"] = dict(batch_size=batch_size)
    runs[f"{name}-d{d_model}-L{seq_len}-kv{kv}"] = run
  return runs


def base_config(scale: str) -> ml_collections.ConfigDict:
  """The run config every run of a Figure-2-style sweep at `scale` starts from, with its population axes."""
  if scale not in SCALES:
    raise ValueError(f"figure2 scale must be one of {SCALES}, got {scale!r}")
  c = config_lib.defaults()
  c.model.n_layers = 2
  c.train.log_every_steps = 10_000
  c.train.eval_batch_size = 500
  if scale == "paper":
    c.data.vocab_size = 8192
    c.train.epochs = 64
    c.train.batch_size = 512
    learning_rates = tuple(float(x) for x in np.logspace(-4, -2, 4))
  else:
    c.data.vocab_size = 128
    c.train.epochs = 10
    c.train.batch_size = 64
    learning_rates = (1e-3, 3e-3)
  # Tuples, so that `--config.sweep.seed='[0,1,2]'` overrides them (ml_collections cannot override a list).
  c.sweep = dict(learning_rate=learning_rates, seed=(0,), max_group_size=0)
  return c


def get_config(scale: str | None = None) -> ml_collections.ConfigDict:
  scale = scale or "cpu"
  c = base_config(scale)
  if scale == "paper":
    c.runs = grid(zoology_figure2_models, PAPER_MIXERS, (64, 128, 256, 512), PAPER_LENGTHS)
  else:
    c.runs = grid(mqar.figure2_models, ("attention", "base_conv"), (64, 128), CPU_LENGTHS)
  return c
