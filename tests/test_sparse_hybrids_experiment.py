"""experiments/sparse_hybrids.py and its config: every run config validates, names fail in one line, the
gap-share arithmetic and the table on hand-made run workdirs; one tiny end-to-end run (slow)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from zoo_jax import cli
from zoo_jax import config as config_lib
from zoo_jax import lm
from zoo_jax.analysis import ar_hits
from zoo_jax.configs import sparse_hybrids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(REPO, "experiments", "sparse_hybrids.py")


@pytest.fixture(scope="module")
def configs():
  return sparse_hybrids


@pytest.fixture(scope="module")
def experiment():
  return cli.load_module(BINARY)


# ---------------------------------------------------------------------------------------------- Config


@pytest.mark.parametrize("scale", ["default", "smoke"])
def test_every_task_and_variant_validates(configs, experiment, scale):
  config = configs.get_config(scale)
  runs = experiment.plan(config, list(configs.TASKS), list(configs.VARIANTS))  # validates each
  assert len(runs) == len(configs.TASKS) * len(configs.VARIANTS)
  by_name = {(t, v): run for t, v, run in runs}
  for (task, variant), run in by_name.items():
    if task == "lm":
      _, model_cfg, _ = lm.resolve(run)
      assert model_cfg.n_layers == 2 and model_cfg.state_mixer == "glu"
    else:
      model_cfg = config_lib.validate(run)
      assert (model_cfg.d_model, model_cfg.n_layers, model_cfg.state_mixer) == (64, 2, "none")
    mixer = run["model"]["mixer"]
    if variant == "base_conv":
      assert mixer == dict(name="base_conv", kernel_size=[3, -1], implicit_long_conv=True)
      continue
    assert mixer["name"] == "hybrid" and mixer["mixers"][0] == dict(name="base_conv", kernel_size=3)
    sparse = mixer["mixers"][1]
    assert sparse["name"] == "sparse_attention" and sparse["selection"] == variant.split("_")[0]
    if variant != "full":
      assert sparse["budget"] == config.tasks[task].budget
      assert sparse["keys"] == ("all" if variant.endswith("_all") else "selected")
    if variant.startswith("programmatic"):
      assert sparse["exclude_tokens"] == ([] if task == "lm" else [0])
    if variant.startswith("learned"):
      assert sparse["aux_weight"] == config.aux_weight


def test_default_sizes(configs):
  config = configs.get_config()
  for task, seq_len, kv, budget in (("mqar256", 256, 4, 64), ("mqar512", 512, 4, 128)):
    segment = config.tasks[task].run.data.train_segments[0]
    assert (segment["seq_len"], segment["num_kv_pairs"], config.tasks[task].budget) == (seq_len, kv, budget)
  assert config.tasks.lm.run.data.seq_len == 256 and config.tasks.lm.budget == 64


def test_unknown_names_are_one_line_errors(configs, experiment):
  config = configs.get_config("smoke")
  with pytest.raises(ValueError, match=r"^unknown task 'mqar1024'; accepted: mqar256, mqar512, lm$"):
    experiment.plan(config, ["mqar1024"], ["full"])
  with pytest.raises(ValueError, match=r"^unknown variant 'sparse'; accepted: base_conv, full, random, "):
    experiment.plan(config, ["mqar256"], ["full", "sparse"])
  with pytest.raises(ValueError, match=r"^unknown sparse_hybrids scale 'big'"):
    configs.get_config("big")
  config.tasks.mqar256.budget = 0
  with pytest.raises(ValueError, match=r"^mqar256/random: .*budget must be >= 1, got 0$"):
    experiment.plan(config, ["mqar256"], ["full", "random"])


def test_binary_rejects_unknown_names_in_one_line(tmp_path):
  out = subprocess.run([sys.executable, BINARY, f"--workdir={tmp_path}", "--tasks=mqar256",
                        "--variants=full,oracle"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith("error: unknown variant 'oracle'; accepted: base_conv")
  assert not os.listdir(tmp_path)  # nothing trained or written


# ---------------------------------------------------------------------------------------------- Table


def test_gap_share(experiment):
  share = experiment.gap_share
  assert share(0.6, 0.2, 1.0, min_gap=0.01) == pytest.approx(0.5)
  assert share(0.1, 0.2, 1.0, min_gap=0.01) == pytest.approx(-0.125)  # worse than BaseConv
  assert share(1.0, 0.2, 1.0, min_gap=0.01) == pytest.approx(1.0)
  assert share(0.5, 0.5, 0.505, min_gap=0.01) is None  # no gap to close
  assert share(None, 0.2, 1.0, min_gap=0.01) is None and share(0.5, None, 1.0, min_gap=0.01) is None
  assert share(0.5, 0.2, None, min_gap=0.01) is None
  # NLL: base 3.0, full 2.0, model 2.25 closes 75%
  assert share(2.25, 3.0, 2.0, min_gap=0.01, lower_is_better=True) == pytest.approx(0.75)
  assert share(2.0, 3.0, 3.0, min_gap=0.01, lower_is_better=True) is None


def _write(path, name, content):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, name), "w") as f:
    f.write(content)


def _mqar_run(workdir, task, variant, accuracy, aux=None):
  path = os.path.join(workdir, task, variant)
  _write(path, "summary.json", json.dumps(dict(test_accuracy=accuracy)))
  lines = [dict(step=10, **{"train/loss": 1.0}), dict(step=10, **{"validation/accuracy": 0.5})]
  if aux is not None:
    lines = [dict(step=5, **{"train/aux_loss": 9.0}), *lines, dict(step=20, **{"train/aux_loss": aux})]
  _write(path, "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3')  # cut short


# One row of 7 tokens: token 2 at positions 1 and 3, so position 4 (bigram (2, 3) seen at 1-2, rare in
# training) is an AR hit (the only one); every other position is not.
TOKENS = np.array([[1, 2, 3, 2, 3, 4, 1]], np.int32)


def _lm_run(workdir, variant, hit_nll, other_nll, with_eval=True):
  path = os.path.join(workdir, "lm", variant)
  logprobs = np.full(TOKENS.shape, -other_nll, np.float32)
  logprobs[0, 4] = -hit_nll
  logprobs[:, 0] = np.nan
  overall = (hit_nll + 5 * other_nll) / 6
  _write(path, "summary.json", json.dumps(dict(validation_loss=overall)))
  if with_eval:
    ar_hits.save_eval(os.path.join(path, "ar_eval.npz"), TOKENS, logprobs)
    ar_hits.count_bigrams(np.array([[1, 2] * 50]), 8).save(os.path.join(path, "bigram_counts.npz"))
  return overall


@pytest.fixture
def hand_made(tmp_path):
  workdir = str(tmp_path)
  _mqar_run(workdir, "mqar256", "base_conv", 0.2)
  _mqar_run(workdir, "mqar256", "full", 1.0)
  _mqar_run(workdir, "mqar256", "programmatic_all", 0.8)
  _mqar_run(workdir, "mqar256", "learned", 0.1, aux=0.0123)
  _mqar_run(workdir, "mqar512", "base_conv", 0.5)
  _mqar_run(workdir, "mqar512", "full", 0.505)  # no gap: every share at 512 is n/a
  _mqar_run(workdir, "mqar512", "learned", 0.9, aux=0.02)
  nll = dict(base_conv=_lm_run(workdir, "base_conv", 4.0, 2.0), full=_lm_run(workdir, "full", 1.0, 1.8),
             learned=_lm_run(workdir, "learned", 2.0, 1.9),
             programmatic_all=_lm_run(workdir, "programmatic_all", 3.0, 1.95, with_eval=False))
  os.makedirs(os.path.join(workdir, "mqar512", "random"))  # started, never finished: missing
  return workdir, nll


def test_table_rows_on_hand_made_runs(experiment, hand_made):
  workdir, nll = hand_made
  markdown, csv_text, rows = experiment.build_table(workdir, ["mqar256"], ["base_conv"])
  # tasks and variants found in the workdir are added, in the canonical order
  assert [r["variant"] for r in rows] == ["base_conv", "full", "random", "programmatic_all", "learned"]
  by = {r["variant"]: r for r in rows}
  assert by["programmatic_all"]["mqar256_accuracy"] == 0.8
  assert by["programmatic_all"]["mqar256_accuracy_gap_closed"] == pytest.approx(0.75)
  assert by["learned"]["mqar256_accuracy_gap_closed"] == pytest.approx(-0.125)
  assert by["base_conv"]["mqar256_accuracy_gap_closed"] == 0 and by["full"]["mqar256_accuracy_gap_closed"] == 1
  assert by["random"]["mqar256_accuracy"] is None and by["random"]["mqar256_accuracy_gap_closed"] is None
  assert all(r["mqar512_accuracy_gap_closed"] is None for r in rows)  # gap 0.005 < MIN_ACCURACY_GAP
  assert by["learned"]["mqar512_accuracy"] == 0.9
  assert by["learned"]["aux_loss_mqar256"] == pytest.approx(0.0123)  # the last logged window's
  assert by["learned"]["aux_loss_mqar512"] == pytest.approx(0.02) and by["full"]["aux_loss_mqar256"] is None
  # LM: overall NLL share, and the AR-hit slice (position 4 only)
  gap = nll["base_conv"] - nll["full"]
  assert by["learned"]["lm_nll"] == pytest.approx(nll["learned"])
  assert by["learned"]["lm_nll_gap_closed"] == pytest.approx((nll["base_conv"] - nll["learned"]) / gap)
  assert by["learned"]["lm_ar_hit_nll"] == pytest.approx(2.0)
  assert by["learned"]["lm_ar_hit_nll_gap_closed"] == pytest.approx((4.0 - 2.0) / (4.0 - 1.0))
  assert by["programmatic_all"]["lm_nll_gap_closed"] is not None
  assert by["programmatic_all"]["lm_ar_hit_nll"] is None  # no evaluation files
  assert by["programmatic_all"]["lm_ar_hit_nll_gap_closed"] is None

  lines = markdown.splitlines()
  assert lines[0] == ("| variant | MQAR L=256 acc | gap closed | MQAR L=512 acc | gap closed | LM ppl | gap closed "
                      "| LM AR-hit ppl | gap closed | aux_loss (mqar256 / mqar512 / lm) |")
  learned = next(line for line in lines if line.startswith("| learned |"))
  assert learned == (f"| learned | 0.100 | -12.5% | 0.900 | n/a | {math.exp(nll['learned']):.2f} | "
                     f"{100 * (nll['base_conv'] - nll['learned']) / gap:.1f}% | {math.exp(2.0):.2f} | 66.7% | "
                     "0.0123 / 0.0200 / n/a |")
  assert next(line for line in lines if line.startswith("| random |")) == (
      "| random | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | – |")
  assert "lm: AR hits (bigram seen earlier in the row, seen fewer than 10 times in training) are 1 of 6" in markdown

  header, *csv_rows = csv_text.strip().splitlines()
  assert header.split(",")[:3] == ["variant", "mqar256_accuracy", "mqar256_accuracy_gap_closed"]
  assert csv_rows[2] == "random" + "," * (len(header.split(",")) - 1)  # missing: empty cells


def test_table_only_asked_tasks_when_workdir_is_empty(experiment, tmp_path):
  markdown, _, rows = experiment.build_table(str(tmp_path), ["mqar512"], ["base_conv", "learned"])
  assert markdown.splitlines()[0] == "| variant | MQAR L=512 acc | gap closed | aux_loss (mqar512) |"
  assert [r["variant"] for r in rows] == ["base_conv", "learned"]
  assert markdown.splitlines()[3] == "| learned | n/a | n/a | – |"


# ---------------------------------------------------------------------------------------------- End to end


@pytest.mark.slow  # ~2 minutes on 2 CPU cores: 4 tiny MQAR runs and 2 tiny LM runs, then a rerun that skips them
def test_end_to_end_smoke_run_and_resume(tmp_path):
  workdir = tmp_path / "sparse"
  args = [sys.executable, BINARY, f"--config={os.path.join(REPO, 'experiments', 'configs', 'sparse_hybrids.py')}:smoke",
          f"--workdir={workdir}", "--variants=base_conv,full,programmatic_all,learned", "--tasks=mqar256,lm"]
  # the LM reads the embedded corpus from the default data dir (~/.cache/zoo_jax), built once per machine
  out = subprocess.run(args, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  table = (workdir / "table.md").read_text()
  assert table.splitlines()[0].startswith("| variant | MQAR L=256 acc | gap closed | LM ppl |")
  rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:] if line.startswith("| ")}
  assert list(rows) == ["base_conv", "full", "programmatic_all", "learned"]
  assert "n/a | n/a | n/a" not in rows["learned"].split("|", 2)[2][:40]  # a value for MQAR
  assert rows["learned"].rstrip(" |").split("|")[-1].strip() != "–"  # the learned layer's aux_loss
  assert (workdir / "table.csv").read_text().startswith("variant,mqar256_accuracy,")
  selection = (workdir / "selection.md").read_text().splitlines()
  assert [line.split("|")[2].strip() for line in selection[2:]] == ["programmatic_all", "learned"]
  for task in ("mqar256", "lm"):
    for variant in ("base_conv", "full", "programmatic_all", "learned"):
      assert (workdir / task / variant / "summary.json").exists()

  before = (workdir / "mqar256" / "full" / "summary.json").read_text()
  out = subprocess.run(args + ["--config.tasks.mqar256.budget=8"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count("finished, skipped") == 8
  assert "mqar256/learned: finished, skipped (its config.json differs" in out.stdout
  assert (workdir / "mqar256" / "full" / "summary.json").read_text() == before
