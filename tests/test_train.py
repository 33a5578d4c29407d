"""The trainer: sharded step ≡ single-device step, kill-and-resume ≡ uninterrupted, non-finite loss
handling, workdir safety, and the outputs a run leaves behind."""

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from zoo_jax import checkpoint
from zoo_jax import cli
from zoo_jax import config as config_lib
from zoo_jax import tasks
from zoo_jax import train
from zoo_jax import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(mixer=None, **train_overrides):
  """V=64, L=16, kv=2; 256 training examples, batch 32: 8 steps per epoch."""
  cfg = config_lib.defaults().to_dict()
  cfg["data"].update(
      vocab_size=64,
      train_segments=[dict(seq_len=16, num_kv_pairs=2, num_examples=256)],
      validation_segments=[dict(seq_len=16, num_kv_pairs=2, num_examples=64),
                           dict(seq_len=32, num_kv_pairs=4, num_examples=64)],
      test_segments=[dict(seq_len=16, num_kv_pairs=2, num_examples=64)])
  cfg["model"].update(d_model=32, mixer=mixer or dict(name="base_conv", kernel_size=[3, -1]))
  cfg["train"].update(epochs=3, batch_size=32, eval_batch_size=48, learning_rate=3e-3, log_every_steps=4,
                      early_stop_accuracy=2.0)
  cfg["train"].update(train_overrides)
  return cfg


def test_run_leaves_its_outputs(tmp_path):
  summary = train.train_and_evaluate(tiny_config(epochs=2), str(tmp_path))
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    assert (tmp_path / name).exists(), name
  assert os.listdir(tmp_path / "tb"), "no TensorBoard events"
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [8, 16]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train_records] == [4, 8, 12, 16]
  assert all(r["train/tokens_per_sec"] > 0 and r["train/learning_rate"] > 0 for r in train_records)
  assert [r["epoch"] for r in records if "validation/accuracy" in r] == [1, 2]
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["test_accuracy"] == summary["test_accuracy"]
  assert set(on_disk["validation_slices"]) == {"L16_kv2", "L32_kv4"}
  assert on_disk["state_size"] == 32 * 2 + 32 * 32  # short conv k=3 (d·2) + long conv over L_max=32
  assert on_disk["num_params"] > 0 and on_disk["best_epoch"] in (1, 2)
  # The model a notebook loads is the one the summary's test accuracy was measured with.
  model, config = checkpoint.load_for_inference(str(tmp_path))
  test = tasks.build_split(config, "test")
  sums = tasks.mqar_sums(model, {k: jnp.asarray(v) for k, v in
                                 dict(inputs=test.inputs, labels=test.labels).items()}, test.max_labels_per_example)
  np.testing.assert_allclose(float(sums["acc_sum"] / sums["examples"]), summary["test_accuracy"], atol=1e-6)

@pytest.mark.slow  # trains a 2-model population: ~15 s idle
def test_a_population_member_loads_for_inference(tmp_path):
  """A run of several seeds (the README's first command trains such populations) loads one member, by
  index or run id: the model the summary's test accuracy for that member was measured with."""
  summary = train.train_population(tiny_config(epochs=1), str(tmp_path), seeds=[0, 1], learning_rates=[3e-3],
                                   name="bc")
  ids = [m["run_id"] for m in summary["members"]]
  for member, i in ((1, 1), (ids[0], 0)):
    model, config = checkpoint.load_for_inference(str(tmp_path), member=member)
    assert config.seed == summary["members"][i]["seed"]
    test = tasks.build_split(config, "test")
    sums = tasks.mqar_sums(model, dict(inputs=jnp.asarray(test.inputs), labels=jnp.asarray(test.labels)),
                           test.max_labels_per_example)
    np.testing.assert_allclose(float(sums["acc_sum"] / sums["examples"]), summary["members"][i]["test_accuracy"],
                               atol=1e-6)
  for bad in (None, 2, "bc-nope"):
    with pytest.raises(ValueError, match=r"holds a population of 2 models: member must be an index in \[0, 1\]"):
      checkpoint.load_for_inference(str(tmp_path), member=bad)


@pytest.mark.slow  # 8-27 s of training; keeps the default suite under 15 min
def test_kill_and_resume_equals_uninterrupted(tmp_path):
  cfg = tiny_config(checkpoint_every_steps=4)
  whole = train.train_and_evaluate(cfg, str(tmp_path / "whole"))
  # Killed at step 10 (mid epoch 2): the newest checkpoint is step 8, so steps 9-10 are redone.
  with pytest.raises(trainer.SimulatedKill):
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"), _kill_after_steps=10)
  resumed = train.train_and_evaluate(cfg, str(tmp_path / "resumed"))
  for key in ("validation_accuracy", "validation_loss", "test_accuracy", "test_loss", "best_epoch", "steps"):
    assert resumed[key] == whole[key], key
  chex.assert_trees_all_equal(resumed["test_slices"], whole["test_slices"])
  events = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert {"step": 8, "event": "resume"} in events

@pytest.mark.slow  # 8-27 s of training; keeps the default suite under 15 min

def test_rerun_of_a_finished_run_trains_nothing_more(tmp_path):
  first = train.train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
  again = train.train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
  assert again["steps"] == first["steps"] == 8
  assert again["test_accuracy"] == first["test_accuracy"]

@pytest.mark.slow  # 8-27 s of training; keeps the default suite under 15 min

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  cfg = tiny_config()
  with pytest.raises(trainer.SimulatedKill):
    train.train_and_evaluate(cfg, str(tmp_path), _kill_after_steps=8)
  good = sorted(os.listdir(tmp_path / "checkpoints"))
  real_sums = tasks.mqar_sums

  def poisoned(model, batch, k, dropout_key=None):
    m = real_sums(model, batch, k, dropout_key)
    return {**m, "loss_sum": m["loss_sum"] * jnp.nan}

  monkeypatch.setattr(tasks, "mqar_sums", poisoned)
  with pytest.raises(train.NonFiniteLossError, match="non-finite loss.*last good checkpoint"):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == good
  monkeypatch.setattr(tasks, "mqar_sums", real_sums)
  summary = train.train_and_evaluate(cfg, str(tmp_path))  # resumes from the good checkpoint
  assert np.isfinite(summary["test_loss"]) and summary["steps"] == 24

@pytest.mark.slow  # 8-27 s of training; keeps the default suite under 15 min

def test_workdir_with_another_config_is_refused_and_left_alone(tmp_path):
  train.train_and_evaluate(tiny_config(epochs=1), str(tmp_path))
  before = {p: (tmp_path / p).read_bytes() for p in ("config.json", "summary.json", "metrics.jsonl")}
  with pytest.raises(checkpoint.CheckpointError, match="different config"):
    train.train_and_evaluate(tiny_config(epochs=1, learning_rate=1e-2), str(tmp_path))
  assert before == {p: (tmp_path / p).read_bytes() for p in before}


def test_bad_config_fails_before_the_workdir_is_touched(tmp_path):
  with pytest.raises(ValueError, match=r"^train\.learning_rate must be a finite number in"):
    train.train_and_evaluate(tiny_config(learning_rate=-1.0), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


_SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import json
    import jax, jax.numpy as jnp, numpy as np
    from zoo_jax import config as config_lib, sharding, tasks, trainer
    assert jax.device_count() == 8, jax.devices()

    def run(mesh):
      cfg, model_cfg = config_lib.resolve({cfg!r})
      task = tasks.MQARTask(cfg, [0])
      member = trainer.Member("run", 0, cfg.train.learning_rate, cfg.train.weight_decay)
      graphdef, state, sh, tx, unit = trainer.init_state(model_cfg, cfg.train, [member], 100, mesh)
      step_fn = trainer.make_train_step(task, graphdef, tx, unit, sh)
      active = jax.device_put(np.ones(1, bool), sh.member)
      losses = []
      for batch in task.train_batches(0):
        if len(losses) == task.steps_per_epoch:
          break
        state, m = step_fn(state, active, sharding.put(batch, sh.batch))
        losses.append(float(m["loss"][0]))
      kernel = state["params"]["embed"]["embedding"]
      spec = tuple(getattr(kernel.sharding, "spec", ("single-device",)))
      return losses, spec, np.asarray(kernel[0]).tolist()

    single = run(sharding.make_mesh(devices=jax.devices()[:1]))
    sharded = run(sharding.make_mesh(data=4, model=2))
    print(json.dumps(dict(single=single, sharded=sharded)))
""")


@pytest.mark.slow  # 8-27 s of training; keeps the default suite under 15 min
@pytest.mark.parametrize("mixer", [dict(name="attention", num_heads=2), dict(name="base_conv", kernel_size=[3, -1])])
def test_sharded_step_matches_single_device_on_8_simulated_devices(mixer):
  cfg = tiny_config(mixer=mixer)
  cfg["model"]["state_mixer"] = "mlp"  # exercises the `mlp` rule too
  script = _SHARDED_SCRIPT.format(cfg=cfg)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  single_losses, _, single_embed = result["single"]
  sharded_losses, sharded_spec, sharded_embed = result["sharded"]
  assert sharded_spec == [None, "model", None]  # the vocabulary really is split over `model`
  assert len(single_losses) == 8
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  # Adam divides by sqrt(v): reduction-order noise in near-zero gradients moves a few weights by up to
  # ~1e-5 after 8 steps of lr 3e-3 (each step moves a weight by up to lr).
  np.testing.assert_allclose(np.asarray(sharded_embed), np.asarray(single_embed), atol=1e-4)

@pytest.mark.slow  # 8-27 s of training; keeps the default suite under 15 min

def test_mqar_results_table_merges_other_runs_and_names_an_unreadable_summary(tmp_path):
  """experiments/mqar.py's results.md: the run just trained, another finished run already in the workdir,
  and one warning line (not a traceback, not a lost table) for a summary.json cut off mid-write."""
  config = tmp_path / "tiny.py"  # the reliability bench's tiny run: 64 steps of a 2-layer d 32 attention
  config.write_text(cli.load_module(os.path.join(REPO, "experiments", "bench_reliability.py")).TINY_CONFIG)
  workdir = tmp_path / "work"
  (workdir / "broken").mkdir(parents=True)
  (workdir / "broken" / "summary.json").write_text('{"validation_accuracy": 0.5, "test_acc')
  other = dict(d_model=8, num_params=1234, state_size=56, validation_accuracy=0.25, test_accuracy=0.125,
               test_slices={"L16_kv2": 0.125}, best_epoch=1, tokens_per_sec=1000.0, train_seconds=3.0)
  (workdir / "other").mkdir()
  (workdir / "other" / "summary.json").write_text(json.dumps(other))
  res = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "mqar.py"), f"--config={config}:attention",
                        f"--workdir={workdir}"], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "broken/summary.json left out of the table" in warnings[0], warnings
  table = (workdir / "results.md").read_text().splitlines()
  assert [row.split("|")[1].strip() for row in table[2:]] == ["attention", "other"], table
  assert "| 0.250 | 0.125 | 0.125 |" in table[3]
  assert not [p for p in os.listdir(workdir / "attention") if ".tmp" in p]


# ---------------------------------------------------------------------------------------------- Seeds × learning rates


def _row(lr, seed, validation, test):
  return dict(learning_rate=lr, seed=seed, validation_accuracy=validation, test_accuracy=test,
              test_slices={"L16_kv2": test}, best_epoch=seed + 1, epochs_run=3, status="ok", num_params=10,
              state_size=20, tokens_per_sec=1.0, train_seconds=2.0)


def test_population_summary_chooses_the_learning_rate_on_mean_validation_then_reports_test_over_seeds():
  # lr 1e-3 has the best single validation score (0.99) but the lower mean; lr 3e-3 is chosen on its mean,
  # although lr 1e-3 has the better test accuracy: selection never looks at test.
  rows = [_row(1e-3, 0, 0.99, 1.0), _row(1e-3, 1, 0.30, 1.0), _row(1e-3, 2, 0.30, 1.0),
          _row(3e-3, 0, 0.98, 0.995), _row(3e-3, 1, 0.97, 0.97), _row(3e-3, 2, 0.96, 0.99),
          _row(1e-2, 0, float("nan"), float("nan")), _row(1e-2, 1, 1.0, 1.0), _row(1e-2, 2, 1.0, 1.0)]
  s = train.summarize_population(rows)
  assert s["learning_rate"] == 3e-3 and s["learning_rates"] == [1e-3, 3e-3, 1e-2]
  assert s["validation_accuracy"] == pytest.approx(0.97)  # lr 1e-2's diverged seed counts as 0: mean 0.667
  assert s["test_accuracy"] == pytest.approx(np.mean([0.995, 0.97, 0.99]))
  assert s["test_std"] == pytest.approx(np.std([0.995, 0.97, 0.99]))
  assert (s["seeds_solved"], s["num_seeds"], s["seeds"]) == (2, 3, [0, 1, 2])
  assert s["best_epoch"] == [1, 2, 3] and s["test_slices"]["L16_kv2"] == pytest.approx(s["test_accuracy"])
  assert len(s["members"]) == 9


@pytest.mark.slow  # two 2×2 populations and two single runs of the tiny config: ~30 s idle
def test_seeds_by_learning_rates_population_equals_the_same_runs_trained_one_by_one(tmp_path):
  cfg = tiny_config(dict(name="attention"), epochs=2, early_stop_accuracy=0.2)
  summary = train.train_population(cfg, str(tmp_path / "population"), seeds=[0, 1],
                                   learning_rates=[1e-3, 3e-3], name="attention")
  by_key = {(m["learning_rate"], m["seed"]): m for m in summary["members"]}
  assert len(by_key) == 4 and all(m["group_size"] == 4 for m in by_key.values())
  for lr, seed in ((1e-3, 0), (3e-3, 1)):  # both the seed and the injected learning rate differ from member 0
    single = train.train_and_evaluate(config_lib.deep_merge(cfg, {"seed": seed, "train": {"learning_rate": lr}}),
                                      str(tmp_path / f"single-{lr}-{seed}"))
    member = by_key[(lr, seed)]
    for key in ("best_epoch", "epochs_run", "stopped_early"):
      assert member[key] == single[key], key
    np.testing.assert_allclose(member["test_loss"], single["test_loss"], rtol=1e-5)
    np.testing.assert_allclose(member["test_accuracy"], single["test_accuracy"], atol=1e-6)
    np.testing.assert_allclose(member["validation_accuracy"], single["validation_accuracy"], atol=1e-6)
  assert summary == {**train.summarize_population(summary["members"]), **{
      k: summary[k] for k in ("d_model", "seq_len", "num_kv_pairs", "mixer", "wall_seconds", "devices", "backend")}}
  assert json.loads((tmp_path / "population" / "summary.json").read_text())["learning_rate"] == summary["learning_rate"]


TWO_LENGTHS_CONFIG = '''
from zoo_jax.configs.mqar import get_config as _mqar_config


def get_config(arg=None):
  c = _mqar_config("attention")
  segment = lambda l, n: [dict(seq_len=l, num_kv_pairs=2, num_examples=n)]
  c.data.vocab_size = 64
  c.data.train_segments, c.data.validation_segments, c.data.test_segments = segment(16, 256), segment(16, 32), segment(16, 32)
  c.model.d_model = 16
  c.train.update(epochs=1, batch_size=32, eval_batch_size=32, log_every_steps=8)
  run = c.runs.attention
  c.runs = {"attention-L16": dict(model=run.model, data={}),
            "attention-L24": dict(model=run.model, data=dict(train_segments=segment(24, 256),
                                  validation_segments=segment(24, 32), test_segments=segment(24, 32)))}
  return c
'''


@pytest.mark.slow  # 3 subprocesses, two 2-seed populations of the tiny model: ~40 s idle
def test_mqar_binary_trains_seeds_as_a_population_writes_the_table_and_plot_and_refuses_bad_axes(tmp_path):
  config = tmp_path / "two_lengths.py"
  config.write_text(TWO_LENGTHS_CONFIG)
  workdir = tmp_path / "work"
  binary = [sys.executable, os.path.join(REPO, "experiments", "mqar.py"), f"--config={config}",
            f"--workdir={workdir}"]
  for bad, message in (("--config.sweep.seed=[0,-1]", "error: sweep.seed entries must be non-negative"),
                       ("--config.sweep.learning_rate=[1e-3,20.0]", "error: sweep.learning_rate[1]:")):
    res = subprocess.run(binary + [bad], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(message), res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not workdir.exists()
  res = subprocess.run(binary + ["--config.sweep.seed=[0,1]"], capture_output=True, text=True, timeout=600,
                       cwd=REPO)
  assert res.returncode == 0, res.stderr[-3000:]
  table = (workdir / "results.md").read_text().splitlines()
  assert [row.split("|")[1].strip() for row in table[2:]] == ["attention-L16", "attention-L24"], table
  for name, row in zip(("attention-L16", "attention-L24"), table[2:]):
    summary = json.loads((workdir / name / "summary.json").read_text())
    assert summary["num_seeds"] == 2 and len(summary["members"]) == 2
    assert f"{summary['test_accuracy']:.3f} ± {summary['test_std']:.3f}" in row
    assert f"| {summary['seeds_solved']}/2 |" in row
  assert (workdir / "accuracy_vs_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fresh_examples_are_a_pure_function_of_seed_and_step_split_over_segments_in_proportion():
  from zoo_jax.data import mqar  # pylint: disable=g-import-not-at-top
  segments = [dict(seq_len=16, num_kv_pairs=2, num_examples=300), dict(seq_len=24, num_kv_pairs=4, num_examples=100)]
  batch = mqar.fresh_batch(segments, 32, vocab_size=64, seed=3, step=7)
  again = mqar.fresh_batch(segments, 32, vocab_size=64, seed=3, step=7)
  assert all(np.array_equal(batch[k], again[k]) for k in batch)
  assert batch["inputs"].shape == (32, 24) and sorted(np.bincount(batch["seq_len"])[[16, 24]]) == [8, 24]
  short = batch["seq_len"] == 16
  assert (batch["labels"][short, 16:] == mqar.IGNORE_INDEX).all() and (batch["inputs"][short, 16:] == 0).all()
  assert ((batch["labels"] != mqar.IGNORE_INDEX).sum(axis=1) == batch["num_kv_pairs"]).all()
  for other in (mqar.fresh_batch(segments, 32, vocab_size=64, seed=3, step=8),
                mqar.fresh_batch(segments, 32, vocab_size=64, seed=4, step=7)):
    assert not np.array_equal(other["inputs"], batch["inputs"])
  # The task draws each model's batch from its own seed and the step, from any start step (resume).
  cfg, _ = config_lib.resolve(config_lib.deep_merge(tiny_config(), {"data": {"fresh_examples": True}}))
  task = tasks.MQARTask(cfg, [0, 5])
  first = next(iter(task.train_batches(6)))
  for i, seed in enumerate((0, 5)):
    want = mqar.fresh_batch(cfg.data.train_segments, 32, vocab_size=64, seed=seed, step=6)
    assert np.array_equal(first["inputs"][i], want["inputs"])
  assert len(list(task.train_batches(0))) == task.total_steps
