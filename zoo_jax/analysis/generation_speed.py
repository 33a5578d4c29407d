"""Generation throughput against context length, and the recall / throughput trade-off figure.

    rows = decode_throughput("attention", model_section, contexts=[1024, 4096], batch_sizes=[1, 8])
    markdown = table(rows, recall={"attention": 0.99}); plot(rows, recall, "generation.png")

For a model (a run config's `model` section) with a state capacity of c + `decode_tokens` positions and
each context length c: a prefill of c random tokens (one call of the parallel forms, batch 1; the state is
then tiled to b rows), then `decode_tokens` tokens decoded greedily by a jitted `lax.scan` of
`LanguageModel.step` from that state — `zoo_jax.generate`'s decode loop. Per (model, c, b): decode tokens/s
(b × tokens / seconds, the best of `repeats` calls after one compiling call), the recurrent state's bytes
per sequence (the float leaves of the state at batch 1: attention's KV cache and a long convolution's input
history grow with c, a recurrence's state does not) and the decode program's compiled temporaries per
sequence (XLA's memory analysis). `experiments/bench_generation.py` is the command line; the quickstart
notebook calls these at a small size.

The crossover context of a model: the smallest context (log-interpolated between measured ones) at which
attention decodes slower than it; None when attention stays faster over the range measured.
"""

from __future__ import annotations

import math
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from zoo_jax import config as config_lib
from zoo_jax import generate
from zoo_jax import model as model_lib


def build_model(model_section: dict, *, d_model: int, vocab_size: int, capacity: int) -> model_lib.LanguageModel:
  """A LanguageModel of the run's `model` section (merged into the defaults) at width `d_model` with
  `capacity` positions of state (its seq_len)."""
  section = config_lib.deep_merge(config_lib.as_dict(config_lib.defaults().model), model_section)
  section["d_model"] = d_model
  cfg = model_lib.ModelConfig.from_config(section, vocab_size=vocab_size, seq_len=capacity)
  return model_lib.LanguageModel(cfg, rngs=nnx.Rngs(0))


def state_bytes(state: Any) -> int:
  """Bytes of the floating-point leaves of a state pytree (counters left out, as `state_size` does)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))


def decode_throughput(name: str, model_section: dict, *, contexts: list[int], batch_sizes: list[int],
                      d_model: int = 64, vocab_size: int = 8192, decode_tokens: int = 32,
                      repeats: int = 3) -> list[dict]:
  """One row per (context, batch size): the module docstring's measurements for the model `name`."""
  rows = []
  for context in contexts:
    model = build_model(model_section, d_model=d_model, vocab_size=vocab_size, capacity=context + decode_tokens)
    graphdef, params = nnx.split(model)
    prompt_1l = jnp.asarray(np.random.default_rng(0).integers(1, vocab_size, (1, context)), jnp.int32)

    @jax.jit
    def prefill(params, prompt_bl):
      logits_blv, state = nnx.merge(graphdef, params)(prompt_bl, return_state=True)
      return state, jnp.argmax(logits_blv[:, -1], axis=-1).astype(jnp.int32)

    @jax.jit
    def decode(params, state, token_b):  # generate's greedy decode loop
      return generate.decode(nnx.merge(graphdef, params), state, token_b, decode_tokens)

    start = time.perf_counter()
    state_1, token_1 = jax.block_until_ready(prefill(params, prompt_1l))
    prefill_seconds = time.perf_counter() - start  # with its compilation: an upper bound
    per_sequence = state_bytes(state_1)
    for b in batch_sizes:
      state = jax.tree.map(lambda x, b=b: jnp.repeat(x, b, axis=0), state_1)
      token_b = jnp.repeat(token_1, b)
      compiled = decode.lower(params, state, token_b).compile()
      memory = compiled.memory_analysis()
      temp = getattr(memory, "temp_size_in_bytes", 0) if memory is not None else 0
      jax.block_until_ready(compiled(params, state, token_b))
      best = math.inf
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, state, token_b))
        best = min(best, time.perf_counter() - start)
      rows.append(dict(run=name, context=context, batch=b, decode_tokens_per_s=b * decode_tokens / best,
                       ms_per_step=1e3 * best / decode_tokens, state_bytes_per_seq=per_sequence,
                       decode_temp_bytes_per_seq=temp / b, prefill_seconds_with_compile=prefill_seconds))
  return rows


def crossover(rows: list[dict], name: str, batch: int) -> float | None:
  """The smallest context (log-interpolated) at which attention decodes slower than `name`, or None."""
  speed = {(r["run"], r["context"]): r["decode_tokens_per_s"] for r in rows if r["batch"] == batch}
  contexts = sorted(c for (run, c) in speed if run == name and ("attention", c) in speed)
  log_ratio = [math.log(speed[("attention", c)] / speed[(name, c)]) for c in contexts]  # > 0: attention faster
  for i, (c, r) in enumerate(zip(contexts, log_ratio)):
    if r <= 0:
      if i == 0:
        return float(c)
      c0, r0 = contexts[i - 1], log_ratio[i - 1]
      return float(math.exp(math.log(c0) + (math.log(c) - math.log(c0)) * r0 / (r0 - r)))
  return None


def table(rows: list[dict], recall: dict[str, float] | None = None) -> str:
  """Markdown: per batch size, decode tokens/s (state KiB per sequence) per model and context, the model's
  MQAR accuracy when given, and its crossover context against attention."""
  recall = recall or {}
  runs = list(dict.fromkeys(r["run"] for r in rows))
  contexts = sorted({r["context"] for r in rows})
  lines = []
  for b in sorted({r["batch"] for r in rows}):
    lines += [f"decode tokens/s at batch {b} (state KiB per sequence)", "",
              "| model | " + " | ".join(f"c = {c:,}" for c in contexts) + " | MQAR accuracy | crossover c |",
              "| --- |" + " --- |" * (len(contexts) + 2)]
    by_key = {(r["run"], r["context"]): r for r in rows if r["batch"] == b}
    for run in runs:
      cells = [f"{by_key[run, c]['decode_tokens_per_s']:,.0f} ({by_key[run, c]['state_bytes_per_seq'] / 1024:,.0f})"
               if (run, c) in by_key else "–" for c in contexts]
      cross = crossover(rows, run, b) if run != "attention" and any(r == "attention" for r in runs) else None
      below = cross is not None and cross <= min(c for (name, c) in by_key if name == run)  # already at the first
      cross_text = ("—" if run == "attention" else "none in range" if cross is None
                    else f"≤ {cross:,.0f}" if below else f"{cross:,.0f}")
      accuracy = f"{recall[run]:.3f}" if run in recall else "–"
      lines.append(f"| {run} | " + " | ".join(cells) + f" | {accuracy} | {cross_text} |")
    lines.append("")
  return "\n".join(lines)


def plot(rows: list[dict], recall: dict[str, float] | None = None, path: str | None = None):
  """Decode tokens/s against context (left) and MQAR accuracy against decode tokens/s at the largest context
  (right, models with an accuracy), at the largest batch; saved to `path` when given. Returns the figure."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  recall = recall or {}
  b = max(r["batch"] for r in rows)
  c_max = max(r["context"] for r in rows)
  runs = list(dict.fromkeys(r["run"] for r in rows))
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, run in enumerate(runs):
    points = sorted((r["context"], r["decode_tokens_per_s"]) for r in rows if r["run"] == run and r["batch"] == b)
    left.plot(*zip(*points), marker="o", label=run, color=f"C{i}", linewidth=2.5 if run == "attention" else 1.2)
  left.set(xscale="log", yscale="log", xlabel="context length", ylabel=f"decode tokens/s (batch {b})",
           title="generation throughput against context")
  left.legend(fontsize=7)
  shown = 0
  for i, run in enumerate(runs):
    r = next((r for r in rows if (r["run"], r["context"], r["batch"]) == (run, c_max, b)), None)
    if r is not None and run in recall:
      right.scatter(r["decode_tokens_per_s"], recall[run], color=f"C{i}")
      right.annotate(f"{run} ({r['state_bytes_per_seq'] / 1024:,.0f} KiB state)", (r["decode_tokens_per_s"], recall[run]),
                     xytext=(4, -12 * (shown % 3)), textcoords="offset points", fontsize=7)  # staggered
      shown += 1
  right.set(xscale="log", xlabel=f"decode tokens/s at context {c_max:,} (batch {b})", ylabel="MQAR accuracy",
            title="recall against generation throughput")
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=120)
  return fig
