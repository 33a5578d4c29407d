r"""MQAR on CPU: attention against BaseConv, as in the paper's Figure 2 but small enough for a laptop.

  python experiments/mqar.py --config=experiments/configs/mqar.py --workdir=/tmp/zoo_jax_mqar

The argument after the colon picks the runs (comma-separated names of `RUNS`), default
`attention,base_conv`: `--config=experiments/configs/mqar.py:attention`. Any key can be overridden,
`--config.model.d_model=128`, `--config.train.learning_rate=3e-3`, `--config.runs.attention.mixer.num_heads=2`.

Each run trains the same data with the model settings of its `RUNS` entry merged into `model`; Figure-2
settings from Zoology: attention with 1 head and learned positions, BaseConv with kernels [3, long
implicit] and no positions, 2 layers, no MLP between mixers (Zoology's block), AdamW with weight decay 0.1,
cosine decay, no warmup. Sizes are cut for 2 CPU cores: vocabulary 8192 as in the paper, one segment
L = 64 with 4 kv pairs for training, and validation/test also at L = 128 (8 kv pairs), where a fixed-width
gated convolution is expected to fall behind attention.
"""

import ml_collections

from zoo_jax import config as config_lib

RUNS = {
    "attention": dict(mixer=dict(name="attention", num_heads=1), learned_positions=True),
    "base_conv": dict(mixer=dict(name="base_conv", kernel_size=[3, -1], implicit_long_conv=True),
                      learned_positions=False),
    "hybrid": dict(mixer=dict(name="hybrid", mixers=[dict(name="base_conv", kernel_size=3),
                                                     dict(name="attention")]), learned_positions=False),
}


def get_config(arg: str = "attention,base_conv") -> ml_collections.ConfigDict:
  names = [n for n in (arg or "attention,base_conv").split(",") if n]
  for name in names:
    if name not in RUNS:
      raise ValueError(f"config argument names unknown run {name!r}; accepted: {sorted(RUNS)}")
  config = config_lib.defaults()
  config.data.vocab_size = 8192
  config.data.train_segments = [dict(seq_len=64, num_kv_pairs=4, num_examples=10_000),
                                dict(seq_len=128, num_kv_pairs=8, num_examples=10_000)]
  config.data.validation_segments = [dict(seq_len=64, num_kv_pairs=4, num_examples=1_000),
                                     dict(seq_len=128, num_kv_pairs=8, num_examples=1_000)]
  config.data.test_segments = [dict(seq_len=64, num_kv_pairs=4, num_examples=1_000),
                               dict(seq_len=128, num_kv_pairs=8, num_examples=1_000)]
  config.model.d_model = 64
  config.train.epochs = 8
  config.train.batch_size = 64
  config.train.eval_batch_size = 500
  config.train.learning_rate = 1e-3
  config.train.log_every_steps = 100
  config.runs = {name: RUNS[name] for name in names}
  return config
