"""The shipped Shakespeare BPE tokenizer (zoo_jax/data/tokenizers/) and the CPU LM presets that use it."""

import os

import pytest

from zoo_jax import lm
from zoo_jax.configs import lm as lm_configs
from zoo_jax.data import tokenizer as tokenizer_lib

NAME = tokenizer_lib.SHAKESPEARE_BPE


def test_shipped_tokenizer_loads_offline_and_round_trips():
  path = tokenizer_lib.shipped_path(NAME)
  assert os.path.getsize(path) < 300_000  # small enough to ship in the package
  tok = tokenizer_lib.load_tokenizer(NAME)
  assert (tok.name, tok.vocab_size, tok.eot_id) == (NAME, 2048, 0)
  assert tok.digest == tokenizer_lib._files_sha256(path)  # the data cache key names this file's bytes
  text = "MACBETH. Is this a dagger which I see before me,\n  The handle toward my hand? Café — ünïcode ✓\n"
  ids = tok.encode(text)
  assert tok.decode(ids) == text  # byte-level: any text, accents and symbols included
  assert ids.max() < tok.vocab_size and tok.eot_id not in ids.tolist()  # plain text never yields the separator
  verse = text.split("\n")[0]
  assert len(tok.encode(verse)) < len(verse) / 2  # BPE merges bytes (measured 2.6-2.8 characters a token)
  assert tok.decode([tok.eot_id]) == ""  # the special token is skipped on decoding, as GPT-2's


def test_shipped_tokenizer_name_selects_it_in_the_config():
  cfg = lm.defaults()
  cfg.data.tokenizer = NAME
  _, model_cfg, tok = lm.resolve(cfg)
  assert tok.name == NAME and model_cfg.vocab_size == 2048  # already a multiple of data.vocab_multiple (64)
  cfg.data.tokenizer = "shakespeare_bpe3k"  # an unknown short name is a missing path, one line
  with pytest.raises(ValueError, match=r"^data\.tokenizer: shakespeare_bpe3k does not exist \(accepted: 'gpt2', "
                     r"'shakespeare_bpe2k', "):
    lm.resolve(cfg)


def test_cpu_preset_pair_uses_the_shipped_tokenizer_and_differs_in_the_mixer_only():
  (att, att_model, att_tok), (conv, conv_model, _) = (lm.resolve(lm_configs.get_config(name))
                                                       for name in ("attention_cpu", "base_conv_cpu"))
  assert att_tok.name == NAME and att_model.vocab_size == conv_model.vocab_size == 2048
  assert att.data.to_dict() == conv.data.to_dict() and att.train.to_dict() == conv.train.to_dict()
  assert {k: v for k, v in att.model.to_dict().items() if k != "mixer"} == {
      k: v for k, v in conv.model.to_dict().items() if k != "mixer"}
  assert (att.model.mixer.name, conv.model.mixer.name) == ("attention", "base_conv")
  assert att_model.n_layers >= 2  # induction (in-context recall) needs two attention layers
