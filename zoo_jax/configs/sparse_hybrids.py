r"""The paper's Section-5 hybrids: BaseConv with input-dependent sparse attention, on MQAR and the LM job.

  python experiments/sparse_hybrids.py --workdir=/tmp/zoo_jax_sparse                     # everything
  python experiments/sparse_hybrids.py --workdir=/tmp/sparse --tasks=mqar512 --variants=base_conv,full,learned
  python experiments/sparse_hybrids.py --config=experiments/configs/sparse_hybrids.py:smoke --workdir=/tmp/s

Variants (rows of the table; `variant_mixer` builds each as a model mixer config):
  base_conv         pure BaseConv, kernel sizes [3, long implicit], no positions: the lower end of the gap
  full              hybrid [BaseConv k=3, sparse_attention selection=full]: plain attention in layer 1, the
                    upper end
  random            ... selection=random, budget k (seeded per sequence), keys=selected
  programmatic      ... selection=programmatic (tokens seen earlier in the sequence; MQAR's filler 0 excluded),
                    keys=selected: selected queries attend to selected keys only, O(k²)
  programmatic_all  the same with keys=all: selected queries attend to every earlier position, O(k·L)
  learned           ... selection=learned (a scorer's positive scores, in order, up to k), keys=selected,
                    sparsity loss aux_weight · mean gate (aux_weight 0.01)
  learned_all       the same with keys=all
Tasks: mqar256, mqar512 (MQAR at L = 256 and 512) and lm (the tiny LM of `configs.lm` on the
embedded Shakespeare corpus, rows of 256 tokens). Every task has 2 layers; in the hybrids layer 0 is BaseConv
k=3 and layer 1 the sparse layer (hybrid layer i takes mixers[i % 2]), so the LM's hybrids replace layer 1's
long convolution of its BaseConv preset. The budget k is `tasks.<task>.budget`, L/4 by default (64, 128, 64).

Config layout: `tasks.<task>.run` is a complete run config for the task's trainer (zoo_jax.config for MQAR,
zoo_jax.lm for the LM) whose `model.mixer` is replaced per variant; `tasks.<task>` also holds the sparse
layer's `budget`, `exclude_tokens`, `num_heads`, `rotary`. Top level: `aux_weight`, `random_seed`,
`ar_threshold` (AR-hit threshold for the LM column, 0 = scaled from the training tokens as
experiments/ar_gap.py does). Any key can be overridden, e.g. `--config.tasks.mqar256.budget=32`,
`--config.tasks.lm.run.train.steps=240`, `--config.aux_weight=0.1`.

Sizes (MQAR), chosen so that 7 variants × 2 lengths train in about 45 minutes on 2 CPU cores: Zoology's
block (no MLP, `model.block='zoology'`) at width 64, 2 layers; vocabulary 1,024 (MQAR needs a vocabulary
larger than L, so 512 cannot serve L = 512; the paper uses 8,192); batch 64, AdamW lr 3e-3 with cosine decay,
2 epochs of 24,000 examples (750 steps), early stop above 0.99 validation accuracy; 1,000 validation and
1,000 test examples. 4 kv pairs at both lengths, not the paper's L/16 or more: measured with the `full`
hybrid at this width and lr (2 CPU cores, load 2-4), 4 kv pairs are learned in ~300 steps at L = 64 and at
L = 256 (validation accuracy 0.82 after 312 steps), while 16 kv pairs stay at chance (accuracy 0.002, loss
ln 512) after 624 steps at L = 64 and L = 256 (also with a 64/128/256 length curriculum or batch 32; lr
1e-2 tried for 312 steps) and 8 kv pairs at L = 256 only start to leave chance at step 624 (accuracy 0.008).
With these defaults `full` reaches test accuracy 0.983 at L = 512 (0.039 after epoch 1: just inside the
budget; 463 s of training) and `programmatic_all` 0.994 at L = 256 (173 s). More kv pairs need more steps
(`--config.tasks.mqar256.run.data.train_segments=...`, `--config.tasks.mqar256.run.train.epochs=...`).
Per-step times (batch 64): experiments/sparse_hybrids.py's docstring. The LM task keeps the tiny preset's
120 steps of 8 × 256 tokens (~7-17 minutes a run on 2 CPU cores, dominated by the 50,304-token head).

`smoke` (the argument after the colon) is a plumbing check, not a result: a few hundred MQAR examples at
L = 64 / 128, one epoch, and 4 LM steps with 32 validation rows.
"""

import copy

import ml_collections

from zoo_jax import config as config_lib
from zoo_jax.configs import lm as lm_configs

TASKS = ("mqar256", "mqar512", "lm")
VARIANTS = ("base_conv", "full", "random", "programmatic", "programmatic_all", "learned", "learned_all")
SCALES = ("default", "smoke")

MQAR_VOCAB = 1024
NUM_KV_PAIRS = {256: 4, 512: 4}  # measured: 8 and 16 stall at chance in this budget (module docstring)
TRAIN_EXAMPLES = {256: 24_000, 512: 24_000}  # per epoch: 2 epochs of batch 64 = 750 steps
EPOCHS = {256: 2, 512: 2}
EVAL_EXAMPLES = 1_000


def _check(name: str, accepted: tuple[str, ...], what: str) -> None:
  if name not in accepted:
    raise ValueError(f"unknown {what} {name!r}; accepted: {', '.join(accepted)}")


def check_names(tasks: list[str], variants: list[str]) -> None:
  """One-line ValueError for the first unknown task or variant name."""
  for task in tasks:
    _check(task, TASKS, "task")
  for variant in variants:
    _check(variant, VARIANTS, "variant")


def variant_mixer(variant: str, *, budget: int, exclude_tokens=(), num_heads: int = 1, rotary: bool = False,
                  aux_weight: float = 0.01, seed: int = 0) -> dict:
  """The model mixer config of one variant (module docstring): pure BaseConv or [BaseConv k=3, sparse]."""
  _check(variant, VARIANTS, "variant")
  if variant == "base_conv":
    return dict(name="base_conv", kernel_size=[3, -1], implicit_long_conv=True)
  sparse = dict(name="sparse_attention", num_heads=num_heads, rotary=rotary)
  if variant == "full":
    sparse.update(selection="full")
  elif variant == "random":
    sparse.update(selection="random", budget=budget, keys="selected", seed=seed)
  else:
    selection, _, keys = variant.partition("_")
    sparse.update(selection=selection, budget=budget, keys="all" if keys else "selected")
    if selection == "programmatic":
      sparse.update(exclude_tokens=list(exclude_tokens))
    else:
      sparse.update(aux_weight=aux_weight)
  return dict(name="hybrid", mixers=[dict(name="base_conv", kernel_size=3), sparse])


def _segments(seq_len: int, num_kv_pairs: int, num_examples: int) -> list[dict]:
  return [dict(seq_len=seq_len, num_kv_pairs=num_kv_pairs, num_examples=num_examples)]


def mqar_run(seq_len: int, num_kv_pairs: int, train_examples: int, epochs: int,
             eval_examples: int = EVAL_EXAMPLES) -> dict:
  """An MQAR run config (zoo_jax.config schema) without its mixer."""
  c = config_lib.defaults().to_dict()
  c["data"].update(vocab_size=MQAR_VOCAB, train_segments=_segments(seq_len, num_kv_pairs, train_examples),
                   validation_segments=_segments(seq_len, num_kv_pairs, eval_examples),
                   test_segments=_segments(seq_len, num_kv_pairs, eval_examples))
  c["model"].update(d_model=64, n_layers=2, state_mixer="none", block="zoology", learned_positions=False,
                    mixer=variant_mixer("base_conv", budget=1))
  c["train"].update(epochs=epochs, batch_size=64, eval_batch_size=250, learning_rate=3e-3,
                    early_stop_accuracy=0.99, log_every_steps=50)
  return c


def lm_run() -> dict:
  """The LM run config: `configs.lm`'s tiny BaseConv preset (the mixer is replaced per variant)."""
  return lm_configs.get_config("base_conv").to_dict()


def get_config(scale: str | None = None) -> ml_collections.ConfigDict:
  scale = scale or "default"
  _check(scale, SCALES, "sparse_hybrids scale")
  c = ml_collections.ConfigDict()
  c.aux_weight = 0.01
  c.random_seed = 0
  c.ar_threshold = 0
  if scale == "default":
    mqar = {L: mqar_run(L, NUM_KV_PAIRS[L], TRAIN_EXAMPLES[L], EPOCHS[L]) for L in (256, 512)}
    budgets = {256: 64, 512: 128}
    lm = lm_run()
  else:
    mqar = {256: mqar_run(64, 4, 256, 1, eval_examples=64), 512: mqar_run(128, 8, 256, 1, eval_examples=64)}
    budgets = {256: 16, 512: 32}
    lm = lm_run()
    lm["train"].update(steps=4, eval_every_steps=4, eval_max_rows=32, warmup_steps=1, log_every_steps=2,
                       checkpoint_every_steps=4)
  c.tasks = dict(
      mqar256=dict(run=mqar[256], budget=budgets[256], exclude_tokens=[0], num_heads=1, rotary=False),
      mqar512=dict(run=mqar[512], budget=budgets[512], exclude_tokens=[0], num_heads=1, rotary=False),
      # 2 heads and rotary positions, as the tiny attention LM preset
      lm=dict(run=lm, budget=64, exclude_tokens=[], num_heads=2, rotary=True),
  )
  return c


def task_kind(task: str) -> str:
  _check(task, TASKS, "task")
  return "lm" if task == "lm" else "mqar"


def run_config(config, task: str, variant: str) -> dict:
  """The complete run config of (task, variant): the task's run with the variant's mixer (a plain dict)."""
  _check(task, TASKS, "task")
  _check(variant, VARIANTS, "variant")
  spec = config.tasks[task]
  run = copy.deepcopy(spec.run.to_dict() if hasattr(spec.run, "to_dict") else dict(spec.run))
  run["model"]["mixer"] = variant_mixer(
      variant, budget=spec.budget, exclude_tokens=tuple(spec.exclude_tokens), num_heads=spec.num_heads,
      rotary=spec.rotary, aux_weight=config.aux_weight, seed=config.random_seed)
  return run
