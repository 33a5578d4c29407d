r"""The paper's Section-5 table: BaseConv, BaseConv + attention and BaseConv + sparse attention, on MQAR and LM.

  python experiments/sparse_hybrids.py --workdir=/tmp/zoo_jax_sparse                   # 7 variants × 3 tasks
  python experiments/sparse_hybrids.py --workdir=/tmp/zoo_jax_sparse --tasks=mqar256,mqar512 \
      --variants=base_conv,full,programmatic_all,learned_all --config.tasks.mqar512.budget=64
  python experiments/sparse_hybrids.py --config=experiments/configs/sparse_hybrids.py:smoke --workdir=/tmp/s

Trains every (task, variant) of `--tasks` × `--variants` (experiments/configs/sparse_hybrids.py) into
`<workdir>/<task>/<variant>`: MQAR runs with `zoo_jax.train.train_and_evaluate`, the LM with
`zoo_jax.lm.train_lm` (each run's usual files: config.json, metrics.jsonl, checkpoints/, summary.json, and
for the LM ar_eval.npz + bigram_counts.npz). A run whose summary.json exists is finished and never retrained
(a config that differs from the finished run's is reported, the run kept); an unfinished one resumes from its
checkpoint. A run that fails is reported and the others go on (exit status 1 at the end).

Then prints one table and writes it to `<workdir>/table.md` and `<workdir>/table.csv`: a row per variant
(those asked for and any already in the workdir), for each task its metric and the share of the
BaseConv → full-attention gap the variant closes:
  MQAR   test accuracy a (parameters of the best validation epoch); share (a − a_base) / (a_full − a_base)
  LM     validation perplexity overall and on AR hits (zoo_jax.analysis.ar_hits: a bigram seen earlier in
         the row and rare in training; threshold `ar_threshold`, 0 = scaled from the training tokens as
         experiments/ar_gap.py does), with shares on log-perplexity (mean NLL ℓ): (ℓ_base − ℓ) / (ℓ_base − ℓ_full)
A share is "n/a" when a run is missing or the gap is ~0 (below `MIN_ACCURACY_GAP` / `MIN_NLL_GAP`). The last
column is the training `aux_loss` (the sparsity loss of the learned selections) of the last logged window.
`build_table(workdir, tasks, variants)` is a pure function of the run workdirs' files. Then, for the MQAR runs
with a selecting layer, a second table (`<workdir>/selection.md`, `selection_table`): positions selected per
test example and the share of context keys, context values, queries and filler selected.

Seconds per train step on 2 CPU cores (batch 64, d_model 64, 2 layers, budget L/4; load 2-4 from other jobs;
`full` is plain attention, the others gather k = L/4 positions):
                 base_conv  full  random  programmatic  programmatic_all  learned  learned_all
    L = 256        0.20     0.32   0.16      0.14            0.20          0.08      0.14
    L = 512        0.26     0.54   0.19      0.20            0.32          0.20      0.28
750 steps per run: ~15 min for L = 256 and ~25 min for L = 512 (7 variants each, with evaluation and
compiles), less where `full` stops early; the LM runs take ~7-17 minutes each.
"""

import csv
import dataclasses
import io
import json
import math
import os
import sys
import time

from absl import flags
from absl import logging

from zoo_jax import cli
from zoo_jax import config as config_lib
from zoo_jax.configs import sparse_hybrids as CONFIGS

TASKS, VARIANTS = CONFIGS.TASKS, CONFIGS.VARIANTS
MIN_ACCURACY_GAP = 0.01  # a BaseConv → full gap below this (accuracy) has no share
MIN_NLL_GAP = 0.01  # nats
AUX_KEY = "train/aux_loss"

_CONFIG = cli.define_config_flag(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                              "sparse_hybrids.py"), "Sparse-hybrid experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the runs (<task>/<variant>) and the table.",
                               required=True)
_TASKS = flags.DEFINE_list("tasks", ",".join(TASKS), f"Tasks to train, of {', '.join(TASKS)}.")
_VARIANTS = flags.DEFINE_list("variants", ",".join(VARIANTS), f"Variants to train, of {', '.join(VARIANTS)}.")


# ---------------------------------------------------------------------------------------------- Plan


def plan(config, tasks: list[str], variants: list[str]) -> list[tuple[str, str, dict]]:
  """[(task, variant, run config)], every config validated (one-line ValueError) before anything trains."""
  CONFIGS.check_names(tasks, variants)
  from zoo_jax import lm  # pylint: disable=g-import-not-at-top
  runs = []
  for task in tasks:
    for variant in variants:
      run = CONFIGS.run_config(config, task, variant)
      try:
        if CONFIGS.task_kind(task) == "lm":
          lm.resolve(run)
        else:
          config_lib.validate(run)
      except ValueError as e:
        raise ValueError(f"{task}/{variant}: {e}") from None
      runs.append((task, variant, run))
  return runs


def resolved_json(task: str, run: dict) -> str:
  """The run's config.json as its trainer writes it (to compare with a finished run's)."""
  if CONFIGS.task_kind(task) == "lm":
    from zoo_jax import lm  # pylint: disable=g-import-not-at-top
    return lm.resolve(run)[0].to_json(indent=2, sort_keys=True)
  return config_lib.resolve(run)[0].to_json(indent=2, sort_keys=True)


def train_one(task: str, run: dict, run_dir: str) -> None:
  if CONFIGS.task_kind(task) == "lm":
    from zoo_jax import lm  # pylint: disable=g-import-not-at-top
    lm.train_lm(run, run_dir)
  else:
    from zoo_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(run, run_dir)


def finished_config_differs(task: str, run: dict, run_dir: str) -> bool:
  try:
    with open(os.path.join(run_dir, "config.json")) as f:
      return json.load(f) != json.loads(resolved_json(task, run))
  except (OSError, ValueError):
    return False


# ---------------------------------------------------------------------------------------------- Read runs


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def last_aux_loss(run_dir: str) -> float | None:
  """The `train/aux_loss` of the last logged training window in metrics.jsonl, None if never logged."""
  last = None
  try:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:  # a line cut short by a crash
          continue
        if isinstance(record, dict) and isinstance(record.get(AUX_KEY), (int, float)):
          last = float(record[AUX_KEY])
  except OSError:
    return None
  return last


def read_run(task: str, run_dir: str, ar_threshold: int = 0) -> dict | None:
  """The metrics of one finished run (None if it has no summary.json):
  MQAR {accuracy, aux_loss}; LM {nll, ar_hit_nll, ar_hits, evaluated, threshold, aux_loss} (NLL in nats; the
  AR-hit entries None when the evaluation files are missing or there are no AR hits)."""
  summary = _read_json(os.path.join(run_dir, "summary.json"))
  if summary is None:
    return None
  out = dict(aux_loss=last_aux_loss(run_dir))
  if CONFIGS.task_kind(task) == "mqar":
    out["accuracy"] = float(summary["test_accuracy"])
    return out
  out.update(nll=float(summary["validation_loss"]), ar_hit_nll=None, ar_hits=None, evaluated=None, threshold=None)
  eval_path, counts_path = (os.path.join(run_dir, name) for name in ("ar_eval.npz", "bigram_counts.npz"))
  if os.path.isfile(eval_path) and os.path.isfile(counts_path):
    from zoo_jax.analysis import ar_hits  # pylint: disable=g-import-not-at-top
    tokens, logprobs = ar_hits.load_eval(eval_path)
    counts = ar_hits.BigramCounts.load(counts_path)
    report = ar_hits.analyze(tokens, logprobs, counts, ar_threshold or None)
    hits = report.slices["ar_hits"]
    out.update(ar_hit_nll=hits.mean_nll if hits.num_tokens else None, ar_hits=hits.num_tokens,
               evaluated=report.slices["all"].num_tokens, threshold=report.threshold)
  return out


def present(workdir: str, names: tuple[str, ...], under: str = "") -> list[str]:
  return [n for n in names if os.path.isdir(os.path.join(workdir, under, n))]


def collect(workdir: str, tasks: list[str], variants: list[str], ar_threshold: int = 0) -> dict:
  """{task: {variant: read_run(...) or None}} for the given tasks and variants."""
  return {task: {v: read_run(task, os.path.join(workdir, task, v), ar_threshold) for v in variants}
          for task in tasks}


# ---------------------------------------------------------------------------------------------- Table


def gap_share(value: float | None, base: float | None, full: float | None, *, min_gap: float,
              lower_is_better: bool = False) -> float | None:
  """Share of the BaseConv → full gap closed: (m − base) / (full − base), or on NLL (base − m) / (base −
  full); None when any is missing or |full − base| < min_gap."""
  if value is None or base is None or full is None:
    return None
  gap = base - full if lower_is_better else full - base
  if not math.isfinite(gap) or abs(gap) < min_gap:
    return None
  return ((base - value) if lower_is_better else (value - base)) / gap


@dataclasses.dataclass(frozen=True)
class Column:
  task: str
  key: str  # the metric in read_run's dict
  title: str  # markdown header
  csv_name: str
  lower_is_better: bool


def columns(tasks: list[str]) -> list[Column]:
  out = []
  for task in tasks:
    if CONFIGS.task_kind(task) == "mqar":
      length = task.removeprefix("mqar")
      out.append(Column(task, "accuracy", f"MQAR L={length} acc", f"{task}_accuracy", False))
    else:
      out.append(Column(task, "nll", "LM ppl", f"{task}_nll", True))
      out.append(Column(task, "ar_hit_nll", "LM AR-hit ppl", f"{task}_ar_hit_nll", True))
  return out


def table_rows(results: dict, tasks: list[str], variants: list[str]) -> list[dict]:
  """Per variant: {'variant', and per column csv_name: value, csv_name + '_gap_closed': share, and
  'aux_loss_<task>'} (None where missing). Pure arithmetic over `collect`'s output."""
  rows = []
  for variant in variants:
    row = {"variant": variant}
    for col in columns(tasks):
      runs = results.get(col.task, {})
      value, base, full = ((runs.get(v) or {}).get(col.key) for v in (variant, "base_conv", "full"))
      row[col.csv_name] = value
      row[col.csv_name + "_gap_closed"] = gap_share(
          value, base, full, min_gap=MIN_NLL_GAP if col.lower_is_better else MIN_ACCURACY_GAP,
          lower_is_better=col.lower_is_better)
    for task in tasks:
      row[f"aux_loss_{task}"] = (results.get(task, {}).get(variant) or {}).get("aux_loss")
    rows.append(row)
  return rows


def _share(share: float | None) -> str:
  return "n/a" if share is None else f"{100 * share:.1f}%"


def _value(col: Column, value: float | None) -> str:
  if value is None:
    return "n/a"
  if col.lower_is_better:  # NLL → perplexity
    return "inf" if value >= 700 else f"{math.exp(value):.2f}"
  return f"{value:.3f}"


def format_markdown(rows: list[dict], tasks: list[str]) -> str:
  cols = columns(tasks)
  header = ["variant"]
  for col in cols:
    header += [col.title, "gap closed"]
  header.append(f"aux_loss ({' / '.join(tasks)})")
  lines = [header, ["---"] * len(header)]
  for row in rows:
    cells = [row["variant"]]
    for col in cols:
      cells += [_value(col, row[col.csv_name]), _share(row[col.csv_name + "_gap_closed"])]
    aux = [row[f"aux_loss_{t}"] for t in tasks]
    cells.append("–" if all(a is None for a in aux) else
                 " / ".join("n/a" if a is None else f"{a:.4f}" for a in aux))
    lines.append(cells)
  return "\n".join("| " + " | ".join(r) + " |" for r in lines)


def format_csv(rows: list[dict]) -> str:
  """The rows as CSV: raw values (NLL in nats, shares as fractions); an empty cell where missing."""
  out = io.StringIO()
  if rows:
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
  return out.getvalue()


def notes(results: dict) -> list[str]:
  lines = []
  for task, runs in results.items():
    for variant, r in runs.items():
      if r and r.get("threshold") is not None:
        lines.append(f"{task}: AR hits (bigram seen earlier in the row, seen fewer than {r['threshold']:,} times "
                     f"in training) are {r['ar_hits']:,} of {r['evaluated']:,} evaluated tokens")
        break
  return lines


def build_table(workdir: str, tasks: list[str] | None = None, variants: list[str] | None = None,
                ar_threshold: int = 0) -> tuple[str, str, list[dict]]:
  """(markdown, csv, rows) from the run workdirs under `workdir`: the given tasks / variants plus any
  found there, in the canonical order (TASKS, VARIANTS). Reads files only."""
  tasks = [t for t in TASKS if t in (tasks or []) or t in present(workdir, TASKS)]
  found = {v for t in tasks for v in present(workdir, VARIANTS, t)}
  variants = [v for v in VARIANTS if v in (variants or []) or v in found]
  results = collect(workdir, tasks, variants, ar_threshold)
  rows = table_rows(results, tasks, variants)
  markdown = format_markdown(rows, tasks)
  extra = notes(results)
  if extra:
    markdown += "\n\n" + "\n".join(extra)
  return markdown, format_csv(rows), rows


def selection_table(workdir: str, tasks: list[str], variants: list[str]) -> str:
  """Markdown: for every finished MQAR run with a selecting layer (random / programmatic / learned), the
  positions it selects per test example and the share of context keys, values, queries and filler
  selected (zoo_jax.analysis.selection, first 500 test examples, best-validation parameters). '' if none."""
  from zoo_jax import notebook_utils  # pylint: disable=g-import-not-at-top
  from zoo_jax.analysis import selection  # pylint: disable=g-import-not-at-top
  from zoo_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  lines = []
  for task in tasks:
    if CONFIGS.task_kind(task) != "mqar":
      continue
    for variant in variants:
      run_dir = os.path.join(workdir, task, variant)
      if variant in ("base_conv", "full") or not os.path.exists(os.path.join(run_dir, "summary.json")):
        continue
      model, cfg = notebook_utils.load_mqar_model(run_dir)
      ds = tasks_lib.build_split(cfg, "test")
      for layer, st in selection.mqar_selection(model, ds).items():
        lines.append(f"| {task} | {variant} | {layer} | {st['selected']:.1f} | {st['keys']:.3f} | "
                     f"{st['values']:.3f} | {st['queries']:.3f} | {st['filler']:.4f} |")
  if not lines:
    return ""
  return "\n".join(["| task | variant | layer | selected / example | context keys | context values | queries | "
                    "filler |", "|---|---|---|---|---|---|---|---|", *lines])


# ---------------------------------------------------------------------------------------------- Main


def run(config, workdir: str, tasks: list[str], variants: list[str]) -> int:
  """Trains what is missing, writes and prints the table; returns the number of failed runs."""
  try:
    runs = plan(config, tasks, variants)
  except ValueError as e:  # one line naming the task / variant / key, before anything is trained or written
    sys.exit(f"error: {e}")
  failed = []
  start = time.time()
  for i, (task, variant, cfg) in enumerate(runs, 1):
    run_dir = os.path.join(workdir, task, variant)
    head = f"[{i}/{len(runs)}] {task}/{variant}"
    if os.path.exists(os.path.join(run_dir, "summary.json")):
      differs = finished_config_differs(task, cfg, run_dir)
      print(f"{head}: finished, skipped" + (" (its config.json differs from the current config; kept as it is — "
                                             "use a new --workdir to retrain)" if differs else ""), flush=True)
      continue
    print(f"\n=== {head} ({time.time() - start:.0f} s so far) ===", flush=True)
    t0 = time.time()
    try:
      train_one(task, cfg, run_dir)
    except Exception as e:  # pylint: disable=broad-except
      failed.append(f"{task}/{variant}")
      print(f"{head} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
      continue
    print(f"{head}: done in {time.time() - t0:.0f} s", flush=True)
  markdown, csv_text, _ = build_table(workdir, tasks, variants, config.ar_threshold)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(markdown + "\n")
  with open(os.path.join(workdir, "table.csv"), "w") as f:
    f.write(csv_text)
  print("\nBaseConv → attention gap closed by sparse-attention hybrids (MQAR: test accuracy; LM: validation "
        f"perplexity; shares on accuracy / log-perplexity):\n{markdown}\n\ntable: {os.path.join(workdir, 'table.md')}"
        f", {os.path.join(workdir, 'table.csv')}", flush=True)
  selected = selection_table(workdir, tasks, variants)
  if selected:
    with open(os.path.join(workdir, "selection.md"), "w") as f:
      f.write(selected + "\n")
    print(f"\nPositions the sparse layers select on MQAR test examples (share of each role selected):\n{selected}"
          f"\n\ntable: {os.path.join(workdir, 'selection.md')}", flush=True)
  if failed:
    print(f"failed runs: {', '.join(failed)}", flush=True)
  return len(failed)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every checkpoint step at INFO
    logging.set_verbosity(logging.WARNING)
  if run(_CONFIG.value, _WORKDIR.value, _TASKS.value, _VARIANTS.value):
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
