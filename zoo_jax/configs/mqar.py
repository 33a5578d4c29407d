r"""MQAR on CPU: attention against BaseConv at one width over two lengths, 3 seeds, on 2 cores.

  python experiments/mqar.py --workdir=/tmp/zoo_jax_mqar                    # the default: `mixed`
  python experiments/mqar.py --config=experiments/configs/mqar.py:attention --workdir=/tmp/attn
  python experiments/mqar.py --config=experiments/configs/mqar.py:quick --workdir=/tmp/zoo_jax_quick

The argument after the colon picks runs of `RUNS` (comma-separated) or an alias of `ALIASES` (`mixed`, the
default; `quick`); every Figure-2 mixer (attention, base_conv, hyena, h3, rwkv, based, mamba), the other
baselines (hybrid, sliding_window, blocked, s4d, retnet, sparse_attention) and the recurrences of Zoology's
README trade-off (mamba2, gla, delta_net, gated_delta_net, rwkv7) have a run. Each run is a partial config
merged into the base below, so a run may change the model and the data; a preset's runs (`mixed`, `quick`)
have their preset's base and cannot be named with other runs. Overrides reach any key:
`--config.model.d_model=64`, `--config.train.learning_rate=1e-3`,
`--config.runs.attention.model.mixer.num_heads=2`.

The default, `mixed` (`MIXED_RUNS`, runs attention_L16_32 and base_conv_L16_32, recipe `mixed_base`): the
paper's finding at CPU scale. Attention (1 head, rotary positions) and BaseConv (kernels [3, long
implicit], no positions), 2 layers of width 64 with no MLP between mixers (Zoology's block), vocabulary
128. Each mixer is ONE model trained on fresh examples every step drawn from a 3:1 mixture of L = 16 and
L = 32 (4 kv pairs; Zoology's later configs train on mixtures; each length's rows of a batch run at their
own length, `data.group_by_length`) and tested at each length
(500 examples per length: the table's `test L16_kv4` / `test L32_kv4` columns, and a seed counts as solved
only at both); 3 seeds as one vmapped population per mixer; batch 64, AdamW (weight decay 0.1), lr 3e-3
with a cosine decay over 40 epochs of 100 steps (validation every epoch), early stop above 0.995 validation
accuracy. experiments/mqar.py trains the two populations at once (`--parallel_runs=2`, threads).
Measured, the default command on 2 idle cores (load 1.4-2.6, c672f09): attention test accuracy 0.994 at
L 16 and 0.992 at L 32 (mean of 3 seeds), 3/3 seeds >= 0.99 at both lengths (best epochs 34, 34, 30);
BaseConv 0.282 / 0.263 (0/3: lower, and lower at the longer length); 3 min 27 s wall, 390 CPU s (the same
table again at load 3-7: 6 min 6 s). Before the length grouping (every row padded to 32): attention per
seed 0.994 / 0.993, 0.997 / 0.994, 0.999 / 0.999 (3/3), BaseConv 0.282 / 0.263, 875 CPU s with both
populations at once at load 4.8-10.9 (774 one after the other). A cosine decay over 3,000 steps instead
left attention at 0/3 (two seeds jump late, at 1,500-1,800 steps, and were still climbing when the decay
ended).

`quick` (`QUICK_RUNS`, `quick_start_base`): one population per (mixer, length) at L = 16 and 32, learned
positions for attention, constant lr 3e-3, up to 4,000 steps. Measured (load 4-12): attention 0.999 ± 0.001
at L = 16 (3/3) but 0.834 ± 0.230 at L = 32 (2/3: one seed stalls at 0.51); BaseConv 0.288 and 0.259 (0/3);
23.5 minutes, 1,161 CPU seconds.

The single runs (`attention`, `base_conv`, `base_conv_L64` and every other mixer by name): one seed, 2
layers of width 128, 40,000 fixed MQAR examples for up to 12 epochs of batch 64, lr 3e-3 with cosine decay,
early stop above 0.99; L = 32 with 4 kv pairs (`base_conv_L64`: L = 64 with 8 kv pairs); attention with
learned positions. Measured on 2 idle cores (the foundation issue's note): attention 0.999 validation
accuracy at L = 32 at epoch 4 (89 s of training; epoch 7 on another CPU: one seed is a knife-edge);
BaseConv 0.866 after 12 epochs (113 s) and 0.426 at L = 64 (354 s). `--config.sweep.seed='[0,1,2]'`
trains seeds as one population.

The recipe search behind these presets (every variant tried, per seed, with CPU seconds and load) and the
profile of the population step: docs/mqar_recipes.md.
"""

import copy

import ml_collections

from zoo_jax import config as config_lib


def _segments(seq_len: int, num_kv_pairs: int, num_examples: int) -> list[dict]:
  return [dict(seq_len=seq_len, num_kv_pairs=num_kv_pairs, num_examples=num_examples)]


def _data(seq_len: int, num_kv_pairs: int, num_train: int = 40_000, num_validation: int = 1_000) -> dict:
  return dict(train_segments=_segments(seq_len, num_kv_pairs, num_train),
              validation_segments=_segments(seq_len, num_kv_pairs, num_validation),
              test_segments=_segments(seq_len, num_kv_pairs, 1_000))


ATTENTION = dict(mixer=dict(name="attention", num_heads=1), learned_positions=True)
BASE_CONV = dict(mixer=dict(name="base_conv", kernel_size=[3, -1], implicit_long_conv=True),
                 learned_positions=False)
HYBRID = dict(mixer=dict(name="hybrid", mixers=[dict(name="base_conv", kernel_size=3),
                                                dict(name="attention")]), learned_positions=False)

# The paper's Figure-2 mixers as Zoology configures them (its iclr24_zoology_figure2 configs): no positions
# except attention; H3 with d_state = L and head_dim 2; Based as the hybrid [BaseConv k=3, Based with
# feature_dim 8, 1 head]; Mamba in Zoology's MambaBlock (one RMSNorm branch, no MLP).
L_QUICK = 32


def figure2_models(seq_len: int) -> dict[str, dict]:
  return {
      "attention": ATTENTION,
      "base_conv": BASE_CONV,
      "hyena": dict(mixer=dict(name="hyena"), learned_positions=False),
      "h3": dict(mixer=dict(name="h3", d_state=seq_len, head_dim=2), learned_positions=False),
      "rwkv": dict(mixer=dict(name="rwkv"), learned_positions=False),
      "based": dict(mixer=dict(name="hybrid", mixers=[
          dict(name="base_conv", kernel_size=3),
          dict(name="based", feature_dim=8, num_heads=1, num_key_value_heads=1)]), learned_positions=False),
      "mamba": dict(mixer=dict(name="mamba"), block="mamba", learned_positions=False),
  }


# Baselines beyond Figure 2 (the issue-3 zoo), at their defaults.
OTHER_MODELS = {
    "hybrid": HYBRID,
    "sliding_window": dict(mixer=dict(name="sliding_window", window_size=8), learned_positions=True),
    "blocked": dict(mixer=dict(name="blocked", block_size=8), learned_positions=True),
    "s4d": dict(mixer=dict(name="s4d"), learned_positions=False),
    "retnet": dict(mixer=dict(name="retnet"), learned_positions=False),
    # Section 5's input-dependent sparse attention after a short BaseConv (experiments/sparse_hybrids.py runs
    # every selection at L = 256 and 512): learned selection of at most 16 of the 32 positions.
    "sparse_attention": dict(mixer=dict(name="hybrid", mixers=[
        dict(name="base_conv", kernel_size=3), dict(name="sparse_attention", selection="learned", budget=16)]),
                             learned_positions=False),
}



def tradeoff_models() -> dict[str, dict]:
  """The gated / delta-rule recurrences as in Zoology's README trade-off experiment: the hybrid
  [BaseConv k=3, mixer] (first layer BaseConv), 2 heads, short convolutions of width 4, no positions."""
  second = {
      "mamba2": dict(name="mamba2", d_conv=4),  # heads = 2·d_model / head_dim 64: 2 heads at width 64
      "gla": dict(name="gla", num_heads=2, use_short_conv=True, conv_size=4),
      "delta_net": dict(name="delta_net", num_heads=2, conv_size=4),
      "gated_delta_net": dict(name="gated_delta_net", num_heads=2, conv_size=4),
      "rwkv7": dict(name="rwkv7", num_heads=2),
  }
  return {name: dict(mixer=dict(name="hybrid", mixers=[dict(name="base_conv", kernel_size=3), mixer]),
                     learned_positions=False)
          for name, mixer in second.items()}


# The length preset `quick` (`--config=experiments/configs/mqar.py:quick`): attention and BaseConv at one
# width over two lengths, 3 seeds each, one vmapped population per (mixer, length). Runs set only the model
# and the data's length; the recipe is the base of `quick_start_base` (overrides of train.* and data.* reach
# every run).
QUICK_WIDTH = 64
QUICK_EPOCHS = 40  # of 100 steps
QUICK_LENGTHS = ((16, 4), (32, 4))  # (seq_len, num_kv_pairs)
QUICK_SEEDS = (0, 1, 2)
QUICK_RUNS = {f"{name}-L{seq_len}": dict(model=model, data=_data(seq_len, kv, 6_400, 500))
              for name, model in (("attention", ATTENTION), ("base_conv", BASE_CONV))
              for seq_len, kv in QUICK_LENGTHS}

# The default (`get_config(None)`, the README's first command; also `:mixed`): attention (1 head, rotary
# positions) and BaseConv at width 64, each ONE model trained on a 3:1 mixture of fresh L 16 and L 32
# examples (4 kv pairs, padded to 32; Zoology's later configs train on mixtures) and tested at each length,
# 3 seeds as one vmapped population per mixer. The recipe is `mixed_base`.
MIXED_LENGTHS = ((16, 4, 4_800), (32, 4, 1_600))  # (seq_len, num_kv_pairs, share of the 6,400 per epoch)
MIXED_EPOCHS = 40  # of 100 steps: the cosine decay's length
ATTENTION_ROTARY = dict(mixer=dict(name="attention", num_heads=1, rotary=True), learned_positions=False)


def _mixed_data() -> dict:
  segments = lambda n: [dict(seq_len=l, num_kv_pairs=kv, num_examples=n or share) for l, kv, share in MIXED_LENGTHS]
  return dict(train_segments=segments(None), validation_segments=segments(500), test_segments=segments(500))


MIXED_NAME = "L" + "_".join(str(l) for l, _, _ in MIXED_LENGTHS)
MIXED_RUNS = {f"{name}_{MIXED_NAME}": dict(model=model, data=_mixed_data())
              for name, model in (("attention", ATTENTION_ROTARY), ("base_conv", BASE_CONV))}

RUNS = {
    **{name: dict(model=model, data=_data(L_QUICK, 4))
       for name, model in {**figure2_models(L_QUICK), **OTHER_MODELS, **tradeoff_models()}.items()},
    "base_conv_L64": dict(model=BASE_CONV, data=_data(64, 8)),
    **QUICK_RUNS,
    **MIXED_RUNS,
}
ALIASES = {"quick": ",".join(QUICK_RUNS), "mixed": ",".join(MIXED_RUNS)}
DEFAULT_RUNS = ALIASES["mixed"]


def quick_start_base(config: ml_collections.ConfigDict) -> None:
  """The `quick` preset's recipe, in place: fresh examples every step (an epoch = 100 steps of batch 64, a
  validation interval), a constant learning rate of 3e-3 (no decay: measured, the cosine decay stalled the
  jump of 2 of 3 seeds at L = 16), up to QUICK_EPOCHS epochs, early stop above 0.995 (a margin for the test
  split's 0.99), 3 seeds as one population."""
  config.data.vocab_size = 128
  config.data.fresh_examples = True
  config.data.update(QUICK_RUNS[f"attention-L{QUICK_LENGTHS[0][0]}"]["data"])
  config.model.d_model = QUICK_WIDTH
  config.train.update(epochs=QUICK_EPOCHS, batch_size=64, eval_batch_size=500, learning_rate=3e-3,
                      warmup_steps=0, schedule="constant", early_stop_accuracy=0.995, log_every_steps=500)
  config.sweep = dict(seed=QUICK_SEEDS, learning_rate=())


def mixed_base(config: ml_collections.ConfigDict) -> None:
  """The default's (`mixed`) recipe, in place: the `quick` recipe (fresh examples, batch 64, lr 3e-3, early
  stop above 0.995 on the mixed validation set, 3 seeds) with a cosine decay over MIXED_EPOCHS epochs of 100
  steps (measured: the constant lr left 2 of 3 attention seeds at 0.92-0.95 after their jump; a decay over
  2,500 steps ended before a late seed's climb)."""
  quick_start_base(config)
  config.data.update(_mixed_data())
  config.train.update(epochs=MIXED_EPOCHS, schedule="cosine")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The runs named in `arg` (comma-separated names of RUNS, or an alias: `mixed`, `quick`; default
  DEFAULT_RUNS, the `mixed` runs). A command naming runs of the `mixed` preset has its base (`mixed_base`, 3
  seeds), one naming runs of the `quick` preset that base (`quick_start_base`, 3 seeds); otherwise the base
  below, one seed (`sweep` empty: the run's own seed and learning rate; `--config.sweep.seed='[0,1,2]'`
  trains seeds as one population)."""
  names = [n for n in ALIASES.get(arg or "", arg or DEFAULT_RUNS).split(",") if n]
  for name in names:
    if name not in RUNS:
      raise ValueError(f"config argument names unknown run {name!r}; accepted: {sorted(RUNS)} or {list(ALIASES)}")
  quick, mixed = [n for n in names if n in QUICK_RUNS], [n for n in names if n in MIXED_RUNS]
  if mixed and len(mixed) < len(names):
    raise ValueError(f"config argument mixes runs of the `mixed` preset ({', '.join(mixed)}) with others, which "
                     "train by another recipe; name them in separate commands")
  if quick and len(quick) < len(names):
    raise ValueError(f"config argument mixes runs of the `quick` preset ({', '.join(quick)}) with others, which "
                     "train by another recipe; name them in separate commands")
  config = config_lib.defaults()
  config.data.vocab_size = 128
  config.data.update(_data(32, 4))
  config.model.d_model = 128
  config.train.epochs = 12
  config.train.batch_size = 64
  config.train.eval_batch_size = 500
  config.train.learning_rate = 3e-3
  config.train.log_every_steps = 125
  # Tuples, so that `--config.sweep.seed='[0,1,2]'` overrides them (ml_collections cannot override a list).
  config.sweep = dict(seed=(), learning_rate=())
  if quick:
    quick_start_base(config)
  if mixed:
    mixed_base(config)
  # Copies: a --config override edits the lists inside a run in place, and RUNS outlives this config.
  config.runs = {name: copy.deepcopy(RUNS[name]) for name in names}
  return config
