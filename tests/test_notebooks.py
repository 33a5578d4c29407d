"""The notebooks: stored without outputs, each opening with a Colab badge and a parameter cell; each runs
headless, top to bottom, at its small CPU setting without a cell error; and the helpers they share.

Marked `notebooks` (outside the default suite); run with `python3 -m pytest -q -m notebooks tests`
(.ci/run does). Executing them needs nbclient, nbformat and ipykernel.
"""

import json
import os
import re
import time

import chex
import numpy as np
import pytest

from zoo_jax import notebook_utils
from zoo_jax.data import mqar

pytestmark = pytest.mark.notebooks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart", "figure2", "ar_analysis")
# What each notebook must display when it runs: a figure (PNG) or the rendered passage (HTML).
DISPLAYS = {"quickstart": ["image/png"], "figure2": ["image/png", "image/png"], "ar_analysis": ["text/html"]}


def _load(name: str) -> dict:
  with open(os.path.join(REPO, "notebooks", f"{name}.ipynb"), encoding="utf-8") as f:
    return json.load(f)


def _source(cell: dict) -> str:
  return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


# ---------------------------------------------------------------------------------------------- Stored form


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
  nb = _load(name)
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] == "code":
      assert cell.get("outputs") == [], f"{name}.ipynb cell {i} has outputs: strip them before committing"
      assert cell.get("execution_count") is None, f"{name}.ipynb cell {i} has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_opens_with_badge_parameters_and_install(name):
  cells = _load(name)["cells"]
  assert cells[0]["cell_type"] == "markdown"
  link = f"https://colab.research.google.com/github/ORG/zoo_jax/blob/main/notebooks/{name}.ipynb"
  assert link in _source(cells[0]) and "colab-badge.svg" in _source(cells[0])
  code = [c for c in cells if c["cell_type"] == "code"]
  assert "parameters" in code[0]["metadata"].get("tags", []), "the first code cell must be tagged parameters"
  assert re.search(r"^REPO_URL = ", _source(code[0]), re.M)
  install = _source(code[1])
  assert '"google.colab" in sys.modules' in install and "git+{REPO_URL}" in install


# ---------------------------------------------------------------------------------------------- Execution


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_headless(name, tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(os.path.join(REPO, "notebooks", f"{name}.ipynb"), as_version=4)
  start = time.time()
  # Runs in tmp_path at the notebook's defaults; any cell error raises CellExecutionError.
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  print(f"{name}.ipynb ran in {time.time() - start:.1f}s")
  shown = [mime for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
           if out.output_type == "display_data" for mime in out.get("data", {})]
  for mime in set(DISPLAYS[name]):
    assert shown.count(mime) >= DISPLAYS[name].count(mime), f"{name}.ipynb displayed {shown}"


# ---------------------------------------------------------------------------------------------- Helpers


def test_format_mqar_example_lists_context_queries_and_predictions():
  inputs, labels = mqar.generate_mqar(vocab_size=20, seq_len=16, num_kv_pairs=2, num_examples=1, seed=3)
  query = np.flatnonzero(labels[0] != mqar.IGNORE_INDEX)
  prediction = np.zeros(16, np.int64)
  prediction[query[0]] = labels[0, query[0]]  # right at the first query, filler (wrong) at the second
  text = notebook_utils.format_mqar_example(inputs[0], labels[0], 2, 20, {"m": prediction})
  lines = text.splitlines()
  k1, v1, k2, v2 = inputs[0, :4]
  assert lines[0] == f"context (2 pairs): k{k1}:v{v1}  k{k2}:v{v2}"
  assert len(lines) == 3 + 2
  for line, t in zip(lines[3:], query):
    assert f"position {t:3d}" in line and f"k{inputs[0, t]} ->" in line and f"v{labels[0, t]}" in line
  assert lines[3].endswith("✓") and lines[4].endswith("✗")
  with pytest.raises(ValueError, match="num_kv_pairs must be in"):
    notebook_utils.format_mqar_example(inputs[0], labels[0], 9, 20)
  with pytest.raises(ValueError, match=r"token must be in \[0, 20\)"):
    notebook_utils.token_name(20, 20)


def test_passage_html_colours_by_loss_and_outlines_hits():
  pieces = ["<a>", " b", "\n", " b"]
  nll = np.array([np.nan, 5.0, 20.0, 0.0])
  html = notebook_utils.passage_html(pieces, {"attn": nll, "conv": nll + 1}, [False, False, False, True],
                                     max_nll=10.0)
  spans = re.findall(r'<span style="([^"]*)" title="([^"]*)">([^<]*(?:<br>)?)</span>', html)
  assert len(spans) == 2 * 4  # every token once per model
  alphas = [float(re.search(r",([0-9.]+)\);", s).group(1)) for s, _, _ in spans[:4]]
  chex.assert_trees_all_close(np.array(alphas), np.array([0.0, 0.5, 1.0, 0.0]))  # NaN blank, clipped at 1
  assert [("outline" in s) for s, _, _ in spans[:4]] == [False, False, False, True]
  assert spans[0][2] == "&lt;a&gt;" and spans[2][2] == "⏎<br>"
  assert "attn 5.00 nats, conv 6.00 nats" in spans[1][1]
  with pytest.raises(ValueError, match=r"hits_l must have shape \(4,\)"):
    notebook_utils.passage_html(pieces, {"attn": nll}, [True])
  with pytest.raises(ValueError, match="max_nll must be > 0"):
    notebook_utils.passage_html(pieces, {"attn": nll}, [False] * 4, max_nll=0.0)
