r"""Generation throughput against context length, beside recall: the paper's trade-off, measured.

  python experiments/bench_generation.py                                    # CPU: contexts 1K-16K
  python experiments/bench_generation.py --contexts=256,1024 --batch_sizes=1 --runs=attention,based
  python experiments/bench_generation.py --mqar_workdir=/tmp/zoo_jax_mqar   # recall from mqar.py's runs

The models are the MQAR runs of `zoo_jax/configs/mqar.py` (by run name), all at one width (`--d_model`),
2 layers, vocabulary `--vocab_size`; what is measured is `zoo_jax/analysis/generation_speed.py`'s: decode
tokens/s after a prefill of each context length, the state's bytes per sequence, the crossover context
against attention. MQAR accuracy comes from `--mqar_workdir` (each `<run>/summary.json` that
`experiments/mqar.py` wrote: its test accuracy) or `--accuracies=run=acc,...`.

Outputs in `--out`: generation.md (the table, crossovers, machine load), generation.json and generation.png
(decode tokens/s against context; MQAR accuracy against decode tokens/s at the largest context). A
benchmark, not a test: every ratio comes from one run on one (shared) machine; the load is printed.
"""

import json
import os
import time

from absl import app
from absl import flags
import jax

from zoo_jax.analysis import generation_speed
from zoo_jax.configs import mqar

_RUNS = flags.DEFINE_list("runs", "attention,sliding_window,base_conv,hyena,h3,rwkv,based,mamba,gla,delta_net",
                          "MQAR run names (zoo_jax/configs/mqar.py RUNS); attention is always added.")
_CONTEXTS = flags.DEFINE_list("contexts", "1024,2048,4096,8192,16384", "Context lengths.")
_BATCHES = flags.DEFINE_list("batch_sizes", "1,8", "Decode batch sizes.")
_D_MODEL = flags.DEFINE_integer("d_model", 64, "Width of every model.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary (Figure 2's).")
_DECODE = flags.DEFINE_integer("decode_tokens", 32, "Tokens decoded per timed call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (the best is kept), after one compiling call.")
_MQAR_WORKDIR = flags.DEFINE_string("mqar_workdir", None, "A workdir of experiments/mqar.py: test accuracy per run.")
_ACCURACIES = flags.DEFINE_list("accuracies", [], "run=accuracy pairs (override --mqar_workdir's).")
_OUT = flags.DEFINE_string("out", "/tmp/zoo_jax_bench_generation", "Output directory.")


def accuracies() -> dict[str, float]:
  found = {}
  if _MQAR_WORKDIR.value:
    for run in sorted(os.listdir(_MQAR_WORKDIR.value)):
      path = os.path.join(_MQAR_WORKDIR.value, run, "summary.json")
      if os.path.isfile(path):
        with open(path) as f:
          found[run] = float(json.load(f)["test_accuracy"])
  for item in _ACCURACIES.value:
    run, _, value = item.partition("=")
    found[run] = float(value)
  return found


def main(argv):
  del argv
  runs = list(dict.fromkeys(["attention", *_RUNS.value]))  # attention: the crossover's reference
  unknown = [r for r in runs if r not in mqar.RUNS]
  if unknown:
    raise app.UsageError(f"--runs: unknown {unknown}; accepted: {sorted(mqar.RUNS)}")
  contexts, batches = [int(c) for c in _CONTEXTS.value], [int(b) for b in _BATCHES.value]
  recall = accuracies()
  load_start, start = os.getloadavg(), time.perf_counter()
  rows = []
  for run in runs:
    rows += generation_speed.decode_throughput(
        run, mqar.RUNS[run]["model"], contexts=contexts, batch_sizes=batches, d_model=_D_MODEL.value,
        vocab_size=_VOCAB.value, decode_tokens=_DECODE.value, repeats=_REPEATS.value)
    speeds = ", ".join(f"{r['decode_tokens_per_s']:,.0f}" for r in rows if r["run"] == run and r["batch"] == batches[-1])
    print(f"{run:>16}: decode tok/s at batch {batches[-1]} over contexts {contexts}: {speeds} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
  load = [round(x, 2) for x in load_start], [round(x, 2) for x in os.getloadavg()]
  header = (f"bench_generation: width {_D_MODEL.value}, 2 layers, vocabulary {_VOCAB.value}, {_DECODE.value} "
            f"decoded tokens per call, best of {_REPEATS.value}; {jax.default_backend()}, {os.cpu_count()} CPUs; "
            f"load average {load[0]} at the start, {load[1]} at the end; {time.perf_counter() - start:.0f} s")
  markdown = header + "\n\n" + generation_speed.table(rows, recall)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "generation.md"), "w") as f:
    f.write(markdown + "\n")
  with open(os.path.join(_OUT.value, "generation.json"), "w") as f:
    json.dump(dict(rows=rows, recall=recall, load=load), f, indent=1)
  generation_speed.plot(rows, recall, os.path.join(_OUT.value, "generation.png"))
  print(markdown)
  print(f"written: {_OUT.value}/generation.md, generation.json, generation.png")


if __name__ == "__main__":
  app.run(main)
