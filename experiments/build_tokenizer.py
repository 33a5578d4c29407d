r"""Builds the shipped byte-level BPE tokenizer of the embedded Shakespeare corpus, offline and deterministically.

  python experiments/build_tokenizer.py                       # rewrites zoo_jax/data/tokenizers/shakespeare_bpe2k.json
  python experiments/build_tokenizer.py --vocab_size=4096 --output=/tmp/bpe4k.json --measure

Trained with Hugging Face `tokenizers` on the corpus's TRAIN split only (every play but the default
validation plays, `zoo_jax.data.text.SHAKESPEARE_VALIDATION`), so the held-out plays' text never shapes the
vocabulary. Byte-level (GPT-2's byte alphabet and pre-tokenisation, no prefix space), every byte in the
vocabulary, one special token <|endoftext|> (id 0: the packing separator, `Tokenizer.eot_id`);
`--vocab_size` counts it. The file is written with sorted keys, so a rebuild gives the same bytes (the
test suite checks the shipped file against `--vocab_size`'s vocabulary, not a rebuild: training takes ~10 s).
`--measure` prints tokens per character of both splits (the compression a vocabulary size buys).
"""

import hashlib
import json
import os
import sys

from absl import app
from absl import flags

from zoo_jax.data import text
from zoo_jax.data import tokenizer as tokenizer_lib

_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 2048, "Vocabulary size, <|endoftext|> and the 256 bytes included.")
_OUTPUT = flags.DEFINE_string("output", None, "tokenizer.json to write (default: the shipped file).")
_MEASURE = flags.DEFINE_bool("measure", False, "Print tokens per character on the train and validation plays.")


def train_split() -> tuple[list[str], list[str]]:
  """(train texts, validation texts) of the embedded corpus under the default validation plays, by play name."""
  plays = text.shakespeare_plays()
  train = [t for name, t in sorted(plays.items()) if name not in text.SHAKESPEARE_VALIDATION]
  valid = [plays[name] for name in sorted(text.SHAKESPEARE_VALIDATION)]
  return train, valid


def build(texts: list[str], vocab_size: int):
  """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`, <|endoftext|> = id 0."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  if not 257 < vocab_size <= 65536:
    raise ValueError(f"--vocab_size must be in (257, 65536], got {vocab_size}")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                special_tokens=[tokenizer_lib.EOT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
  return tok


def write(tok, path: str) -> str:
  """Writes `tok` as canonical JSON (sorted keys, no indentation); returns its sha256."""
  data = json.dumps(json.loads(tok.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(data)
  os.replace(tmp, path)
  return hashlib.sha256(data.encode("utf-8")).hexdigest()


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not 257 < _VOCAB_SIZE.value <= 65536:
    sys.exit(f"error: --vocab_size must be in (257, 65536], got {_VOCAB_SIZE.value}")
  train, valid = train_split()
  tok = build(train, _VOCAB_SIZE.value)
  path = _OUTPUT.value or tokenizer_lib.shipped_path(tokenizer_lib.SHAKESPEARE_BPE)
  digest = write(tok, path)
  print(f"wrote {path}: {tok.get_vocab_size():,} tokens, {os.path.getsize(path):,} bytes, sha256 {digest[:16]}")
  if _MEASURE.value:
    loaded = tokenizer_lib.load_tokenizer(path)
    for split, texts in (("train", train), ("validation", valid)):
      n_chars = sum(len(t) for t in texts)
      n_tokens = sum(len(ids) for ids in loaded.encode_batch(texts))
      print(f"  {split}: {n_tokens:,} tokens for {n_chars:,} characters ({n_chars / n_tokens:.2f} chars/token)")


if __name__ == "__main__":
  app.run(main)
