"""The MQAR experiment config builds the runs its docstring and the README describe."""

import pytest

from zoo_jax import config as config_lib
from zoo_jax.configs import mqar


def test_default_config_is_the_readme_first_command_one_seed_per_run():
  config = mqar.get_config()
  assert sorted(config.runs) == ["attention", "base_conv", "base_conv_L64"]
  assert config.model.d_model == 128 and config.data.vocab_size == 128 and not config.data.fresh_examples
  assert not config.sweep.seed and not config.sweep.learning_rate
  runs = config_lib.expand_runs(config)
  assert [runs[n]["data"]["train_segments"][0]["seq_len"] for n in ("attention", "base_conv_L64")] == [32, 64]
  assert runs["attention"]["model"]["learned_positions"]


def test_quick_preset_trains_attention_and_base_conv_at_two_lengths_with_three_seeds_and_one_recipe():
  config = mqar.get_config("quick")
  assert sorted(config.runs) == sorted(f"{m}-L{l}" for m in ("attention", "base_conv") for l, _ in
                                       mqar.QUICK_LENGTHS)
  assert tuple(config.sweep.seed) == mqar.QUICK_SEEDS == (0, 1, 2) and not config.sweep.learning_rate
  runs = config_lib.expand_runs(config)
  lengths = {name: run["data"]["train_segments"][0]["seq_len"] for name, run in runs.items()}
  assert sorted(set(lengths.values())) == [16, 32]
  for name, run in runs.items():
    # A fair comparison: every run has the same width, vocabulary, data stream and training recipe.
    assert run["model"]["d_model"] == mqar.QUICK_WIDTH and run["data"]["vocab_size"] == 128
    assert run["data"]["fresh_examples"] and run["train"] == runs["attention-L16"]["train"]
    for split in ("validation_segments", "test_segments"):
      assert run["data"][split][0]["seq_len"] == lengths[name]
  train = runs["attention-L32"]["train"]
  assert (train["schedule"], train["learning_rate"], train["epochs"]) == ("constant", 3e-3, mqar.QUICK_EPOCHS)
  assert runs["attention-L32"]["model"]["mixer"]["name"] == "attention"
  assert runs["base_conv-L32"]["model"]["mixer"]["name"] == "base_conv"


def test_unknown_run_is_one_line_naming_the_accepted_names():
  with pytest.raises(ValueError, match=r"^config argument names unknown run 'atention'; accepted: .*'quick'"):
    mqar.get_config("atention")
