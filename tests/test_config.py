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
  cfg["train"].update(batch_size=16, eval_batch_size=16)  # 4 steps an epoch
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
    (dict(model=dict(d_model=0)), r"^runs\.x: model\.d_model must be an integer >= 1, got 0$"),
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
    ("train", "learning_rate", 0.0, r"^train\.learning_rate must be a finite number in \(0, 10\], got 0\.0$"),
    ("train", "early_stop_accuracy", -0.1, r"^train\.early_stop_accuracy must be a finite number in \[0, 2\]"),
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
  presets = [mqar_configs.QUICK_RUNS, mqar_configs.MIXED_RUNS]  # each trains by its own base: one command each
  single = [n for n in mqar_configs.RUNS if not any(n in p for p in presets)]
  runs = {}
  for names in (single, *presets):
    runs.update(config_lib.expand_runs(mqar_configs.get_config(",".join(names))))
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


# ------------------------------------------------------------------------------------- the typed schema


@pytest.mark.parametrize("path,value,message", [
    (("train", "epochs"), True, r"^train\.epochs must be an integer >= 1, got True$"),  # no bool for an int
    (("train", "epochs"), "3", r"^train\.epochs must be an integer >= 1, got '3'$"),  # no str -> int
    (("train", "epochs"), 3.0, r"^train\.epochs must be an integer >= 1, got 3\.0$"),
    (("train", "learning_rate"), float("nan"), r"^train\.learning_rate must be a finite number in \(0, 10\]"),
    (("train", "grad_clip_norm"), float("inf"), r"^train\.grad_clip_norm must be a finite number >= 0, got inf$"),
    (("train", "weight_decay"), float("nan"), r"^train\.weight_decay must be a finite number in \[0, 10\]"),
    (("train", "early_stop_accuracy"), float("nan"), r"^train\.early_stop_accuracy must be a finite number"),
    (("model", "learned_positions"), 1, r"^model\.learned_positions must be true or false, got 1$"),
    (("model", "n_layers"), 100_000, r"^model\.n_layers must be an integer in \[1, 1024\], got 100000$"),
    (("data", "vocab_size"), 10**12, r"^data\.vocab_size must be an integer in \[1, 16777216\]"),
    (("data", "train_segments"), [], r"^data\.train_segments must be a non-empty list of \{seq_len, "),
    (("data", "train_segments"), [dict(seq_len=16, num_kv_pairs=2)],
     r"^data\.train_segments\[0\]\.num_examples is missing$"),
    (("data", "test_segments"), [dict(seq_len=16, num_kv_pairs=2, num_examples=8), dict(seq_len=16.0)],
     r"^data\.test_segments\[1\]\.seq_len must be an integer >= 1, got 16\.0$"),
    (("data", "validation_segments"), [dict(seq_len=16, num_kv_pairs=2, num_examples=8, kv=2)],
     r"^data\.validation_segments\[0\]\.kv is not a config key; accepted: \['num_examples', 'num_kv_pairs'"),
    (("mesh", "fsdp"), 1, r"^mesh\.fsdp is not a config key"),  # an LM key, not an MQAR one
    (("task",), "copy", r"^task must be one of \('mqar', 'lm'\), got 'copy'$"),
])
def test_the_schema_is_strict_and_its_errors_are_one_line(path, value, message):
  cfg = base()
  section = cfg
  for key in path[:-1]:
    section = section[key]
  section[path[-1]] = value
  with pytest.raises(ValueError, match=message) as err:
    config_lib.resolve(cfg)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("change,message", [
    (dict(train=dict(warmup_steps=65)), r"^train\.warmup_steps must be <= the run's 64 steps \(epochs 16 × 4"),
    (dict(train=dict(batch_size=65)), r"^train\.batch_size must be <= the training examples .* 64\), got 65$"),
    (dict(mesh=dict(data=3)), r"^train\.batch_size must be a multiple of .*mesh\.data = 3"),
    (dict(model=dict(d_model=10**6)), r"^model\.d_model=1000000 makes ~2\.4e\+13 parameters .* this machine has"),
    (dict(data=dict(train_segments=[dict(seq_len=16, num_kv_pairs=2, num_examples=10**12)])),
     r"^data\.train_segments\[0\]\.num_examples=1000000000000 is too large: the MQAR splits take ~128 TB"),
    (dict(train=dict(eval_batch_size=10**12)), r"^train\.eval_batch_size=1000000000000 is too large"),
])
def test_rules_between_fields_are_checked_before_anything_is_built(change, message):
  cfg = base()
  cfg["train"]["epochs"] = 16
  for section, values in change.items():
    cfg[section].update(values)
  with pytest.raises(ValueError, match=message):
    config_lib.resolve(cfg)


D = 64  # base()'s d_model; L = 16
MIXERS_THAT_DO_NOT_FIT = [
    ({"name": name, "num_heads": 3}, r"model\.mixer\.num_heads must divide model\.d_model \(64\)")
    for name in ("attention", "retnet", "sliding_window", "blocked", "delta_net", "gated_delta_net", "rwkv7",
                 "sparse_attention")
] + [
    ({"name": "based", "num_heads": 3, "num_key_value_heads": 3}, r"model\.mixer\.num_heads must divide model\.d_model"),
    ({"name": "attention", "num_heads": D, "rotary": True}, r"model\.mixer\.num_heads must divide .* of even width"),
    ({"name": "gla", "num_heads": 3}, r"model\.mixer\.expand_k·d_model = 32 must be a positive multiple"),
    ({"name": "mamba2", "head_dim": 48}, r"model\.mixer\.head_dim must divide expand·d_model = 128"),
    ({"name": "h3", "head_dim": 3}, r"model\.mixer\.head_dim must divide model\.d_model \(64\), got 3"),
    ({"name": "blocked", "block_size": 6}, r"model\.mixer\.block_size must divide the sequence length L \(16\)"),
    ({"name": "sliding_window", "window_size": 17}, r"model\.mixer\.window_size must be <= the sequence length"),
    ({"name": "base_conv", "kernel_size": 17}, r"model\.mixer\.kernel_size must be <= the sequence length L \(16"),
    ({"name": "base_conv", "kernel_size": [3, 20]}, r"model\.mixer\.kernel_size\[1\] must be <= the sequence"),
    ({"name": "hybrid", "mixers": [{"name": "base_conv"}, {"name": "retnet", "num_heads": 3}]},
     r"model\.mixer\.mixers\[1\]\.num_heads must divide"),
    ({"name": "attention", "rotary_base": float("nan")}, r"model\.mixer\.rotary_base must be a finite number"),
]


@pytest.mark.parametrize("mixer,message", MIXERS_THAT_DO_NOT_FIT,
                         ids=[f"{m['name']}-{list(m)[1]}" for m, _ in MIXERS_THAT_DO_NOT_FIT])
def test_every_layer_s_mixer_must_fit_the_width_and_the_length(mixer, message):
  cfg = base()
  cfg["model"]["mixer"] = mixer
  with pytest.raises(ValueError, match=rf"^{message}"):
    config_lib.resolve(cfg)


def test_an_lm_config_resolves_here_with_the_tokenizer_s_vocabulary():
  cfg = config_lib.lm_defaults()
  assert cfg.task == "lm" and config_lib.defaults().task == "mqar"
  full, model_cfg = config_lib.resolve(cfg)
  assert model_cfg.vocab_size == 50_304 and model_cfg.seq_len == cfg.data.seq_len  # GPT-2's 50,257 rounded up
  assert full.train.steps == cfg.train.steps and full.mesh.fsdp == 1
  for change, message in [(dict(warmup_steps=301), r"^train\.warmup_steps must be <= train\.steps \(300\)"),
                          (dict(epochs=3), r"^train\.epochs is not a config key"),
                          (dict(eval_max_rows=-1), r"^train\.eval_max_rows must be an integer >= 0")]:
    bad = cfg.to_dict()
    bad["train"].update(change)
    with pytest.raises(ValueError, match=message):
      config_lib.resolve(bad)


def test_a_base_value_every_run_overrides_still_fails():
  cfg = base()
  cfg["train"]["learning_rate"] = float("nan")
  cfg["runs"] = {"a": dict(train=dict(learning_rate=1e-3))}
  with pytest.raises(ValueError, match=r"^base config \(below runs\): train\.learning_rate must be"):
    config_lib.expand_runs(cfg)


def test_get_config_hands_out_copies_an_override_cannot_reach_the_presets(mqar_configs):
  first = mqar_configs.get_config("attention")
  first.runs.attention.data.train_segments[0]["num_examples"] = 0  # as --config.runs.attention.data... does
  assert mqar_configs.get_config("attention").runs.attention.data.train_segments[0]["num_examples"] == 40_000
