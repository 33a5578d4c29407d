"""Sweeps: runs × learning rates × seeds, vmapped groups equal to single runs, restart and resume, and the plots."""

import copy
import csv
import os

from absl import flags
import numpy as np
import pytest

from zoo_jax import cli
from zoo_jax import config as config_lib
from zoo_jax import sweep
from zoo_jax import sweep_plots
from zoo_jax import train
from zoo_jax import trainer
from zoo_jax.configs import figure2
from zoo_jax.configs import tradeoff

ATTENTION = {"mixer": {"name": "attention"}}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(seq_len=16, num_kv_pairs=2, model=ATTENTION, train_examples=256, eval_examples=50) -> dict:
  return {"model": model, "data": figure2.data(seq_len, num_kv_pairs, train_examples, eval_examples)}


def _sweep_config(runs=None, **sweep_overrides) -> dict:
  c = config_lib.defaults().to_dict()
  c["data"]["vocab_size"] = 32
  c["model"]["d_model"] = 16
  c["train"].update(epochs=2, batch_size=16, eval_batch_size=50, log_every_steps=1000)
  c["runs"] = {"attention-d16-L16-kv2": _run()} if runs is None else runs
  c["sweep"] = dict(learning_rate=[1e-3, 3e-3], seed=[0, 1])
  c["sweep"].update(sweep_overrides)
  return c


# ---------------------------------------------------------------------------------------------- Grid


def test_every_run_trains_at_every_learning_rate_and_seed():
  def models(seq_len):  # H3's d_state is L, computed in Python
    return {"attention": ATTENTION, "h3": {"mixer": {"name": "h3", "d_state": seq_len, "head_dim": 2}}}

  runs = figure2.grid(models, ("attention", "h3"), (16, 32), ((16, 2, 64, 10, None), (24, 4, 32, 10, 8)))
  c = _sweep_config(runs)
  runs = sweep.expand_grid(c)
  assert len(runs) == 2 * 2 * 2 * 2 * 2
  assert len({r.run_id for r in runs}) == len(runs)
  by_id = {r.run_id: r for r in runs}
  run = by_id["h3-d32-L24-kv4-lr3.00e-03-s1"]
  assert (run.group, run.mixer, run.d_model, run.seq_len, run.num_kv_pairs) == ("h3-d32-L24-kv4", "h3", 32, 24, 4)
  assert run.config["model"]["mixer"] == {"name": "h3", "d_state": 24, "head_dim": 2}
  assert run.config["model"]["d_model"] == 32 and run.config["seed"] == 1
  assert run.config["train"]["learning_rate"] == 3e-3 and run.config["train"]["batch_size"] == 8
  assert run.config["data"]["train_segments"] == [dict(seq_len=24, num_kv_pairs=4, num_examples=32)]
  assert run.config["data"]["test_segments"] == [dict(seq_len=24, num_kv_pairs=4, num_examples=10)]
  assert by_id["h3-d16-L16-kv2-lr1.00e-03-s0"].config["model"]["mixer"]["d_state"] == 16
  assert by_id["h3-d16-L16-kv2-lr1.00e-03-s0"].config["train"]["batch_size"] == 16  # base value kept
  # Groups: everything but learning rate and seed; 2 mixers × 2 widths × 2 lengths, 4 runs each.
  groups = sweep.group_runs(runs)
  assert len(groups) == 8 and all(len(g) == 4 for g in groups)
  assert all(len({r.group for r in g}) == 1 for g in groups)
  assert [len(g) for g in sweep.group_runs(runs, max_group_size=3)] == [3, 1] * 8


def test_the_mixer_column_is_the_run_name_up_to_its_first_dash():
  runs = sweep.expand_grid(_sweep_config({"base_conv-wide-L16": _run(model={
      "mixer": {"name": "base_conv", "kernel_size": [3, -1]}, "d_model": 32}), "attention": _run()}))
  assert {(r.group, r.mixer, r.d_model) for r in runs} == {("base_conv-wide-L16", "base_conv", 32),
                                                           ("attention", "attention", 16)}


@pytest.mark.parametrize("runs, overrides, message", [
    (None, dict(learning_rate=[]), "sweep.learning_rate must be a non-empty list"),
    (None, dict(learning_rate=[1e-3, -1.0]), "sweep.learning_rate entries must be positive"),
    (None, dict(learning_rate=[1e-3, 20.0]), "sweep.learning_rate[1]: train.learning_rate must be"),
    (None, dict(learning_rate=[1e-3, 1.0004e-3]), "collide in run ids"),
    (None, dict(seed=[0, 0]), "sweep.seed has repeated entries"),
    (None, dict(seed=[2**31]), "sweep.seed[0]: seed must be"),
    (None, dict(max_group_size=-1), "sweep.max_group_size must be an integer >= 0"),
    (None, dict(parallel_groups=0), "sweep.parallel_groups must be an integer in [1, 64], got 0"),
    (None, dict(parallel_groups=True), "sweep.parallel_groups must be an integer in [1, 64], got True"),
    (None, dict(grid=1), "sweep.grid is not a sweep key"),
    (None, dict(mixers={"attention": {}}),
     "sweep.mixers no longer exists: the grid is now Python in the config's `runs`"),
    (None, dict(d_model=[16]), "sweep.d_model no longer exists: the grid is now Python"),
    (None, dict(lengths=[]), "sweep.lengths no longer exists: the grid is now Python"),
    ({}, {}, "runs is missing from the sweep config"),
    ({"attention-d16-L16-kv5": _run(num_kv_pairs=5)}, {},
     "sweep run attention-d16-L16-kv5: data.train_segments[0]"),
    ({"x": {"model": {"mixer": {"name": "nope"}}}}, {}, "sweep run x: "),
    ({"x": {"modle": {}}}, {}, "runs.x.modle is not a config key"),
    ({"x": {"train": {"learning_rate": 1e-3}}}, {}, "runs.x.train.learning_rate: a sweep run may not set it"),
    ({"x": {"seed": 3}}, {}, "runs.x.seed: a sweep run may not set it; sweep.seed sets it"),
    ({"-d16": _run()}, {}, "runs.-d16: a sweep run name is '<mixer label>-<rest>'"),
    ({"a/b": _run()}, {}, "runs.a/b: a sweep run name is"),
    ({"x": 3}, {}, "runs.x must be a partial run config"),
])
def test_bad_sweeps_fail_in_one_line_naming_the_run_or_axis(runs, overrides, message):
  with pytest.raises(ValueError) as e:
    sweep.expand_grid(_sweep_config(runs, **overrides))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_a_config_without_a_sweep_section_is_refused():
  with pytest.raises(ValueError, match="sweep is missing"):
    sweep.expand_grid(config_lib.defaults())


def test_a_sweep_config_is_not_expanded_as_single_runs():
  with pytest.raises(ValueError, match=r"^sweep: this is a sweep config .* run it with experiments/sweep.py"):
    config_lib.expand_runs(figure2.get_config("cpu"))


def test_the_readme_overrides_of_the_population_axes_parse():
  argv = ["sweep.py", f"--config={REPO}/experiments/configs/figure2.py:cpu", "--config.sweep.seed=[0,1,2]",
          "--config.sweep.learning_rate=[1e-3]"]
  flag_values = flags.FlagValues()
  holder = cli.define_config_flag(f"{REPO}/experiments/configs/figure2.py", flag_values=flag_values, sys_argv=argv)
  cli.parse_flags(argv, flag_values)
  runs = sweep.expand_grid(holder.value)
  num_runs = len(figure2.get_config("cpu").runs)
  assert {(r.learning_rate, r.seed) for r in runs} == {(1e-3, 0), (1e-3, 1), (1e-3, 2)} and len(runs) == num_runs * 3


# ---------------------------------------------------------------------------------------------- Training


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  """A 2-learning-rate × 2-seed attention sweep, trained as one vmapped group; early stop at 0.015 so that
  some models stop after epoch 1 and the rest train on."""
  c = _sweep_config()
  c["train"]["early_stop_accuracy"] = 0.015
  workdir = str(tmp_path_factory.mktemp("sweep"))
  rows = sweep.run_sweep(c, workdir)
  return c, workdir, rows

@pytest.mark.slow  # 21 s; keeps the default suite under 15 min

def test_vmapped_group_equals_the_same_runs_trained_one_by_one(finished_sweep, tmp_path):
  c, _, rows = finished_sweep
  assert len(rows) == 4 and all(r["group_size"] == 4 for r in rows)
  by_id = {r["run_id"]: r for r in rows}
  assert {r["epochs_run"] for r in rows} == {1, 2}  # the early stop froze some models, not the group
  runs = sweep.expand_grid(c)
  # (lr 1e-3, seed 0) and (lr 3e-3, seed 1): both injected hyperparameters differ from the first model's.
  for run in (runs[0], runs[3]):
    single = train.train_and_evaluate(run.config, str(tmp_path / run.run_id))
    row = by_id[run.run_id]
    for key in ("best_epoch", "epochs_run", "stopped_early"):
      assert row[key] == single[key], key
    np.testing.assert_allclose(row["validation_loss"], single["validation_loss"], rtol=1e-5)
    np.testing.assert_allclose(row["test_loss"], single["test_loss"], rtol=1e-5)
    np.testing.assert_allclose(row["test_accuracy"], single["test_accuracy"], atol=1e-6)
    assert row["test_slices"] == pytest.approx(single["test_slices"], abs=1e-6)
    assert row["num_params"] == single["num_params"] and row["state_size"] == single["state_size"]


@pytest.mark.slow  # ~15 s: four groups compile and train
def test_groups_trained_in_parallel_threads_equal_the_same_groups_trained_in_turn(tmp_path, capsys):
  runs = {f"attention-d{d}-L16-kv2": _run(model={**ATTENTION, "d_model": d}, train_examples=64) for d in (16, 32)}
  c = _sweep_config(runs, learning_rate=[3e-3], seed=[0, 1], parallel_groups=2)
  c["train"]["epochs"] = 1
  parallel = {r["run_id"]: r for r in sweep.run_sweep(c, str(tmp_path / "parallel"))}
  assert "2 groups at a time (one thread each)" in capsys.readouterr().out
  in_turn = {r["run_id"]: r for r in sweep.run_sweep({**c, "sweep": {**c["sweep"], "parallel_groups": 1}},
                                                    str(tmp_path / "in_turn"))}
  assert sorted(parallel) == sorted(in_turn) and len(parallel) == 4
  for run_id, row in in_turn.items():
    for key in ("validation_accuracy", "test_accuracy", "test_loss", "config_hash"):
      assert parallel[run_id][key] == row[key], (run_id, key)


def test_restart_skips_finished_runs_and_refuses_a_changed_config(finished_sweep, capsys):
  c, workdir, rows = finished_sweep
  path = os.path.join(workdir, "results.csv")
  before = open(path).read()
  again = sweep.run_sweep(c, workdir)
  assert "4 already in" in capsys.readouterr().out
  assert open(path).read() == before
  assert [r["run_id"] for r in again] == [r["run_id"] for r in rows]
  changed = copy.deepcopy(c)
  changed["train"]["weight_decay"] = 0.0
  with pytest.raises(ValueError, match="holds run attention-d16-L16-kv2-lr1.00e-03-s0 under another config"):
    sweep.run_sweep(changed, workdir)
  assert open(path).read() == before


@pytest.mark.slow  # two more group compilations: ~25 s idle
def test_an_interrupted_group_resumes_to_the_same_results(finished_sweep, tmp_path):
  c, _, rows = finished_sweep
  runs = sweep.expand_grid(c)
  group_dir = str(tmp_path / "group")
  with pytest.raises(trainer.SimulatedKill):
    sweep.train_group(runs, group_dir, _kill_after_steps=20)  # 16 steps per epoch: killed in epoch 2
  resumed = sweep.train_group(runs, group_dir)
  for want, got in zip(rows, resumed):
    for key in ("validation_accuracy", "test_accuracy", "test_loss", "best_epoch", "epochs_run"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)


# ---------------------------------------------------------------------------------------------- Plots


def _synthetic_rows() -> list[dict]:
  """2 mixers × 2 widths × 2 lengths × 2 learning rates × 2 seeds. At lr 1e-3 validation is higher but
  test is lower than at 1e-2, so a plot that selected on test would show different numbers."""
  rows = []
  for mixer, base in (("attention", 0.9), ("base_conv", 0.4)):
    for d_model in (64, 128):
      for seq_len, kv in ((64, 4), (128, 8)):
        for lr, val_shift, test_shift in ((1e-3, 0.05, -0.1), (1e-2, 0.0, 0.0)):
          for seed in (0, 1):
            acc = base + (d_model == 128) * 0.05 - (seq_len == 128) * 0.1
            rows.append(dict(
                run_id=f"{mixer}-{d_model}-{seq_len}-{lr}-{seed}", mixer=mixer, d_model=d_model,
                seq_len=seq_len, num_kv_pairs=kv, learning_rate=lr, seed=seed,
                validation_accuracy=acc + val_shift + 0.01 * seed, test_accuracy=acc + test_shift + 0.02 * seed,
                state_size=d_model * seq_len if mixer == "attention" else 4 * d_model))
  return rows


def test_best_over_learning_rates_selects_on_validation_and_reports_test():
  best = {(p["mixer"], p["d_model"], p["seq_len"]): p for p in sweep.best_over_learning_rates(_synthetic_rows())}
  p = best[("base_conv", 128, 64)]
  assert p["learning_rate"] == 1e-3 and p["seeds"] == 2
  assert p["test_accuracy"] == pytest.approx(0.4 + 0.05 - 0.1 + 0.01)  # mean over seeds at lr 1e-3
  assert p["test_std"] == pytest.approx(0.01)


def test_plots_write_png_and_pdf_with_the_selected_points(tmp_path):
  rows = _synthetic_rows()
  drawn = sweep_plots.figure2(rows, str(tmp_path / "figure2"))
  assert set(drawn) == {(l, kv, m) for l, kv in ((64, 4), (128, 8)) for m in ("attention", "base_conv")}
  widths, accs, stds = zip(*drawn[(128, 8, "attention")])
  assert widths == (64, 128)
  np.testing.assert_allclose(accs, [0.9 - 0.1 - 0.1 + 0.01, 0.9 + 0.05 - 0.1 - 0.1 + 0.01])
  np.testing.assert_allclose(stds, [0.01, 0.01])
  tradeoff = sweep_plots.state_tradeoff(rows, str(tmp_path / "tradeoff"))
  assert [x for x, _, _ in tradeoff[(64, 4, "attention")]] == [64 * 64, 128 * 64]
  for name in ("figure2", "tradeoff"):
    for ext in ("png", "pdf"):
      assert (tmp_path / f"{name}.{ext}").stat().st_size > 1000
  assert "| base_conv | 128 | 64 | 4 | 1.0e-03 |" in sweep_plots.format_best(rows)
  with pytest.raises(ValueError, match="no rows"):
    sweep_plots.figure2([], str(tmp_path / "empty"))


def _mixture_rows() -> list[dict]:
  """attention trained on a {16, 32} mixture and tested per length: 2 learning rates × 3 seeds. At L 32 lr
  1e-3 wins on validation (lr 3e-3 on the mixed validation set), and 2 of its 3 seeds pass 0.99 on test."""
  rows = []
  for lr, val16, val32, tests32 in ((1e-3, 0.97, 0.96, (0.995, 0.99, 0.90)), (3e-3, 0.999, 0.95, (1.0, 1.0, 1.0))):
    for seed, test32 in enumerate(tests32):
      rows.append(dict(
          run_id=f"attention-d64-L16_32-lr{lr:.2e}-s{seed}", mixer="attention", d_model=64, seq_len=16,
          num_kv_pairs=4, learning_rate=lr, seed=seed, validation_accuracy=(val16 + val32) / 2,
          test_accuracy=0.5, validation_slices={"L16_kv4": val16, "L32_kv4": val32},
          test_slices={"L16_kv4": 0.98 + 0.001 * seed, "L32_kv4": test32}, state_size=8192, num_params=100))
  return rows


def test_a_run_trained_on_a_mixture_is_a_point_at_each_tested_length(tmp_path):
  rows = _mixture_rows()
  best = {p["seq_len"]: p for p in sweep.best_over_learning_rates(rows)}
  assert set(best) == {16, 32}
  assert best[16]["learning_rate"] == 3e-3 and best[32]["learning_rate"] == 1e-3  # per length, on validation
  assert best[16]["validation_accuracy"] == pytest.approx(0.999)
  assert best[16]["test_accuracy"] == pytest.approx(0.981) and best[16]["passing"] == 0
  assert best[32]["test_accuracy"] == pytest.approx((0.995 + 0.99 + 0.90) / 3)
  assert best[32]["test_std"] == pytest.approx(np.std([0.995, 0.99, 0.90])) and best[32]["passing"] == 2
  assert best[32]["seeds"] == 3
  drawn = sweep_plots.figure2(rows, str(tmp_path / "figure2"))
  assert set(drawn) == {(16, 4, "attention"), (32, 4, "attention")}
  assert drawn[(32, 4, "attention")][0][:2] == (64, pytest.approx(best[32]["test_accuracy"]))
  table = sweep_plots.format_best(rows)
  assert "| attention | 64 | 32 | 4 | 1.0e-03 | 0.960 | 0.962 | 0.044 | 2/3 | 8,192 |" in table
  assert "| attention | 64 | 16 | 4 | 3.0e-03 | 0.999 | 0.981 | 0.001 | 0/3 | 8,192 |" in table


def test_per_length_keeps_single_length_rows_and_refuses_a_bad_slice_name():
  single = dict(run_id="a", seq_len=64, num_kv_pairs=4, validation_accuracy=0.5, test_accuracy=0.4,
                test_slices={"L64_kv4": 0.4})
  assert sweep.per_length([single, {**single, "test_slices": {}}]) == [single, {**single, "test_slices": {}}]
  with pytest.raises(ValueError, match=r"^results row a: test slice 'x' is not 'L<seq_len>_kv<kv pairs>'$"):
    sweep.per_length([{**single, "test_slices": {"L64_kv4": 0.4, "x": 0.3}}])


def test_results_table_round_trips_through_csv(tmp_path, finished_sweep):
  _, workdir, rows = finished_sweep
  with open(os.path.join(workdir, "results.csv"), newline="") as f:
    header = next(csv.reader(f))
  assert tuple(header) == sweep.RESULT_COLUMNS
  assert isinstance(rows[0]["test_slices"], dict) and "L16_kv2" in rows[0]["test_slices"]
  assert isinstance(rows[0]["d_model"], int) and isinstance(rows[0]["learning_rate"], float)


# ---------------------------------------------------------------------------------------------- Configs


def _figure2_config(scale):
  return figure2.get_config(scale)


def test_figure2_paper_scale_is_zoologys_grid():
  runs = sweep.expand_grid(_figure2_config("paper"))
  assert len(runs) == 7 * 4 * 4 * 4  # mixers × widths × lengths × learning rates: Zoology's 448 runs
  assert {(r.seq_len, r.num_kv_pairs) for r in runs} == {(64, 4), (128, 8), (256, 16), (512, 64)}
  assert sorted({r.learning_rate for r in runs}) == pytest.approx(np.logspace(-4, -2, 4))
  batch = {r.seq_len: r.config["train"]["batch_size"] for r in runs}
  assert batch == {64: 512, 128: 512, 256: 256, 512: 128}
  h3 = next(r for r in runs if r.mixer == "h3" and r.seq_len == 256)
  assert h3.config["model"]["mixer"]["d_state"] == 256
  assert all(r.config["data"]["vocab_size"] == 8192 and r.config["train"]["epochs"] == 64 for r in runs)
  assert len(sweep.group_runs(runs)) == 7 * 4 * 4  # each group: the 4 learning rates


def test_figure2_cpu_scale_trains_one_model_per_mixer_and_width_on_a_mixture_of_lengths():
  runs = sweep.expand_grid(_figure2_config("cpu"))
  assert {r.mixer for r in runs} == {"attention", "base_conv"} and {r.d_model for r in runs} == {64, 128}
  assert len(runs) == 2 * 2 * 3 and {r.seed for r in runs} == {0, 1, 2}  # mixers × widths × seeds
  assert len(sweep.group_runs(runs)) == 2 * 2
  data = runs[0].config["data"]
  assert [(s["seq_len"], s["num_examples"]) for s in data["train_segments"]] == [(16, 4_800), (32, 1_600)]
  assert [s["seq_len"] for s in data["test_segments"]] == [16, 32]
  assert [s["seq_len"] for s in data["validation_segments"]] == [16, 32]
  assert data["fresh_examples"] and runs[0].config["train"]["schedule"] == "cosine"
  attention = next(r for r in runs if r.mixer == "attention").config["model"]
  assert attention["mixer"]["rotary"] and not attention["learned_positions"]
  assert sweep.population(_figure2_config("cpu"))["parallel_groups"] == 2
  with pytest.raises(ValueError, match="figure2 scale must be one of"):
    _figure2_config("tpu")


def test_tradeoff_sweep_puts_each_recurrence_after_a_base_conv_layer():
  module = tradeoff
  runs = sweep.expand_grid(module.get_config("paper"))
  assert {r.d_model for r in runs} == {64, 128, 256}
  gla = next(r for r in runs if r.mixer == "gla")
  first, second = gla.config["model"]["mixer"]["mixers"]
  assert first == {"name": "base_conv", "kernel_size": 3}
  assert second["num_heads"] == 2 and second["conv_size"] == 4
  assert {r.mixer for r in runs} == {"attention", "base_conv", "mamba2", "gla", "delta_net", "gated_delta_net",
                                     "rwkv7"}
  assert len(sweep.expand_grid(module.get_config("cpu"))) == 7 * 3 * 2
