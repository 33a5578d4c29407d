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

scale=cpu keeps the design and shrinks every axis to what 2 CPU cores train in about 45 minutes, on the
recipe measured in `zoo_jax/configs/mqar.py` (its mixture table): ONE model per (mixer, width) trained on a
3:1 mixture of FRESH examples at (L 16, 4 kv pairs) and (L 32, 4 kv pairs), padded to 32 (Zoology's later
configs train on mixtures of lengths), and tested per length: the results table's `test_slices`, which
`sweep.per_length` turns into one point per length. Attention with rotary positions (1 head) and
BaseConv; widths 64 and 128; vocabulary 128; batch 64; one learning rate, 3e-3, with a cosine decay over
4,000 steps (40 epochs of 100 steps, validation every epoch); early stop above 0.995 validation accuracy
on the mixture; 500 validation and 500 test examples per length; 3 seeds, each (mixer, width) one vmapped
population; the 4 groups train 2 at a time (`sweep.parallel_groups`, threads of one process).

Sizing (CPU seconds of a 3-seed population for 200 steps, compilation included, at load 8-10):
attention 34 (d 64) / 66 (d 128), BaseConv 27 / 43, Hyena 65 / 108, H3 152 (d 128). With attention's
measured 0.12 CPU s per step at d 64 (early stop at 3,300-3,500 steps) and BaseConv's 0.086 (all 4,000
steps), the grid is ~2,400 CPU s, ~20 min on 2 idle cores; Hyena at both widths would add ~2,900 CPU s
(0.25 / 0.47 CPU s per step) and does not fit the 45 minutes beside them (a config file whose `runs`
add `mixture_runs(cpu_models, ("hyena",), CPU_WIDTHS, ...)` trains it in the same workdir).

Measured (`python3 experiments/figure2.py --workdir=DIR` at c1520a5, on 2 CPU cores shared with other jobs
at load 5-12, the first 30 minutes at nice 5 beside another timed job: 47 min 48 s of wall time, 2,684
CPU s (1,904 user + 780 system; 0.93 cores on average)), test accuracy at each length, mean ± std over 3
seeds (seeds >= 0.99):
    attention d 64:   L16 0.997 ± 0.002 (3/3)   L32 0.995 ± 0.003 (3/3)   early stop at epochs 33-35
    attention d 128:  L16 0.996 ± 0.002 (3/3)   L32 0.995 ± 0.003 (3/3)   early stop at epochs 27-37
    BaseConv  d 64:   L16 0.282 ± 0.003 (0/3)   L32 0.263 ± 0.004 (0/3)   40 epochs (best epochs 5-15)
    BaseConv  d 128:  L16 0.555 ± 0.164 (0/3)   L32 0.550 ± 0.156 (0/3)   seeds 0.62 / 0.71 / 0.33, 40 epochs
Attention is flat at >= 0.99 at both lengths and both widths in 3 of 3 seeds; BaseConv stays far below it
and rises with width (~0.27 at d 64, ~0.55 at d 128), but barely falls from L 16 to L 32 (0.282 to
0.263 at d 64, 0.555 to 0.550 at d 128, within a seed's spread): both lengths hold 4 kv pairs, so the
recall load is the same, whereas the paper's lengths grow their kv pairs with L (4 to 64). Showing the
decline needs more kv pairs at the longer length, in the training mixture and its test slice (e.g. (32, 8)
or (64, 16)): not yet run.

Again after the length grouping (each length's rows at their own length, `data.group_by_length`; the
padded batch's loss and gradients): a clean clone of 82ad312, 2 cores at load 2.2-6.7 (a niced test suite
beside it): 13 min 42 s of wall time (827 s), 1,500 CPU s (1,192 user + 308 system). Test accuracy, mean ±
std over 3 seeds: attention d 64 0.994 ± 0.000 / 0.992 ± 0.000 (L 16 / L 32, 3/3 at both), d 128 0.998 ±
0.001 / 0.996 ± 0.002 (3/3 at both); BaseConv d 64 0.282 ± 0.003 / 0.263 ± 0.004 (0/3), d 128 0.554 ±
0.163 / 0.550 ± 0.156 (0/3). The same findings, in under a third of the time.

With the groups in threads of one process instead of spawned processes (`sweep.parallel_groups`): a clean
clone of cd53053, load 2.9-5.3 (another session's LM run at nice 5 beside it): 20 min 14 s of wall time,
1,215 CPU s (979 user + 236 system; 19% less CPU), the same table to the last digit.

The previous scale=cpu (one fixed set of 24,000 examples per length, (L, kv) in {(32, 4), (64, 8)}, 10
epochs, 1 seed, learned positions) left attention at ~0.15 at L = 64 (72 min at load 2-6): it never
showed the flat line.
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
# scale=cpu: one model per (mixer, width) on a mixture of lengths, tested per length. Training segments
# (seq_len, num_kv_pairs, share of the fresh examples: 3:1 toward the short length; 6,400 per epoch = 100
# steps of batch 64), and (seq_len, num_kv_pairs, examples) of each length's validation and test slices.
CPU_TRAIN_MIXTURE = ((16, 4, 4_800), (32, 4, 1_600))
CPU_EVAL_LENGTHS = ((16, 4, 500), (32, 4, 500))
CPU_MIXERS = ("attention", "base_conv")
CPU_WIDTHS = (64, 128)
CPU_SEEDS = (0, 1, 2)
CPU_PARALLEL_GROUPS = 2  # two groups at once (threads): a 2-core machine
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


def cpu_mixture_recipe(c: ml_collections.ConfigDict) -> None:
  """scale=cpu's training recipe, in place on `base_config('cpu')`: fresh examples, cosine decay over 40
  epochs of 100 steps, early stop above 0.995, one learning rate, 3 seeds, 2 groups at a time."""
  c.data.fresh_examples = True
  c.train.update(epochs=40, schedule="cosine", warmup_steps=0, learning_rate=3e-3, early_stop_accuracy=0.995)
  c.sweep = dict(learning_rate=(3e-3,), seed=CPU_SEEDS, max_group_size=0, parallel_groups=CPU_PARALLEL_GROUPS)


def cpu_models(seq_len: int) -> dict[str, dict]:
  """scale=cpu's mixers: `configs.mqar.figure2_models`, but attention with rotary positions (the mixture
  recipe's measurements: `configs/mqar.py`)."""
  models = copy.deepcopy(mqar.figure2_models(seq_len))
  models["attention"] = dict(mixer=dict(name="attention", num_heads=1, rotary=True), learned_positions=False)
  return models


def mixture_runs(models: Callable[[int], dict[str, dict]], names: tuple[str, ...], widths: tuple[int, ...],
                 train_mixture: tuple[tuple, ...], eval_lengths: tuple[tuple, ...]) -> dict[str, dict]:
  """A sweep's `runs` of one model per mixer × width, each trained on the mixture of `train_mixture`
  ((seq_len, kv, examples) segments) and validated / tested on a slice per `eval_lengths` entry:
  '<mixer>-d<width>-L<lengths joined by _>' → partial run config. `models(seq_len)` gets the longest length."""
  longest = max(seq_len for seq_len, _, _ in train_mixture + eval_lengths)
  lengths = "_".join(str(seq_len) for seq_len, _, _ in eval_lengths)
  segments = lambda spec: [dict(seq_len=l, num_kv_pairs=kv, num_examples=n) for l, kv, n in spec]
  return {f"{name}-d{d_model}-L{lengths}": dict(
      model={**copy.deepcopy(models(longest)[name]), "d_model": d_model},
      data=dict(train_segments=segments(train_mixture), validation_segments=segments(eval_lengths),
                test_segments=segments(eval_lengths)))
          for name, d_model in itertools.product(names, widths)}


def get_config(scale: str | None = None) -> ml_collections.ConfigDict:
  scale = scale or "cpu"
  c = base_config(scale)
  if scale == "paper":
    c.runs = grid(zoology_figure2_models, PAPER_MIXERS, (64, 128, 256, 512), PAPER_LENGTHS)
  else:
    cpu_mixture_recipe(c)
    c.runs = mixture_runs(cpu_models, CPU_MIXERS, CPU_WIDTHS, CPU_TRAIN_MIXTURE, CPU_EVAL_LENGTHS)
  return c
