"""The MQAR experiment config builds the runs its docstring and the README describe."""

import pytest

from zoo_jax import config as config_lib
from zoo_jax.configs import mqar


def test_default_config_is_the_readme_first_command_one_model_per_mixer_on_a_mixture_of_lengths():
  config = mqar.get_config()
  assert list(config.runs) == ["attention_L16_32", "base_conv_L16_32"] == list(mqar.get_config("mixed").runs)
  assert tuple(config.sweep.seed) == (0, 1, 2) and not config.sweep.learning_rate  # 3 seeds, one population
  runs = config_lib.expand_runs(config)
  attention, base_conv = runs["attention_L16_32"], runs["base_conv_L16_32"]
  # The measured recipe (configs/mqar.py docstring): cosine decay over 40 epochs of 100 steps, lr 3e-3.
  train = attention["train"]
  assert (train["schedule"], train["learning_rate"], train["epochs"], train["batch_size"]) == ("cosine", 3e-3, 40, 64)
  assert train["early_stop_accuracy"] == 0.995
  segments = attention["data"]["train_segments"]
  assert [(s["seq_len"], s["num_kv_pairs"], s["num_examples"]) for s in segments] == [(16, 4, 4800), (32, 4, 1600)]
  assert sum(s["num_examples"] for s in segments) // train["batch_size"] == 100  # steps per epoch
  for split in ("validation_segments", "test_segments"):  # tested at each length: the table's per-L columns
    assert [s["seq_len"] for s in attention["data"][split]] == [16, 32]
  # A fair comparison: one width, vocabulary, data stream and recipe for both mixers.
  for key in ("train", "data"):
    assert attention[key] == base_conv[key], key
  assert attention["data"]["fresh_examples"] and attention["data"]["vocab_size"] == 128
  assert attention["model"]["d_model"] == base_conv["model"]["d_model"] == 64
  assert attention["model"]["mixer"] == dict(name="attention", num_heads=1, rotary=True)
  assert not attention["model"]["learned_positions"] and base_conv["model"]["mixer"]["name"] == "base_conv"


def test_the_single_runs_keep_their_width_128_base_with_one_seed():
  config = mqar.get_config("attention,base_conv,base_conv_L64")
  assert config.model.d_model == 128 and config.data.vocab_size == 128 and not config.data.fresh_examples
  assert not config.sweep.seed and not config.sweep.learning_rate
  runs = config_lib.expand_runs(config)
  assert [runs[n]["data"]["train_segments"][0]["seq_len"] for n in ("attention", "base_conv_L64")] == [32, 64]
  assert runs["attention"]["model"]["learned_positions"]


def test_runs_of_a_preset_and_other_runs_are_refused_in_one_command():
  for arg in ("attention_L16_32,attention", "attention-L16,base_conv"):
    with pytest.raises(ValueError, match=r"^config argument mixes runs of the `(mixed|quick)` preset .*recipe"):
      mqar.get_config(arg)


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
