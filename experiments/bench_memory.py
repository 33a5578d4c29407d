r"""Memory and FLOPs of one LM training step, today's path beside the memory options (benchmark, not a test).

  python experiments/bench_memory.py                                  # every LM preset, L=1,024, bfloat16
  python experiments/bench_memory.py --presets=attention_125m --batch_size=8 --seq_len=1024

Nothing is allocated: each step is compiled on the CPU from abstract arguments (jax.ShapeDtypeStruct) and
read from XLA's `memory_analysis()` (temporaries) and `cost_analysis()` (FLOPs). The step is the trainer's
own (`zoo_jax.trainer.make_train_step` over `tasks.LMTask`'s loss for a population of one, its state from
`trainer.init_state` traced abstractly), so what is measured is what `experiments/lm.py` runs: the paper
presets' optimizer (AdamW, gradient clipping, injected learning rate), float32 parameters, best parameters
and optimizer state, compute in `--dtype`.

Two paths per preset, compiled in the same run:
  today   model.remat='none', scan_layers=False, loss_chunk=0 (the (b, l, vocab) float32 logits, every
          activation kept for the backward, a Python loop over layers)
  new     the memory options of the paper-size presets (`zoo_jax.configs.lm.MEMORY`)
Columns: temporaries per example (XLA's temp bytes / batch: an upper bound, it includes batch-independent
buffers such as the float32 gradients and bf16 copies of the weights), state: XLA's argument bytes
(float32 parameters, the trainer's best parameters, AdamW's two moments: 4 copies; and the tokens), FLOPs
per step (XLA's count of the step without loops, see `measure`, so remat's recompute shows), and for the
paper's global batch of 256 on 8 devices with FSDP over the 8 (parameters, gradients and optimizer state
sharded / 8): the GiB one device needs at 256 / 8 = 32 examples (and at 16, two micro-batches) against
80 GB. Attention's today and new rows use `jax.nn.dot_product_attention`'s XLA path (L × L float32 scores
per head); where the attention mixer has a blockwise implementation (`zoo_jax.ops.attention`,
FlashAttention-2 in plain JAX), a third row 'new+bw' is the new path with it; its FLOPs are undercounted
(the blockwise op's own fori_loop body is counted once).

`--fsdp=N` (N > 1) compiles the presets' `new` step itself sharded as `experiments/lm.py` shards it (the
trainer's step and shardings), on a
(data 1, fsdp N) mesh of N devices (N simulated CPU devices: the flag sets
XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported) with `sharding.LOGICAL_RULES`
(parameters' embed axis and the optimizer state split over fsdp, the batch over fsdp), at the paper's
global batch of 256 (`--batch_size` is ignored), and prints XLA's per-device bytes: arguments (parameters,
best parameters, AdamW state, tokens; unsharded: the 4 float32 copies), temporaries, and their sum against
80 GB:

  python experiments/bench_memory.py --fsdp=8 --presets=attention_360m,base_conv_360m
"""

import dataclasses
import os
import sys
import time
from typing import Any

if __name__ == "__main__":  # simulated CPU devices for --fsdp=N: must be set before jax is imported
  _fsdp_arg = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--fsdp=")), "1")
  if _fsdp_arg.isdigit() and int(_fsdp_arg) > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={int(_fsdp_arg)}").strip()

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from zoo_jax import sharding, tasks, trainer
from zoo_jax.configs import lm as lm_configs
from zoo_jax.model import LanguageModel, ModelConfig

if __name__ == "__main__":  # flags only as a binary: tests load this file as a module beside others
  _PRESETS = flags.DEFINE_list("presets", list(lm_configs.PRESETS), "LM presets of zoo_jax/configs/lm.py.")
  _SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Sequence length.")
  _BATCH = flags.DEFINE_integer("batch_size", 8, "Examples per compiled step.")
  _DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
  _FSDP = flags.DEFINE_integer("fsdp", 1, "N > 1: the `new` step compiled sharded over a (data 1, fsdp N) mesh "
                               "at global batch 256; per-device bytes.", lower_bound=1)

TODAY = dict(remat="none", scan_layers=False, loss_chunk=0)
TRAIN = lm_configs.get_config("attention_125m").train  # the paper presets' optimizer (AdamW, clip 1.0, cosine)
GiB = 2**30
DEVICES, DEVICE_BYTES, PAPER_BATCH = 8, 80e9, 256


def paths(preset: str) -> dict[str, dict]:
  """today, new, and for attention new + blockwise: model options each. Attention's implementation is
  pinned ('xla': today's l × l scores) in today and new."""
  if lm_configs.PRESETS[preset]["model"]["mixer"]["name"] != "attention":
    return dict(today=TODAY, new=lm_configs.MEMORY)
  xla, blockwise = dict(implementation="xla"), dict(implementation="blockwise")
  return dict(today=dict(TODAY, mixer=xla), new=dict(lm_configs.MEMORY, mixer=xla),
              **{"new+bw": dict(lm_configs.MEMORY, mixer=blockwise)})


def model_config(preset: str, options: dict, seq_len: int, dtype: str) -> ModelConfig:
  model = lm_configs.get_config(preset).model.to_dict()
  options = dict(options)
  model["mixer"] = dict(model["mixer"], **options.pop("mixer", {}))
  model.update(options, dtype=dtype)
  return ModelConfig.from_config(model, vocab_size=50_304, seq_len=seq_len)


def compiled_step(cfg: ModelConfig, batch: int, mesh: jax.sharding.Mesh | None = None, train_cfg: Any = None):
  """`lowered_step` compiled, and the parameter count."""
  lowered, n_params = lowered_step(cfg, batch, mesh, train_cfg)
  return lowered.compile(), n_params


def lowered_step(cfg: ModelConfig, batch: int, mesh: jax.sharding.Mesh | None = None, train_cfg: Any = None):
  """The trainer's own train step for `cfg` (`trainer.make_train_step` over `tasks.LMTask`'s loss, a
  population of one), lowered on abstract arguments, and the parameter count. The state is
  `trainer.init_state`'s, traced abstractly (`jax.eval_shape`: nothing allocated) with its shardings: on
  `mesh` (default: a one-device mesh) parameters by their logical axes (`sharding.LOGICAL_RULES`), AdamW state
  like its parameters, the batch over data × fsdp. `train_cfg`: the optimizer settings (default the paper
  presets', `TRAIN`)."""
  mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1]) if mesh is None else mesh
  train_cfg = TRAIN if train_cfg is None else train_cfg
  member = trainer.Member("bench", 0, train_cfg.learning_rate, train_cfg.weight_decay)
  built = {}

  def init():
    built["graphdef"], state, built["sh"], built["tx"], built["unit"] = trainer.init_state(
        cfg, train_cfg, [member], train_cfg.steps, mesh)
    return state

  state = jax.eval_shape(init)
  task = object.__new__(tasks.LMTask)  # the step uses only its loss and step metrics: no data source is built
  step = trainer.make_train_step(task, built["graphdef"], built["tx"], built["unit"], built["sh"])
  batch_p = dict(tokens=jax.ShapeDtypeStruct((1, batch, cfg.seq_len), jnp.int32))
  return step.lower(state, jax.ShapeDtypeStruct((1,), jnp.bool_), batch_p), trainer.count_params(state["params"])


def flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def measure(cfg: ModelConfig, batch: int) -> dict:
  """Temporaries of `cfg`'s step; FLOPs of the same step without loops (XLA counts a while loop's body
  once): the blocks unscanned and the loss in one chunk of the whole row, the same remat (the same
  arithmetic: a scan or chunks reorder it, and only the padding of l - 1 to the chunk size adds any)."""
  t0 = time.perf_counter()
  compiled, n_params = compiled_step(cfg, batch)
  memory = compiled.memory_analysis()
  r = dict(temp=memory.temp_size_in_bytes / batch, state=memory.argument_size_in_bytes, params=n_params)
  unlooped = dataclasses.replace(cfg, scan_layers=False, loss_chunk=cfg.seq_len if cfg.loss_chunk else 0)
  r["flops"] = flops(compiled if unlooped == cfg else compiled_step(unlooped, batch)[0])
  return dict(r, compile_s=time.perf_counter() - t0)


def per_device(r: dict, examples: int) -> float:
  return r["state"] / DEVICES + examples * r["temp"]


def fits(need: float) -> str:
  return "yes" if need <= DEVICE_BYTES else "no"


def main_fsdp(n: int) -> None:
  """Each preset's `new` step sharded over (data 1, fsdp n) at global batch 256: XLA's bytes per device."""
  if jax.device_count() < n:
    raise app.UsageError(f"--fsdp={n} needs {n} devices, found {jax.device_count()}")
  mesh = sharding.make_mesh(data=1, fsdp=n, devices=jax.devices()[:n])
  print(f"one train step, L={_SEQ_LEN.value}, {_DTYPE.value} compute, float32 parameters + AdamW, global batch "
        f"{PAPER_BATCH} ({PAPER_BATCH // n} per device), compiled on {n} {jax.devices()[0].platform} devices, "
        f"mesh {dict(mesh.shape)}, memory options {lm_configs.MEMORY}")
  print(f"load average at start: {os.getloadavg()[0]:.1f}")
  print(f"{'preset':<16}{'params':>8}{'args GiB/dev':>13}{'temp GiB/dev':>13}{'total GiB/dev':>14}"
        f"{'unsharded args GiB':>19}{'fits 80 GB':>11}{'compile s':>10}")
  for preset in _PRESETS.value:
    cfg = model_config(preset, paths(preset)["new"], _SEQ_LEN.value, _DTYPE.value)
    t0 = time.perf_counter()
    compiled, n_params = compiled_step(cfg, PAPER_BATCH, mesh)
    m = compiled.memory_analysis()
    args, temp = m.argument_size_in_bytes, m.temp_size_in_bytes
    print(f"{preset:<16}{n_params / 1e6:>7.0f}M{args / GiB:>13.2f}{temp / GiB:>13.2f}{(args + temp) / GiB:>14.2f}"
          f"{4 * 4 * n_params / GiB:>19.2f}{fits(args + temp):>11}{time.perf_counter() - t0:>10.0f}", flush=True)
  print(f"load average at end: {os.getloadavg()[0]:.1f}")


def main(argv):
  del argv
  if _FSDP.value > 1:
    main_fsdp(_FSDP.value)
    return
  new = lm_configs.MEMORY
  print(f"one train step, L={_SEQ_LEN.value}, {_DTYPE.value} compute, float32 parameters + AdamW, "
        f"compiled on {jax.devices()[0].platform} for {_BATCH.value} examples; new = {new}")
  print(f"load average at start: {os.getloadavg()[0]:.1f}")
  head = (f"{'preset':<16}{'path':<8}{'params':>8}{'temp GiB/ex':>12}{'ratio':>7}{'state GiB':>10}"
          f"{'TFLOP/step':>11}{'ratio':>7}{'GiB/dev@32':>11}{'fits':>5}{'GiB/dev@16':>11}{'fits':>5}{'compile s':>10}")
  print(head)
  for preset in _PRESETS.value:
    rows = {path: measure(model_config(preset, options, _SEQ_LEN.value, _DTYPE.value), _BATCH.value)
            for path, options in paths(preset).items()}
    for path, r in rows.items():
      at32, at16 = per_device(r, PAPER_BATCH // DEVICES), per_device(r, PAPER_BATCH // DEVICES // 2)
      print(f"{preset:<16}{path:<8}{r['params'] / 1e6:>7.0f}M{r['temp'] / GiB:>12.3f}"
            f"{r['temp'] / rows['today']['temp']:>7.2f}{r['state'] / GiB:>10.2f}{r['flops'] / 1e12:>11.2f}"
            f"{r['flops'] / rows['today']['flops']:>7.2f}{at32 / GiB:>11.1f}{fits(at32):>5}"
            f"{at16 / GiB:>11.1f}{fits(at16):>5}{r['compile_s']:>10.0f}", flush=True)
  print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
