"""Run configs: `defaults()` is the schema, `validate` names the bad key in one line, `expand_runs` merges
each run's partial config into the base and validates every run before any trains."""

import pytest

from zoo_jax import config as config_lib
from zoo_jax import mixers


def base() -> dict:
  cfg = config_lib.defaults().to_dict()
  segments = [dict(seq_len=16, num_kv_pairs=2, num_examples=64)]
  cfg["data"].update(vocab_size=64, train_segments=segments, validation_segments=segments,
                     test_segments=segments)
  return cfg


def test_expand_runs_deep_merges_each_run_and_replaces_the_mixer_whole():
  cfg = base()
  cfg["model"]["mixer"] = dict(name="base_conv", kernel_size=3)
  cfg["runs"] = {
      "a": dict(model=dict(mixer=dict(name="attention"), learned_positions=True)),
      "b": dict(data=dict(vocab_size=128), train=dict(learning_rate=1e-2)),
  }
  runs = config_lib.expand_runs(cfg)
  assert list(runs) == ["a", "b"]
  assert runs["a"]["model"]["mixer"] == {"name": "attention"}  # not merged with base_conv's kernel_size
  assert runs["a"]["model"]["learned_positions"] is True and runs["a"]["model"]["d_model"] == 64
  assert runs["b"]["data"]["vocab_size"] == 128 and runs["b"]["data"]["train_segments"][0]["seq_len"] == 16
  assert runs["b"]["train"]["learning_rate"] == 1e-2 and runs["a"]["train"]["learning_rate"] == 1e-3
  assert "runs" not in runs["a"]


def test_without_runs_the_config_is_one_run_and_errors_carry_no_run_name():
  assert list(config_lib.expand_runs(base())) == ["run"]
  cfg = base()
  cfg["train"]["epochs"] = 0
  with pytest.raises(ValueError, match=r"^train\.epochs must be"):
    config_lib.expand_runs(cfg)


@pytest.mark.parametrize("run,message", [
    (dict(modle=dict(d_model=8)), r"^runs\.x\.modle is not a config key"),
    (dict(model=dict(d_model=0)), r"^runs\.x: model\.d_model must be a positive integer"),
    (dict(train=dict(epochs=0)), r"^runs\.x: train\.epochs must be an integer >= 1"),
    (dict(data=dict(vocab_size=16)), r"^runs\.x: data\.train_segments\[0\]: .*vocab_size must be > seq_len"),
])
def test_a_bad_run_is_a_one_line_error_naming_run_and_key(run, message):
  cfg = base()
  cfg["runs"] = {"ok": {}, "x": run}
  with pytest.raises(ValueError, match=message) as err:
    config_lib.expand_runs(cfg)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "batch_size", 0, r"^train\.batch_size must be an integer >= 1"),
    ("train", "learning_rate", 0.0, r"^train\.learning_rate must be in \(0\.0, 10\.0\]"),
    ("train", "early_stop_accuracy", -0.1, r"^train\.early_stop_accuracy must be in"),
    ("train", "warmup", 10, r"^train\.warmup is not a config key"),
    ("mesh", "data", 0, r"^mesh\.data must be -1 or an integer >= 1"),
    ("mesh", "model", 0, r"^mesh\.model must be an integer >= 1"),
    ("data", "power_a", 0.0, r"power_a"),
])
def test_validate_names_the_key_and_the_accepted_range(section, key, value, message):
  cfg = base()
  cfg[section][key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(cfg)


def test_every_experiment_run_validates_and_every_mixer_has_one(mqar_configs):
  runs = config_lib.expand_runs(mqar_configs.get_config(",".join(mqar_configs.RUNS)))
  assert set(runs) == set(mqar_configs.RUNS)
  used = set()
  for cfg in runs.values():
    mixer = cfg["model"]["mixer"]
    used.add(mixer["name"])
    used.update(m["name"] for m in mixer.get("mixers", []))
  assert used == set(mixers.names())
  figure2 = {"attention", "base_conv", "hyena", "h3", "rwkv", "based", "mamba"}
  assert figure2 <= set(runs)
  assert runs["h3"]["model"]["mixer"]["d_state"] == runs["h3"]["data"]["train_segments"][0]["seq_len"]
