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

  def poisoned(model, batch, k):
    m = real_sums(model, batch, k)
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
