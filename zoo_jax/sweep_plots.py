"""The sweep's figures from its results table: Figure 2 and the accuracy / state-size trade-off.

Both choose each point's learning rate on **validation** accuracy (mean over seeds) and plot **test**
accuracy at that learning rate, with the standard deviation over seeds as error bars when there are
several (`zoo_jax.sweep.best_over_learning_rates`). Zoology's plotting code takes the best test accuracy
over learning rates instead, which selects on the test set. A run trained on a mixture of lengths is a
point in each length's panel, from its per-length test (and validation) slices (`zoo_jax.sweep.per_length`).

    figure2(rows, prefix)         accuracy vs d_model, a panel per sequence length, a line per mixer
    state_tradeoff(rows, prefix)  accuracy vs recurrent state size (log axis), a panel per sequence length

Each writes `<prefix>.png` and `<prefix>.pdf` and returns the points it drew.
"""

import os
from typing import Any

from matplotlib import ticker
from matplotlib.figure import Figure

from zoo_jax import sweep

_MARKERS = "os^Dv<>pP*Xh"


def _panels(points: list[dict[str, Any]]):
  lengths = sorted({(p["seq_len"], p["num_kv_pairs"]) for p in points})
  # A bare Figure (no pyplot): no global backend switch, so notebooks keep their inline plotting.
  fig = Figure(figsize=(3.6 * len(lengths) + 0.6, 3.4))
  axes = fig.subplots(1, len(lengths), squeeze=False, sharey=True)
  return fig, dict(zip(lengths, axes[0]))


def _draw(points: list[dict[str, Any]], prefix: str, x_key: str, x_label: str, log_base: int) -> dict:
  if not points:
    raise ValueError("the results table has no rows to plot")
  fig, panels = _panels(points)
  mixers = sorted({p["mixer"] for p in points})
  drawn = {}
  for (seq_len, kv), ax in panels.items():
    for m, mixer in enumerate(mixers):
      line = sorted((p for p in points if p["mixer"] == mixer and (p["seq_len"], p["num_kv_pairs"]) == (seq_len, kv)),
                    key=lambda p: p[x_key])
      if not line:
        continue
      xs = [p[x_key] for p in line]
      ys = [p["test_accuracy"] for p in line]
      errs = [p["test_std"] for p in line]
      ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker=_MARKERS[m % len(_MARKERS)], capsize=3,
                  label=mixer, linestyle="-" if x_key == "d_model" else ":")
      drawn[(seq_len, kv, mixer)] = list(zip(xs, ys, errs))
    ax.set_xscale("log", base=log_base)
    if x_key == "d_model":
      widths = sorted({p["d_model"] for p in points})
      ax.set_xticks(widths, [str(w) for w in widths])
      ax.minorticks_off()
    else:
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # labels at decades only (no overlaps)
    ax.set_title(f"sequence length {seq_len} ({kv} kv pairs)", fontsize=10)
    ax.set_xlabel(x_label)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  first = next(iter(panels.values()))
  first.set_ylabel("MQAR test accuracy")
  first.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  for ext in ("png", "pdf"):
    fig.savefig(f"{prefix}.{ext}", dpi=150)
  return drawn


def figure2(rows: list[dict[str, Any]], prefix: str) -> dict:
  """Accuracy against model width; returns {(seq_len, kv, mixer): [(d_model, accuracy, std), ...]}."""
  return _draw(sweep.best_over_learning_rates(rows), prefix, "d_model", "model dimension", 2)


def state_tradeoff(rows: list[dict[str, Any]], prefix: str) -> dict:
  """Accuracy against recurrent state size; returns {(seq_len, kv, mixer): [(state, accuracy, std), ...]}."""
  return _draw(sweep.best_over_learning_rates(rows), prefix, "state_size", "recurrent state size (elements)",
               10)


def format_best(rows: list[dict[str, Any]]) -> str:
  """The plotted numbers as a markdown table (one row per mixer × width × test length): test accuracy mean ±
  std over seeds, and the seeds reaching `sweep.PASS_ACCURACY` out of all."""
  lines = ["| mixer | d_model | L | kv | lr (by validation) | valid acc | test acc | ± std | "
           f"seeds ≥ {sweep.PASS_ACCURACY:g} | state size |", "|---|---|---|---|---|---|---|---|---|---|"]
  for p in sweep.best_over_learning_rates(rows):
    lines.append(f"| {p['mixer']} | {p['d_model']} | {p['seq_len']} | {p['num_kv_pairs']} | "
                 f"{p['learning_rate']:.1e} | {p['validation_accuracy']:.3f} | {p['test_accuracy']:.3f} | "
                 f"{p['test_std']:.3f} | {p['passing']}/{p['seeds']} | {p['state_size']:,} |")
  return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], workdir: str) -> str:
  """`figure2.{png,pdf}`, `state_tradeoff.{png,pdf}` and `best.md` (the plotted numbers) in workdir;
  returns that table."""
  figure2(rows, os.path.join(workdir, "figure2"))
  state_tradeoff(rows, os.path.join(workdir, "state_tradeoff"))
  table = format_best(rows)
  with open(os.path.join(workdir, "best.md"), "w") as f:
    f.write(table + "\n")
  return table
