"""Which positions a model's sparse-attention layers select, by their role in MQAR examples.

MQAR (zoo_jax.data.mqar) lays out an example as key-value pairs at positions 0 … 2·kv − 1 (keys at even
positions, values at odd ones), then queries (the labelled positions, a key seen again) among filler
tokens. A selection that lets attention do recall must select the queries and where their answers are
(the values, whose hidden state carries the preceding key after a short convolution). `mqar_selection`
reports, for every layer whose mixer has `selected_positions` (sparse_attention, also inside a hybrid),
the mean number of positions selected per example and the share of each role selected.

    model, config = notebook_utils.load_mqar_model(workdir)
    mqar_selection(model, dataset)   # {layer: {'selected': 11.9, 'keys': 1.0, 'values': 0.99, ...}}
"""

from typing import Any

from flax import nnx
import jax
import numpy as np

from zoo_jax.data import mqar

ROLES = ("keys", "values", "queries", "filler")


def _selecting_mixer(block) -> Any | None:
  mixer = block.mixer
  mixer = getattr(mixer, "mixer", mixer)  # a hybrid's layer mixer
  return mixer if callable(getattr(mixer, "selected_positions", None)) else None


def selected_positions(model, tokens_bl) -> dict[int, np.ndarray]:
  """{layer index: (b, l) bool} for the layers that select positions, on the model's own hidden states."""

  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens_bl):
    model_ = nnx.merge(graphdef, state)  # merged inside the trace: a layer may sow (learned selection)
    out = {}
    x_bld = model_.embed_tokens(tokens_bl)
    for i, block in enumerate(model_.blocks):
      mixer = _selecting_mixer(block)
      if mixer is not None:
        out[i] = mixer.selected_positions(block.norm1(x_bld), tokens_bl)
      x_bld = block(x_bld, tokens_bl)
    return out

  return {i: np.asarray(v) for i, v in run(state, tokens_bl).items()}


def roles(dataset: mqar.MQARDataset) -> dict[str, np.ndarray]:
  """(n, l) bool masks of the MQAR roles: context keys, context values, queries (labelled), filler."""
  n, l = dataset.inputs.shape
  pos_nl = np.broadcast_to(np.arange(l), (n, l))
  context_nl = pos_nl < 2 * np.asarray(dataset.num_kv_pairs)[:, None]
  inside_nl = pos_nl < np.asarray(dataset.seq_len)[:, None]  # not right padding of a shorter segment
  queries_nl = np.asarray(dataset.labels) != mqar.IGNORE_INDEX
  keys_nl, values_nl = context_nl & (pos_nl % 2 == 0), context_nl & (pos_nl % 2 == 1)
  return dict(keys=keys_nl, values=values_nl, queries=queries_nl,
              filler=inside_nl & ~(keys_nl | values_nl | queries_nl))


def mqar_selection(model, dataset: mqar.MQARDataset, max_examples: int = 500,
                   batch_size: int = 250) -> dict[int, dict[str, float]]:
  """Per selecting layer: mean positions selected per example and the share of each role selected, over
  the first `max_examples` examples."""
  n = min(max_examples, len(dataset.inputs))
  masks = {name: m[:n] for name, m in roles(dataset).items()}
  chunks: dict[int, list[np.ndarray]] = {}
  for start in range(0, n, batch_size):
    for layer, sel in selected_positions(model, np.asarray(dataset.inputs[start:min(n, start + batch_size)])).items():
      chunks.setdefault(layer, []).append(sel)
  out = {}
  for layer, parts in chunks.items():
    sel_nl = np.concatenate(parts)
    stats = dict(selected=float(sel_nl.sum(axis=1).mean()))
    for name in ROLES:
      stats[name] = float(sel_nl[masks[name]].mean()) if masks[name].any() else float("nan")
    out[layer] = stats
  return out
