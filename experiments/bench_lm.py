r"""Training throughput and model FLOPs utilisation (MFU) of an LM preset (benchmark, not a test).

  python experiments/bench_lm.py                                   # attention_125m, L=128, batch 4, CPU
  python experiments/bench_lm.py --config=experiments/configs/lm.py:attention_125m --seq_len=1024 \
      --batch_size=32 --dtype=bfloat16 --peak_tflops=989                        # H100

Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): 6·N + 12·n_layers·d·L for attention
(N = parameters, the tied embedding counted once, since the head's matmul is real work; the second term is
the attention scores and their weighted sum, forward and backward), 6·N for the other mixers (their
convolution FLOPs are not counted). MFU = achieved model FLOP/s / peak FLOP/s. The peak is either given
(`--peak_tflops`, e.g. 989 for an H100 SXM's dense bf16) or measured here as the best of a few large float32
matmuls on the same backend (`--peak_tflops=0`, the default): on a CPU that is what XLA can reach, not the
vendor's figure. Synthetic tokens; the step is zoo_jax.lm's (the training core's step,
`zoo_jax.trainer.make_train_step`, for a population of one with the LM task: every position predicted); the first
(compiling) step is excluded.
"""

import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np

from zoo_jax import lm
from zoo_jax import sharding
from zoo_jax import tasks
from zoo_jax import trainer

if __name__ == "__main__":  # flags of the command line only: accelerator_check.py imports the functions
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "lm.py:attention_125m"),
      "An LM config (a preset of experiments/configs/lm.py).")
  _SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length.")
  _BATCH = flags.DEFINE_integer("batch_size", 4, "Global batch size.")
  _STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after one compiling step).")
  _DTYPE = flags.DEFINE_string("dtype", "float32",
                               "Compute dtype (float32 on CPU: bfloat16 matmuls are slower there).")
  _PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s to divide by; 0 = measure a float32 matmul peak.")


def measured_matmul_tflops(n: int = 2048, reps: int = 3) -> float:
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e12


def model_flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int, attention: bool) -> float:
  return 6 * n_params + (12 * n_layers * d_model * seq_len if attention else 0)


def build(cfg, seq_len: int, batch_size: int, dtype: str):
  """(model_cfg, state, Shardings, step) of the LM config `cfg` (a copy is changed) at seq_len, batch_size
  and dtype: zoo_jax.lm's step (the training core's, for a population of one) on synthetic batches."""
  cfg = cfg.copy_and_resolve_references()
  cfg.data.seq_len = seq_len
  cfg.model.dtype = dtype
  cfg.train.batch_size = batch_size
  cfg, model_cfg, _ = lm.resolve(cfg)
  mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model, fsdp=cfg.mesh.fsdp)
  task = object.__new__(tasks.LMTask)  # its loss needs no data: the batches are synthetic
  _, state, sh, step_fn = trainer.single_step(task, model_cfg, cfg.train, mesh, cfg.seed, cfg.train.steps)
  return model_cfg, state, sh, step_fn


def synthetic_batches(sh, n: int, batch_size: int, seq_len: int) -> list:
  rng = np.random.default_rng(0)
  return [sharding.put({"tokens": rng.integers(0, 50257, (1, batch_size, seq_len)).astype(np.int32)}, sh.batch)
          for _ in range(n)]


def time_steps(step_fn, state, batches) -> tuple[dict, float, dict]:
  """(state after the steps, seconds for the steps of batches[1:] after one untimed (compiling) step of
  batches[0], the last step's metrics). `state` is donated."""
  state, m = step_fn(state, batches[0])
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for batch in batches[1:]:
    state, m = step_fn(state, batch)
  jax.block_until_ready(m)
  return state, time.perf_counter() - t0, m


def throughput(model_cfg, state, steps: int, batch_size: int, seq_len: int, elapsed: float) -> dict:
  """{n_params, ms_per_step, tokens_per_s, gflop_per_token, achieved_tflops} of `steps` steps in `elapsed` s."""
  n_params = trainer.count_params(jax.tree.map(lambda x: x[0], state["params"]))
  tokens_per_sec = steps * batch_size * seq_len / elapsed
  flops_token = model_flops_per_token(n_params, model_cfg.n_layers, model_cfg.d_model, seq_len,
                                      model_cfg.mixer["name"] == "attention")
  return dict(n_params=n_params, ms_per_step=1000 * elapsed / steps, tokens_per_s=tokens_per_sec,
              gflop_per_token=flops_token / 1e9, achieved_tflops=tokens_per_sec * flops_token / 1e12)


def main(argv):
  del argv
  model_cfg, state, sh, step_fn = build(_CONFIG.value, _SEQ_LEN.value, _BATCH.value, _DTYPE.value)
  batches = synthetic_batches(sh, _STEPS.value + 1, _BATCH.value, _SEQ_LEN.value)
  state, elapsed, m = time_steps(step_fn, state, batches)
  r = throughput(model_cfg, state, _STEPS.value, _BATCH.value, _SEQ_LEN.value, elapsed)
  n_params, tokens_per_sec, achieved = r["n_params"], r["tokens_per_s"], r["achieved_tflops"]
  peak, peak_note = _PEAK.value, "given"
  if peak <= 0:
    peak, peak_note = measured_matmul_tflops(), "measured: best 2048² float32 matmul"
  print(f"{model_cfg.mixer['name']} {model_cfg.n_layers}×{model_cfg.d_model}: {n_params:,} parameters, "
        f"L={_SEQ_LEN.value}, batch {_BATCH.value}, {_DTYPE.value}, "
        f"{jax.device_count()}× {jax.devices()[0].device_kind} ({jax.default_backend()})")
  print(f"  {r['ms_per_step']:,.0f} ms/step, {tokens_per_sec:,.0f} tokens/s, "
        f"{r['gflop_per_token']:.3f} GFLOP/token -> {achieved * 1e3:,.1f} GFLOP/s; peak {peak * 1e3:,.1f} GFLOP/s "
        f"({peak_note}); MFU {100 * achieved / peak:.1f}%  (loss {float(m['loss'][0]):.3f})")


if __name__ == "__main__":
  app.run(main)
