r"""Zoology's Table 1 for two trained language models: where the perplexity gap sits (AR hits or not).

  python experiments/ar_gap.py /tmp/zoo_jax_lm/attention /tmp/zoo_jax_lm/base_conv
  python experiments/ar_gap.py RUN_A RUN_B --threshold=10 --output_json=/tmp/ar_gap.json

RUN_A is the attention (reference) model M, RUN_B the model m under test; each is an LM run workdir holding
`ar_eval.npz` (validation tokens and the model's log-probabilities) and `bigram_counts.npz` (bigram counts
of the tokens the model trained on, and the end-of-text token that separates documents in a packed row),
both written by experiments/lm.py (`zoo_jax.analysis.ar_hits`). An AR hit's earlier occurrence must lie in
the same document of its row. Prints, per run,
the overall, AR-hit and other perplexity (log-perplexity = mean NLL in brackets) and for RUN_B the share of
its gap to RUN_A explained by AR hits, min(((l_H^m − l_H^M) · p_H) / (l^m − l^M), 1) (paper, Section 3);
then the NLL gap per slice, the AR hits bucketed by the bigram's training count, and each model's mean NLL
by position in the row (`zoo_jax.analysis.induction.nll_by_position`, log2-spaced buckets: a model that
uses its context gets better further into the row; a flat curve past the first tokens says it does not,
and then AR hits cannot be easy for it). The AR-hit threshold
(a bigram is rare when its training count is below it) is scaled from the training split's size unless
--threshold is given, and always printed.
"""

import json
import math
import os
import sys

from absl import app
from absl import flags
import numpy as np

from zoo_jax.analysis import ar_hits
from zoo_jax.analysis import induction

EVAL_FILE = "ar_eval.npz"
COUNTS_FILE = "bigram_counts.npz"

_THRESHOLD = flags.DEFINE_integer(
    "threshold", None, "AR-hit threshold: bigrams with a training count below it (>= 1). Default: "
    "max(10, round(1.25e-7 * training tokens)), the paper's 1,250 per 10B tokens with a floor.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write the reports and the gap share here.")


def load_run(workdir: str):
  """(tokens, logprobs, BigramCounts) of a run workdir; errors name the missing or bad file."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{workdir} is not a directory (expected an LM run workdir)")
  paths = [os.path.join(workdir, name) for name in (EVAL_FILE, COUNTS_FILE)]
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found (written by experiments/lm.py at the end of training)")
  tokens, logprobs = ar_hits.load_eval(paths[0])
  return tokens, logprobs, ar_hits.BigramCounts.load(paths[1])


def read_summary(workdir: str) -> dict:
  """The run's summary.json (num_params, train_tokens, ...) if it has a readable one, else {} (optional)."""
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return {}
  return summary if isinstance(summary, dict) else {}


def run_names(run_a: str, run_b: str) -> tuple[str, str]:
  names = tuple(os.path.basename(os.path.normpath(r)) for r in (run_a, run_b))
  return names if names[0] != names[1] else (os.path.normpath(run_a), os.path.normpath(run_b))


def compare(run_a: str, run_b: str, threshold: int | None = None) -> dict:
  """The AR-hit reports of both runs and RUN_B's gap share explained by AR hits (RUN_A = reference M)."""
  if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1):
    raise ValueError(f"--threshold must be an integer >= 1, got {threshold!r}")
  (tokens_a, logprobs_a, counts_a), (tokens_b, logprobs_b, counts_b) = load_run(run_a), load_run(run_b)
  eval_a, eval_b = os.path.join(run_a, EVAL_FILE), os.path.join(run_b, EVAL_FILE)
  if tokens_a.shape != tokens_b.shape or not np.array_equal(tokens_a, tokens_b):
    raise ValueError(f"the runs were evaluated on different tokens: {eval_a} has {tokens_a.shape}, {eval_b} "
                     f"has {tokens_b.shape}{' (same shape, different ids)' * (tokens_a.shape == tokens_b.shape)}")
  if not np.array_equal(np.isnan(logprobs_a), np.isnan(logprobs_b)):
    raise ValueError(f"the runs were evaluated at different positions (NaN patterns of {eval_a} and {eval_b} "
                     "differ)")
  counts_a_path, counts_b_path = os.path.join(run_a, COUNTS_FILE), os.path.join(run_b, COUNTS_FILE)
  if counts_a.vocab_size != counts_b.vocab_size:
    raise ValueError(f"the runs counted bigrams over different vocabularies: {counts_a_path} has "
                     f"{counts_a.vocab_size} tokens, {counts_b_path} {counts_b.vocab_size}")
  notes = []
  if (counts_a.num_tokens != counts_b.num_tokens or not np.array_equal(counts_a.codes, counts_b.codes)
      or not np.array_equal(counts_a.counts, counts_b.counts)):
    notes.append(f"note: the training bigram counts differ ({counts_a.num_tokens:,} vs {counts_b.num_tokens:,} "
                 f"tokens); AR hits are defined by {counts_a_path} for both runs")
  summaries = [read_summary(run_a), read_summary(run_b)]
  budgets = [s.get("train_tokens") for s in summaries]
  if None not in budgets and budgets[0] != budgets[1]:
    notes.append(f"note: the runs were trained on different token budgets ({budgets[0]:,} vs {budgets[1]:,})")
  scaled = threshold is None
  if scaled:
    threshold = ar_hits.scaled_threshold(counts_a.num_tokens)
  reports = [ar_hits.analyze(tokens_a, lp, counts_a, threshold) for lp in (logprobs_a, logprobs_b)]
  hits_a, hits_b = reports[0].slices["ar_hits"], reports[1].slices["ar_hits"]
  all_a, all_b = reports[0].slices["all"], reports[1].slices["all"]
  if hits_a.num_tokens:
    explained = ar_hits.gap_explained(hits_b.mean_nll, hits_a.mean_nll, all_b.mean_nll, all_a.mean_nll,
                                      hits_a.share)
  else:
    explained = ar_hits.GapExplained(None, all_b.mean_nll - all_a.mean_nll, "no AR hits in the evaluation")
  if counts_a.eot_id is None:
    notes.append(f"note: {counts_a_path} names no end-of-text token (written before it was recorded): the "
                 "context of an AR hit is the whole packed row, not its document")
  return {"names": run_names(run_a, run_b), "threshold": threshold, "threshold_scaled": scaled,
          "eot_id": counts_a.eot_id,
          "train_tokens": counts_a.num_tokens, "reports": reports, "explained": explained, "notes": notes,
          "summaries": summaries,
          "by_position": [induction.nll_by_position(lp) for lp in (logprobs_a, logprobs_b)]}


def _ppl(stats: ar_hits.SliceStats) -> str:
  return "–" if not stats.num_tokens else f"{stats.perplexity:.2f} ({stats.mean_nll:.3f})"


def _table(rows: list[list[str]]) -> str:
  rows = [rows[0], ["---"] * len(rows[0]), *rows[1:]]
  return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def format_result(result: dict) -> str:
  (name_a, name_b), (report_a, report_b) = result["names"], result["reports"]
  explained, hits, total = result["explained"], report_a.slices["ar_hits"], report_a.slices["all"]
  how = (f"scaled from {result['train_tokens']:,} training tokens: max({ar_hits.DEFAULT_THRESHOLD_FLOOR}, "
         f"round({ar_hits.PAPER_THRESHOLD_RATE:.3g} * tokens))" if result["threshold_scaled"] else "--threshold")
  context = "the same row" if result.get("eot_id") is None else "the same document"
  lines = [f"AR hits: bigram seen earlier in {context} and seen fewer than {result['threshold']:,} times in "
           f"training ({how}); {hits.num_tokens:,} of {total.num_tokens:,} evaluated tokens "
           f"({100 * hits.share:.2f}%).", *result["notes"], ""]
  share = "–" if explained.value is None else f"{100 * explained.value:.1f}%"
  lines.append("Perplexity (mean NLL in nats), Table 1 of the paper; RUN_A is the reference:")
  rows = [["model", "params", "train tokens", "overall", "AR hits", "other", "% gap explained by AR hits"]]
  for name, report, summary, last in ((name_a, report_a, result["summaries"][0], "– (reference)"),
                                      (name_b, report_b, result["summaries"][1], share)):
    rows.append([name, *(f"{summary[k]:,}" if isinstance(summary.get(k), int) else "–"
                         for k in ("num_params", "train_tokens")),
                 *(_ppl(report.slices[k]) for k in ("all", "ar_hits", "other")), last])
  lines.append(_table(rows))
  if explained.reason:
    lines.append(f"% explained: {explained.reason}")
  gaps = []
  for key in ("all", "ar_hits", "other"):
    a, b = report_a.slices[key], report_b.slices[key]
    gaps.append("–" if not a.num_tokens else f"{b.mean_nll - a.mean_nll:+.3f}")
  lines += ["", f"NLL gap {name_b} − {name_a} (nats): overall {gaps[0]}, AR hits {gaps[1]}, other {gaps[2]}", ""]
  rows = [["training count", "AR hits", "share of AR hits", f"{name_a} ppl", f"{name_b} ppl"]]
  for bucket_a, bucket_b in zip(report_a.buckets, report_b.buckets):
    share_of_hits = "–" if math.isnan(bucket_a.share_of_hits) else f"{100 * bucket_a.share_of_hits:.1f}%"
    rows.append([bucket_a.label, f"{bucket_a.stats.num_tokens:,}", share_of_hits, _ppl(bucket_a.stats),
                 _ppl(bucket_b.stats)])
  lines += ["AR hits by the bigram's training count:", _table(rows)]
  rows = [["positions", f"{name_a} NLL", f"{name_b} NLL"]]
  for (start, stop, nll_a), (_, _, nll_b) in zip(*result["by_position"]):
    span = str(start) if stop == start + 1 else f"{start}-{stop - 1}"
    rows.append([span, *("–" if math.isnan(x) else f"{x:.3f}" for x in (nll_a, nll_b))])
  lines += ["", "Mean NLL (nats) by position in the row (flat past the first positions: the model does not use "
            "its context):", _table(rows)]
  return "\n".join(lines)


def result_to_json(result: dict) -> dict:
  (name_a, name_b), explained = result["names"], result["explained"]
  return {"reference": name_a, "other": name_b, "threshold": result["threshold"],
          "summaries": {name: {k: s[k] for k in ("num_params", "train_tokens") if k in s}
                        for name, s in zip((name_a, name_b), result["summaries"])},
          "threshold_scaled": result["threshold_scaled"], "train_tokens": result["train_tokens"],
          "reports": {name_a: result["reports"][0].to_dict(), name_b: result["reports"][1].to_dict()},
          "explained": {"value": explained.value, "gap_nats": explained.gap, "reason": explained.reason},
          "notes": result["notes"],
          "nll_by_position": {name: [dict(start=a, stop=b, nll=None if math.isnan(x) else x) for a, b, x in rows]
                              for name, rows in zip((name_a, name_b), result["by_position"])}}


def main(argv):
  if len(argv) != 3:
    sys.exit(f"error: expected two run workdirs, RUN_A (attention, the reference) and RUN_B, got {argv[1:]}")
  try:
    result = compare(argv[1], argv[2], _THRESHOLD.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(format_result(result))
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(result_to_json(result), f, indent=2)


if __name__ == "__main__":
  app.run(main)
