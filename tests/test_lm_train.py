"""LM pretraining: config errors, rotary attention, resume mid-epoch, sharded and multi-process steps."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo_jax import lm
from zoo_jax import mixers
from zoo_jax import tasks
from zoo_jax import trainer
from zoo_jax.analysis import ar_hits
from zoo_jax.configs import lm as lm_configs
from zoo_jax.data import text
from zoo_jax.mixers import attention
from tests.test_lm_data import random_docs, write_shard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small Pile-format manual directory and a data dir shared by the tests of this module."""
  root = tmp_path_factory.mktemp("lm")
  rng = np.random.default_rng(0)
  write_shard(str(root / "manual" / "train" / "00.jsonl.zst"), random_docs(rng, 60))
  write_shard(str(root / "manual" / "val.jsonl.zst"), random_docs(rng, 8))
  return root


def tiny_lm_config(corpus, **train) -> dict:
  cfg = lm.defaults().to_dict()
  cfg["data"].update(manual_dir=str(corpus / "manual"), data_dir=str(corpus / "data"), seq_len=16)
  cfg["model"].update(d_model=16, n_layers=1, mixer=dict(name="attention", num_heads=2, rotary=True),
                      state_mixer="glu", state_mixer_hidden_mult=2)
  cfg["train"].update(dict(steps=6, batch_size=4, eval_batch_size=4, eval_every_steps=3, eval_max_rows=8,
                           log_every_steps=1, checkpoint_every_steps=2, warmup_steps=1, learning_rate=1e-2),
                      **train)
  return cfg


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


# ---------------------------------------------------------------------------------------------- Config


@pytest.mark.parametrize("override, message", [
    (dict(train=dict(steps=0)), r"^train\.steps must be an integer >= 1, got 0$"),
    (dict(data=dict(seq_len=1)), r"^data\.seq_len must be an integer >= 2, got 1$"),
    (dict(data=dict(vocab=5)), r"^data\.vocab is not a config key"),
    (dict(mesh=dict(fsdp=0)), r"^mesh\.fsdp must be an integer >= 1"),
    (dict(data=dict(tokenizer="/nonexistent/tok.json")), r"^data\.tokenizer: /nonexistent/tok\.json does not exist"),
    (dict(model=dict(mixer=dict(name="attention", rotary_base=0.5))), r"rotary_base must be > 1"),
])
def test_bad_config_fails_before_the_workdir_is_touched(tmp_path, corpus, override, message):
  cfg = tiny_lm_config(corpus)
  for section, values in override.items():
    cfg[section].update(values)
  with pytest.raises(ValueError, match=message):
    lm.train_lm(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_presets_validate():
  module = lm_configs
  sizes = {}
  for name in module.PRESETS:
    _, model_cfg, _ = lm.resolve(module.get_config(name))
    sizes[name] = model_cfg
  assert sizes["attention_125m"].vocab_size == 50304 and sizes["attention_125m"].n_layers == 12
  assert (sizes["attention_360m"].d_model, sizes["attention_360m"].n_layers) == (1024, 24)


# ---------------------------------------------------------------------------------------------- Rotary


def test_rotary_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

  def score(tq, tk):
    rq = attention.apply_rotary(q, jnp.array([[tq]]), 10000.0)
    rk = attention.apply_rotary(k, jnp.array([[tk]]), 10000.0)
    return float((rq * rk).sum())

  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
  np.testing.assert_allclose(score(0, 0), float((q * k).sum()), rtol=1e-6)  # position 0: no rotation
  assert abs(score(5, 2) - score(5, 3)) > 1e-3
  np.testing.assert_allclose(jnp.linalg.norm(attention.apply_rotary(q, jnp.array([[7]]), 10000.0)),
                             jnp.linalg.norm(q), rtol=1e-6)  # a rotation


def test_rotary_attention_recurrent_equals_parallel_and_default_tree_unchanged():
  rng = np.random.default_rng(1)
  x = jnp.asarray(30 * rng.normal(size=(2, 8, 16)), jnp.float32)  # large enough for non-uniform attention
  build = lambda **h: mixers.build(dict(name="attention", num_heads=2, **h), d_model=16, seq_len=8, layer_idx=0,
                                   n_layers=1, rngs=nnx.Rngs(0))
  rotary, plain = build(rotary=True), build()
  graphdef, params = nnx.split(rotary)

  @jax.jit
  def recurrent(params, x_bld):
    m = nnx.merge(graphdef, params)
    state, ys = m.init_state(x_bld.shape[0]), []
    for t in range(x_bld.shape[1]):
      state, y = m.step(state, x_bld[:, t])
      ys.append(y)
    return jnp.stack(ys, 1)

  y_rotary, y_plain = np.asarray(rotary(x)), np.asarray(plain(x))
  np.testing.assert_allclose(recurrent(params, x), y_rotary, atol=1e-5 * np.abs(y_rotary).max())
  # The same weights: rotary changes the output except at position 0 (no rotation there).
  np.testing.assert_allclose(y_rotary[:, 0], y_plain[:, 0], rtol=1e-5, atol=1e-7)
  assert np.abs(y_rotary[:, 1:] - y_plain[:, 1:]).max() > 0.05 * np.abs(y_plain).max()
  assert jax.tree.structure(nnx.state(rotary, nnx.Param)) == jax.tree.structure(nnx.state(plain, nnx.Param))


# ---------------------------------------------------------------------------------------------- Training


def test_lm_loss_is_the_next_token_cross_entropy_of_every_position():
  logits_blv = jax.random.normal(jax.random.key(0), (2, 6, 11))
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % 11

  class Fixed:  # a "model" whose logits are given
    def __call__(self, tokens_bl):
      return logits_blv

  logp = tasks.token_logprobs(Fixed(), jnp.asarray(tokens))
  want = jnp.take_along_axis(jax.nn.log_softmax(logits_blv[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(logp, want, rtol=1e-6)
  task = object.__new__(tasks.LMTask)  # the loss needs no data
  loss, _ = task.loss(Fixed(), {"tokens": jnp.asarray(tokens)})
  np.testing.assert_allclose(loss, -want.mean(), rtol=1e-6)


def test_trained_batches_are_every_process_rows_of_each_global_batch(corpus):
  cfg = lm.resolve(tiny_lm_config(corpus, steps=50))[0]  # ~42 steps per epoch: replay crosses an epoch
  source = lm.prepare_data(cfg, log=lambda line: None)["train"]
  replayed = list(lm.trained_batches(source, cfg, 45))
  num_epochs = 2  # LMTask's: ceil((steps + 1) * batch / rows)
  per_process = [text.train_batches(source, batch_size=4, seed=cfg.seed, num_epochs=num_epochs,
                                    process_index=p, process_count=2) for p in range(2)]
  assert len(replayed) == 45
  for tokens_bl in replayed:
    np.testing.assert_array_equal(tokens_bl, np.concatenate([next(it)["tokens"] for it in per_process]))
  assert not np.array_equal(replayed[0], replayed[1])


@pytest.mark.slow
def test_resume_mid_epoch_gives_the_same_next_batches(tmp_path, corpus):
  # ~42 steps per epoch: the kill at step 3 is mid-epoch; checkpoints at steps 2, 4, 6, evaluation at 6.
  cfg = tiny_lm_config(corpus, eval_every_steps=6)
  seen_full, seen_resumed = [], []
  summary = lm.train_lm(cfg, str(tmp_path / "full"), _record_batches=seen_full)
  with pytest.raises(trainer.SimulatedKill):
    lm.train_lm(cfg, str(tmp_path / "resumed"), _kill_after_steps=3, _record_batches=seen_resumed)
  assert [s for s, _ in seen_resumed] == [0, 1, 2]
  seen_resumed.clear()
  lm.train_lm(cfg, str(tmp_path / "resumed"), _record_batches=seen_resumed)
  # The last checkpoint was at step 2: steps 2.. are replayed with the same batches.
  assert [s for s, _ in seen_resumed] == [2, 3, 4, 5]
  for (s, tokens), (s_full, tokens_full) in zip(seen_resumed, seen_full[2:]):
    assert s == s_full
    np.testing.assert_array_equal(tokens, tokens_full)
  n_rows = summary["steps"] * 4
  assert len({t.tobytes() for _, b in seen_full for t in b}) > n_rows // 2  # shuffled rows, not one repeated
  full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
  assert sorted(full) == list(range(1, 7))
  np.testing.assert_allclose([resumed[s] for s in range(3, 7)], [full[s] for s in range(3, 7)], rtol=1e-5)
  assert full[6] < full[1]  # it learns
  # The AR-hit analysis's inputs, in the interface's layout.
  tokens, logprobs = ar_hits.load_eval(str(tmp_path / "full" / "ar_eval.npz"))
  assert tokens.shape == logprobs.shape == (8, 16)
  assert np.isnan(logprobs[:, 0]).all() and np.isfinite(logprobs[:, 1:]).all() and (logprobs[:, 1:] <= 0).all()
  np.testing.assert_allclose(-logprobs[:, 1:].mean(), summary["validation_loss"], rtol=1e-5)
  counts = ar_hits.BigramCounts.load(str(tmp_path / "full" / "bigram_counts.npz"))
  assert counts.vocab_size == 50304 and counts.counts.sum() == counts.num_tokens - counts.num_tokens // 16
  for name in ("config.json", "summary.json", "tb"):
    assert (tmp_path / "full" / name).exists()
  # Bigram counts: exactly the batches trained on, the killed run's steps 0, 1 and the resumed run's 2..5
  # (the killed run's step 2 was trained again after the resume; its first try is not counted twice).
  trained = {s: tokens for s, tokens in seen_full}
  want = ar_hits.count_bigrams(np.concatenate([trained[s] for s in range(summary["steps"])]), 50304)
  assert want.num_tokens == 6 * 4 * 16
  train_rows = len(lm.prepare_data(lm.resolve(cfg)[0], log=lambda line: None)["train"])
  assert train_rows * 16 > 2 * want.num_tokens, "the split must be larger than what was trained on"
  for run in ("full", "resumed"):
    counts = ar_hits.BigramCounts.load(str(tmp_path / run / "bigram_counts.npz"))
    assert counts.eot_id == 50256 and counts.num_tokens == want.num_tokens
    np.testing.assert_array_equal(counts.codes, want.codes)
    np.testing.assert_array_equal(counts.counts, want.counts)


_SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import json
    import jax, jax.numpy as jnp, numpy as np
    from zoo_jax import lm, sharding, tasks, trainer
    assert jax.device_count() == 8, jax.devices()
    cfg, model_cfg, _ = lm.resolve({cfg!r})
    tokens = np.random.default_rng(0).integers(0, 50257, size=(4, 1, 8, 16)).astype(np.int32)
    task = object.__new__(tasks.LMTask)  # its loss needs no data

    def run(mesh):
      member = trainer.Member("run", 0, cfg.train.learning_rate, cfg.train.weight_decay)
      graphdef, state, sh, tx, unit = trainer.init_state(model_cfg, cfg.train, [member], 10, mesh)
      step_fn = trainer.make_train_step(task, graphdef, tx, unit, sh)
      active, losses = jax.device_put(np.ones(1, bool), sh.member), []
      for t in tokens:
        state, m = step_fn(state, active, sharding.put(dict(tokens=t), sh.batch))
        losses.append(float(m["loss"][0]))
      spec = tuple(getattr(state["params"]["embed"]["embedding"].sharding, "spec", ("single-device",)))
      return losses, spec

    single = run(sharding.make_mesh(devices=jax.devices()[:1]))
    sharded = run(sharding.make_mesh(data=2, fsdp=2, model=2))
    print(json.dumps(dict(single=single, sharded=sharded)))
""")


@pytest.mark.slow
def test_sharded_step_matches_single_device_on_8_simulated_devices(corpus):
  cfg = tiny_lm_config(corpus)
  cfg["model"]["mixer"]["num_heads"] = 2
  script = _SHARDED_SCRIPT.format(cfg=cfg)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  (single, _), (sharded, spec) = result["single"], result["sharded"]
  assert spec == [None, "model", "fsdp"]  # vocabulary over `model`, embedding width over `fsdp`
  np.testing.assert_allclose(sharded, single, rtol=2e-5)
  assert single[-1] < single[0]


_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    from zoo_jax import lm
    lm.init_distributed({address!r}, {n}, int(sys.argv[1]))
    assert jax.process_count() == {n} and jax.device_count() == {n}, (jax.process_count(), jax.devices())
    lm.train_lm({cfg!r}, {workdir!r})
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_processes(cfg, workdir, n):
  script = _PROCESS_SCRIPT.format(address=f"127.0.0.1:{_free_port()}", n=n, cfg=cfg, workdir=workdir)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for i in range(n)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_processes_train_with_the_same_losses_as_one(tmp_path, corpus):
  cfg = tiny_lm_config(corpus, steps=4, eval_every_steps=4, checkpoint_every_steps=2)
  lm.prepare_data(lm.resolve(cfg)[0])  # built once, before the processes start
  _run_processes(cfg, str(tmp_path / "one"), 1)
  _run_processes(cfg, str(tmp_path / "two"), 2)
  one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert sorted(one) == sorted(two) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
  summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
  assert summaries[1]["processes"] == 2 and summaries[1]["devices"] == 2
  counts = [ar_hits.BigramCounts.load(str(tmp_path / d / "bigram_counts.npz")) for d in ("one", "two")]
  assert counts[1].num_tokens == counts[0].num_tokens == 4 * 4 * 16  # every row of each global batch
  np.testing.assert_array_equal(counts[1].counts, counts[0].counts)
  np.testing.assert_allclose(summaries[1]["validation_loss"], summaries[0]["validation_loss"], rtol=1e-5)
