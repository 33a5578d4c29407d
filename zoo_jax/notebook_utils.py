r"""What the notebooks (notebooks/*.ipynb) share and is worth testing on its own: a trained MQAR model back
from its workdir, the learning curves of metrics.jsonl, an MQAR example as text, and an LM passage as HTML.

Dimension legend: l sequence length, v vocabulary.

    load_mqar_model(workdir)      (LanguageModel with the best-validation parameters, full run config) of a
                                  `zoo_jax.train.train_and_evaluate` workdir
    read_curves(workdir)          train accuracy / loss per logged step, validation accuracy per epoch
    format_mqar_example(...)      one MQAR example: its key-value context, then each query, its answer and
                                  optionally a model's prediction (task layout: `zoo_jax.data.mqar`)
    passage_html(...)             tokens of one evaluated row, each coloured by every model's loss
                                  −log p(x_t | x_<t) (nats) and AR hits (`zoo_jax.analysis.ar_hits`) marked

Nothing here trains or evaluates: the notebooks call `train_and_evaluate`, `sweep.run_sweep`, `lm.train_lm`
and `analysis.ar_hits` for that, as the experiments do.
"""

import html
import json
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from zoo_jax import checkpoint
from zoo_jax.data import mqar
from zoo_jax.model import LanguageModel

FILLER = "·"
LOSS_RGB = (214, 39, 40)  # red: a token's background alpha is its loss / max_nll
HIT_RGB = (31, 119, 180)  # blue: the outline of an AR hit


def in_colab() -> bool:
  return "google.colab" in sys.modules


# ---------------------------------------------------------------------------------------------- MQAR runs


def load_mqar_model(workdir: str) -> tuple[LanguageModel, Any]:
  """(model holding the best-validation parameters, full run config) of a finished or interrupted run:
  `zoo_jax.checkpoint.load_for_inference`, with a missing workdir or checkpoint as FileNotFoundError."""
  try:
    return checkpoint.load_for_inference(workdir)
  except checkpoint.CheckpointError as e:
    raise FileNotFoundError(str(e)) from None


def read_curves(workdir: str) -> dict[str, dict[str, np.ndarray]]:
  """{'train': {step, accuracy, loss}, 'validation': {step, accuracy}} from the workdir's metrics.jsonl.

  Train values are means over each logging window (`train.log_every_steps`), validation values are per
  epoch, at the step that ended it."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found (written by zoo_jax.train.train_and_evaluate)")
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  train = [r for r in records if "train/accuracy" in r]
  valid = [r for r in records if "validation/accuracy" in r]
  return {
      "train": {"step": np.asarray([r["step"] for r in train]),
                "accuracy": np.asarray([r["train/accuracy"] for r in train]),
                "loss": np.asarray([r["train/loss"] for r in train])},
      "validation": {"step": np.asarray([r["step"] for r in valid]),
                     "accuracy": np.asarray([r["validation/accuracy"] for r in valid])},
  }


def token_name(token: int, vocab_size: int) -> str:
  """MQAR's vocabulary: 0 is filler, [1, v/2) keys 'k…', [v/2, v) values 'v…'."""
  if not 0 <= token < vocab_size:
    raise ValueError(f"token must be in [0, {vocab_size}), got {token}")
  if token == 0:
    return FILLER
  return f"k{token}" if token < vocab_size // 2 else f"v{token}"


def format_mqar_example(inputs_l: Sequence[int], labels_l: Sequence[int], num_kv_pairs: int, vocab_size: int,
                        predictions: Mapping[str, Sequence[int]] | None = None) -> str:
  """Context (key:value pairs), the whole input row, then one line per query: position, key, the value it
  must recall, and each model's prediction at that position (`predictions`: name -> (l,) argmax tokens)."""
  inputs_l, labels_l = np.asarray(inputs_l), np.asarray(labels_l)
  if inputs_l.ndim != 1 or labels_l.shape != inputs_l.shape:
    raise ValueError(f"inputs and labels must be 1-D of equal length, got shapes {inputs_l.shape} and "
                     f"{labels_l.shape}")
  if not 1 <= num_kv_pairs <= inputs_l.shape[0] // 2:
    raise ValueError(f"num_kv_pairs must be in [1, {inputs_l.shape[0] // 2}], got {num_kv_pairs}")
  name = lambda t: token_name(int(t), vocab_size)
  context = "  ".join(f"{name(inputs_l[2 * i])}:{name(inputs_l[2 * i + 1])}" for i in range(num_kv_pairs))
  lines = [f"context ({num_kv_pairs} pairs): {context}", "input row: " + " ".join(name(t) for t in inputs_l),
           "queries:"]
  for t in np.flatnonzero(labels_l != mqar.IGNORE_INDEX):
    line = f"  position {t:3d}: {name(inputs_l[t]):>5} -> {name(labels_l[t]):>5}"
    for model, pred_l in (predictions or {}).items():
      pred = int(np.asarray(pred_l)[t])
      line += f"   {model}: {name(pred):>5} {'✓' if pred == labels_l[t] else '✗'}"
    lines.append(line)
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- LM passages


def _token_span(piece: str, nll: float, max_nll: float, hit: bool, tooltip: str) -> str:
  alpha = 0.0 if not np.isfinite(nll) else min(max(nll / max_nll, 0.0), 1.0)
  style = f"background: rgba({LOSS_RGB[0]},{LOSS_RGB[1]},{LOSS_RGB[2]},{alpha:.2f});"
  if hit:
    style += f" outline: 2px solid rgb{HIT_RGB}; font-weight: bold;"
  text = html.escape(piece).replace("\n", "⏎<br>")
  return f'<span style="{style}" title="{html.escape(tooltip)}">{text}</span>'


def passage_html(pieces: Sequence[str], nll_by_model: Mapping[str, Sequence[float]], hits_l: Sequence[bool],
                 *, max_nll: float = 10.0, title: str = "") -> str:
  """One row of evaluated tokens, once per model, one under the other.

  pieces: (l,) decoded text of each token; nll_by_model: name -> (l,) −log p(x_t | x_<t) in nats (NaN where
  not evaluated, e.g. position 0); hits_l: (l,) AR-hit mask. A token's background is red with opacity
  nll / max_nll (clipped to 1); AR hits are outlined in blue and bold. Hovering shows every model's loss.
  """
  hits_l = np.asarray(hits_l, bool)
  length = len(pieces)
  if hits_l.shape != (length,):
    raise ValueError(f"hits_l must have shape ({length},) like pieces, got {hits_l.shape}")
  nlls = {name: np.asarray(v, np.float64) for name, v in nll_by_model.items()}
  for name, v in nlls.items():
    if v.shape != (length,):
      raise ValueError(f"nll_by_model[{name!r}] must have shape ({length},) like pieces, got {v.shape}")
  if not nlls:
    raise ValueError("nll_by_model must name at least one model")
  if not max_nll > 0:
    raise ValueError(f"max_nll must be > 0, got {max_nll}")
  tooltips = [", ".join(f"{name} {v[t]:.2f} nats" for name, v in nlls.items()) + (" (AR hit)" if hits_l[t] else "")
              for t in range(length)]
  parts = [f"<div style='font-family: monospace; line-height: 1.9; max-width: 60em'>"]
  if title:
    parts.append(f"<p><b>{html.escape(title)}</b></p>")
  for name, v in nlls.items():
    finite = v[np.isfinite(v)]
    mean = f"{finite.mean():.2f}" if finite.size else "–"
    hit_mean = f"{v[hits_l & np.isfinite(v)].mean():.2f}" if (hits_l & np.isfinite(v)).any() else "–"
    parts.append(f"<p><b>{html.escape(name)}</b>: mean loss {mean} nats, on AR hits {hit_mean} nats</p><p>")
    parts.extend(_token_span(pieces[t], v[t], max_nll, bool(hits_l[t]), tooltips[t]) for t in range(length))
    parts.append("</p>")
  parts.append(f"<p style='font-size: smaller'>background: loss, from 0 (white) to {max_nll:g} nats or more "
               f"(red); <span style='outline: 2px solid rgb{HIT_RGB}; font-weight: bold'>outlined</span>: AR "
               "hit (the bigram ending here occurred earlier in the row and is rare in training)</p></div>")
  return "".join(parts)
