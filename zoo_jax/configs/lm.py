r"""Language-model pretraining configs: tiny CPU runs on the embedded Shakespeare corpus, and the paper's sizes.

  python experiments/lm.py                                                   # tiny attention, Shakespeare
  python experiments/lm.py --config=experiments/configs/lm.py:base_conv --workdir=/tmp/zoo_jax_lm/base_conv
  python experiments/lm.py --config=experiments/configs/lm.py:attention_125m \
      --config.data.manual_dir=/data/pile --workdir=/ckpt/attention_125m         # the Pile (local shards)

The argument after the colon picks a preset of `PRESETS`:
  attention, base_conv            tiny (2 layers, width 64, GLU ×2, ~3.3M parameters of which 3.2M are the
                                  GPT-2 embedding), rows of 256 tokens, batch 8, 120 steps (0.25M tokens),
                                  validation on 192 rows (49k tokens of the held-out plays); the pair
                                  compared by experiments/ar_gap.py. Sized for 2 shared CPU cores, where
                                  the 50,304-token head is ~95% of the FLOPs
  attention_cpu, base_conv_cpu    the CPU pair for Table 1's pattern: the shipped 2,048-token Shakespeare BPE
                                  (`data.tokenizer='shakespeare_bpe2k'`, trained on the train plays only; the
                                  head is ~18% of the FLOPs, not 95%), 4 layers × 128 (attention: 4 rotary
                                  heads; BaseConv: kernels 3 / long implicit), GLU ×2, 0.92M parameters;
                                  rows of 1,024 tokens (more in-row repeats to recall), batch 4, 480 steps
                                  (1.97M tokens, 1.2 epochs), lr 3e-3; validation on all 230 rows (118k tokens)
  attention_125m, base_conv_125m  12 layers × 768 (the paper's 125M size): attention with 12 heads, rotary
                                  positions and a 4× MLP (GPT-2-small shape, 124M with the tied 50,304-token
                                  embedding); BaseConv alternating kernels 3 and long implicit over the layers, same MLP
  attention_360m, base_conv_360m  24 layers × 1024 (GPT-2-medium shape, ~355M): the paper's 360M size;
                                  FSDP over one 8-device node (mesh.fsdp = 8, data = -1: more nodes add data
                                  parallelism; on another device count set --config.mesh.fsdp to a divisor
                                  of it). An 8-device node gets 1/8 of the parameters, gradients and AdamW
                                  state, and of the trainer's best parameters (0.66 / 0.53 GiB of arguments per
                                  device) and 32 of the 256 rows: 12.5 / 14.1 GiB of XLA temporaries per
                                  device (attention on its 'xla' path, L × L scores;
                                  `experiments/bench_memory.py --fsdp=8`, compiled for 8 simulated CPU
                                  devices), far under 80 GB
The big presets train on rows of 1,024 tokens, global batch 256 (0.26M tokens per step), 20,000 steps ≈
5B tokens (the paper's token budget), lr 6e-4 (125M) / 3e-4 (360M) with 1% warmup and cosine decay.
Measured (tiny pair, 2 CPU cores shared with 4 other jobs): `experiments/bench_lm.py --seq_len=256
--batch_size=8` (the tiny presets' step, synthetic tokens) gives 408 / 522 tokens/s
for attention and 443 / 480 for BaseConv, alternated over two rounds at load average 11-15 (BaseConv /
attention 1.09 and 0.92): the two models train at the same speed, both dominated by the 50,304-token head,
and the speed is the machine's load, not the model's (an earlier figure of ~240 vs ~600 tokens/s recorded two different loads). The README's three commands (both
runs of 120 steps, then experiments/ar_gap.py) took 29 min 45 s at load ~12 (371 / 376 tokens/s including
compilation, ~70 s per evaluation of 192 rows). After 0.25M tokens validation perplexity is 694 (attention)
vs 808 (BaseConv). experiments/ar_gap.py on the pair (bigrams counted over the 245,760 tokens trained on,
hits within a document): AR hits are 5.1% of the held-out tokens (threshold 10; 76% of them bigrams never
seen in training) and *harder* than other tokens for both models (perplexity 3,940 / 4,343 vs 632 / 738):
at this budget neither model has learned in-context recall, so only 3.3% of the gap sits on AR hits, not
the paper's 82%. The paper's effect needs models that have formed induction heads (far more tokens than 2
CPU cores give in minutes).
Measured (CPU pair, load 5-12 on 2 cores shared with 4 other jobs; `experiments/lm.py
--config=experiments/configs/lm.py:attention_cpu`, then `:base_conv_cpu`, then experiments/ar_gap.py): attention
28 min 12 s wall (681 CPU s, 1,295 tokens/s), BaseConv 10 min 29 s (319 CPU s, 3,421 tokens/s); validation
perplexity 79.2 vs 68.6. Table 1's pattern does NOT appear at 1.97M tokens: AR hits (3.7% of held-out
tokens, threshold 10) have perplexity 349 (attention) / 372 (BaseConv) against 74.8 / 64.3 on other tokens;
neither model's loss falls with position past ~16 tokens, and attention predicts the second copy of a
repeated random block no better than the first (11.07 vs 11.09 nats): no induction yet. Attention pilots: AR-hit /
other perplexity 1,062 / 338 after 0.16M tokens, 290 / 135 after 0.82M, 349 / 74.8 after 1.97M. More steps do
not help (README, "The CPU pair for Table 1"): 2 layers × 128, rows of 512, 16,000 steps of 2 rows (16.4M
tokens, 10 epochs, 2,202 CPU s) reach validation perplexity 44.7 with no copying at any checkpoint examined
(`zoo_jax.analysis.induction.induction_score` ~0 on random tokens and on repeated held-out text) and AR hits
harder still (2,668 vs 41.2), while the same model trained on rows that repeat a 256-token chunk starts
copying from context between steps 200 and 300 of 8 rows: the corpus rewards copying too rarely.
Overrides reach any key: `--config.data.seq_len=512`, `--config.mesh.fsdp=8`, `--config.model.mixer.rotary=False
--config.model.learned_positions=True`.
"""

import ml_collections

from zoo_jax import lm

TINY_ATTENTION = dict(d_model=64, n_layers=2, mixer=dict(name="attention", num_heads=2, rotary=True),
                      state_mixer="glu", state_mixer_hidden_mult=2, block="prenorm", learned_positions=False)


def base_conv_mixer(n_layers: int) -> dict:
  """BaseConv alternating a short (3) and a long implicit convolution over the layers, as Zoology's Pile runs."""
  return dict(name="base_conv", kernel_size=[3, -1] * (n_layers // 2) + [3] * (n_layers % 2),
              implicit_long_conv=True)


TINY_BASE_CONV = dict(TINY_ATTENTION, mixer=base_conv_mixer(2))
TINY_TRAIN = dict(steps=120, batch_size=8, eval_batch_size=32, eval_every_steps=60, eval_max_rows=192,
                  learning_rate=3e-3, warmup_steps=12, log_every_steps=10, checkpoint_every_steps=60)

# The CPU pair for Table 1's pattern (module docstring): the shipped 2,048-token Shakespeare BPE, so the head
# is a small part of the FLOPs and the tokens go to 4 layers × 128 with 4 rotary heads (induction needs 2+).
CPU_DATA = dict(seq_len=1024, tokenizer="shakespeare_bpe2k")
CPU_ATTENTION = dict(TINY_ATTENTION, d_model=128, n_layers=4,
                     mixer=dict(name="attention", num_heads=4, rotary=True))
CPU_BASE_CONV = dict(CPU_ATTENTION, mixer=base_conv_mixer(4))
CPU_TRAIN = dict(steps=480, batch_size=4, eval_batch_size=16, eval_every_steps=160, eval_max_rows=0,
                 learning_rate=3e-3, warmup_steps=24, log_every_steps=20, checkpoint_every_steps=160)


# The paper-size presets' memory options (`zoo_jax.model`): per-block remat, a scan over the layers, the
# loss's head and log-softmax in chunks of positions. experiments/bench_memory.py measures them.
MEMORY = dict(remat="full", scan_layers=True, loss_chunk=256)

# The 360M presets' mesh: parameters, gradients and AdamW state split over the 8 devices of a node (FSDP),
# the batch over all devices (module docstring).
FSDP_360M = dict(data=-1, fsdp=8, model=1)


def _big(d_model: int, n_layers: int, mixer: dict, learning_rate: float) -> dict:
  return dict(
      data=dict(seq_len=1024),
      model=dict(d_model=d_model, n_layers=n_layers, mixer=mixer, state_mixer="mlp", state_mixer_hidden_mult=4,
                 block="prenorm", learned_positions=False, dtype="bfloat16", **MEMORY),
      train=dict(steps=20_000, batch_size=256, eval_batch_size=64, eval_every_steps=1000, eval_max_rows=4096,
                 learning_rate=learning_rate, warmup_steps=200, weight_decay=0.1, grad_clip_norm=1.0,
                 log_every_steps=50, checkpoint_every_steps=1000))


PRESETS = {
    "attention": dict(data=dict(seq_len=256), model=TINY_ATTENTION, train=TINY_TRAIN),
    "base_conv": dict(data=dict(seq_len=256), model=TINY_BASE_CONV, train=TINY_TRAIN),
    "attention_cpu": dict(data=CPU_DATA, model=CPU_ATTENTION, train=CPU_TRAIN),
    "base_conv_cpu": dict(data=CPU_DATA, model=CPU_BASE_CONV, train=CPU_TRAIN),
    "attention_125m": _big(768, 12, dict(name="attention", num_heads=12, rotary=True), 6e-4),
    "base_conv_125m": _big(768, 12, base_conv_mixer(12), 6e-4),
    "attention_360m": dict(_big(1024, 24, dict(name="attention", num_heads=16, rotary=True), 3e-4),
                           mesh=FSDP_360M),
    "base_conv_360m": dict(_big(1024, 24, base_conv_mixer(24), 3e-4), mesh=FSDP_360M),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name = arg or "attention"
  if name not in PRESETS:
    raise ValueError(f"unknown LM preset {name!r}; accepted: {sorted(PRESETS)}")
  c = lm.defaults()
  for section, values in PRESETS[name].items():
    values = dict(values)
    if "mixer" in values:  # a mixer is replaced whole (ConfigDict.update would merge its hyperparameters)
      c[section].mixer = values.pop("mixer")
    c[section].update(values)
  return c
