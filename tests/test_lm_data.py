"""LM data: the offline GPT-2 tokenizer, the Pile-format builder (array_record via tfds), the grain loader."""

import glob
import io
import json
import os
import re

import numpy as np
import pytest
import zstandard

from zoo_jax.data import text
from zoo_jax.data import tokenizer as tokenizer_lib

WORDS = ("the king queen crown sword night day love death ghost speak hath thou thee doth fair foul "
         "Macbeth Banquo witch castle storm").split()


def random_docs(rng: np.random.Generator, n: int, name: str = "Pile-CC") -> list[dict]:
  return [{"text": " ".join(rng.choice(WORDS, size=rng.integers(5, 60))) + ".",
           "meta": {"pile_set_name": name}} for _ in range(n)]


def write_shard(path, docs, raw_lines=()) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lines = [json.dumps(d) for d in docs] + list(raw_lines)
  with open(path, "wb") as f:
    f.write(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))


@pytest.fixture(scope="module")
def gpt2():
  return tokenizer_lib.load_tokenizer("gpt2")


def test_gpt2_round_trip_and_known_ids(gpt2):
  assert gpt2.name == "gpt2"  # the genuine encoder.json + vocab.bpe (their content hash)
  assert len(gpt2.digest) == 64 and gpt2.digest.startswith("00f404d3")  # what data caches are keyed on
  assert (gpt2.vocab_size, gpt2.eot_id) == (50257, 50256)
  np.testing.assert_array_equal(gpt2.encode("Hello world"), [15496, 995])  # GPT-2's published ids
  rng = np.random.default_rng(0)
  samples = ["Fair is foul, and foul is fair:\n  Hover through the fog and filthy air.",
             "naïve café — 東京 🙂 'tis 1,250 \t\n\n", "".join(rng.choice(list("ab \n'.,é"), size=300))]
  for s in samples:
    ids = gpt2.encode(s)
    assert ids.dtype == np.int32 and ids.max() < gpt2.vocab_size
    assert gpt2.decode(ids) == s


def test_tokenizer_from_paths_and_bad_paths(tmp_path, gpt2):
  encoder_json, _ = tokenizer_lib.gpt2_files()
  same = tokenizer_lib.load_tokenizer(encoder_json)  # an encoder.json path (vocab.bpe next to it)
  np.testing.assert_array_equal(same.encode("thou art"), gpt2.encode("thou art"))
  with pytest.raises(ValueError, match=r"data\.tokenizer: .*nope\.json does not exist"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "nope.json"))
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match=r"cannot read .*tokenizer\.json"):
    tokenizer_lib.load_tokenizer(str(bad))


def test_pack_rows_concatenate_documents_with_eot():
  docs = [np.arange(5), np.arange(10, 13), np.arange(20, 27)]
  rows = list(text.pack(docs, seq_len=4, eot_id=99))
  stream = np.concatenate([np.append(d, 99) for d in docs])  # 18 tokens -> 4 rows, 2 dropped
  np.testing.assert_array_equal(np.stack(rows), stream[:16].reshape(4, 4))


def test_builder_on_pile_format_shards(tmp_path, gpt2):
  rng = np.random.default_rng(1)
  train_docs = [random_docs(rng, 30), random_docs(rng, 30, name="Github")]
  val_docs = random_docs(rng, 10) + random_docs(rng, 5, name="Github")
  manual = tmp_path / "pile"
  write_shard(str(manual / "train" / "00.jsonl.zst"), train_docs[0])
  write_shard(str(manual / "train" / "01.jsonl.zst"), train_docs[1])
  write_shard(str(manual / "val.jsonl.zst"), val_docs)
  sources = text.build(str(manual), corpus="toy", tokenizer="gpt2", seq_len=16, data_dir=str(tmp_path / "data"))
  assert sorted(sources) == ["train", "validation"]

  def expected(docs):
    return np.stack(list(text.pack([gpt2.encode(d["text"]) for d in docs], 16, gpt2.eot_id)))

  for split, docs in (("train", train_docs[0] + train_docs[1]), ("validation", val_docs)):
    got = np.stack([sources[split][i]["tokens"] for i in range(len(sources[split]))])
    want = expected(docs)
    assert got.shape == want.shape and got.dtype == np.int32
    # tfds stores records in a key-hashed order: compare the rows as sets (sorted lexicographically).
    np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])])
  # A subset filter keeps only the documents of that pile_set_name.
  github = text.build(str(manual), corpus="toy", tokenizer="gpt2", seq_len=16, data_dir=str(tmp_path / "data"),
                      subsets=("Github",))
  assert len(github["train"]) == len(expected(train_docs[1]))
  assert len(github["validation"]) == len(expected(val_docs[10:]))
  with pytest.raises(ValueError, match=r"01\.jsonl\.zst: not one row of data\.seq_len=16 tokens from documents "
                     r"of data\.subsets=\['ArXiv'\]"):
    text.build(str(manual), corpus="toy", tokenizer="gpt2", seq_len=16, data_dir=str(tmp_path / "data"),
               subsets=("ArXiv",))


def build_toy(manual, data_dir, log=None, **kwargs):
  lines = []
  sources = text.build(str(manual), corpus=kwargs.pop("corpus", "toy"), tokenizer="gpt2",
                       seq_len=kwargs.pop("seq_len", 16), data_dir=str(data_dir), log=lines.append, **kwargs)
  progress = [line for line in lines if re.match(r"data: (train|validation|test): ", line)]
  lines = [line for line in lines if line not in progress]
  if log is not None:
    log.extend(lines)
  assert len(lines) in (1, 2), lines  # "using cache", or "building" and "built"
  if len(lines) == 2:  # built: each split's last progress line says what was read
    for split, source in sources.items():
      assert re.fullmatch(rf"data: {split}: (\d+)/\1 shards, {len(source):,} rows \([\d,]+ tokens\) in "
                          r"[\d.]+ s, [\d,]+ tokens/s", [p for p in progress if f" {split}: " in p][-1]), progress
  else:
    assert not progress, progress
  return sources


def toy_corpus(manual, rng, n_train=40, n_val=10):
  write_shard(str(manual / "train.jsonl.zst"), random_docs(rng, n_train))
  write_shard(str(manual / "val.jsonl.zst"), random_docs(rng, n_val))


def complete_caches(data_dir):
  return sorted(glob.glob(str(data_dir / "tfds" / text.BUILDER_NAME / "*" / "1.0.0")))


def test_replacing_a_shard_under_the_same_name_rebuilds(tmp_path):
  rng = np.random.default_rng(3)
  toy_corpus(tmp_path / "toy", rng)
  log = []
  before = len(build_toy(tmp_path / "toy", tmp_path / "data", log)["train"])
  write_shard(str(tmp_path / "toy" / "train.jsonl.zst"), random_docs(rng, 160))  # 4x the documents
  after = len(build_toy(tmp_path / "toy", tmp_path / "data", log)["train"])
  assert after > 3 * before
  assert [line.split()[1] for line in log] == ["building", "built", "building", "built"]
  assert len(complete_caches(tmp_path / "data")) == 2


def test_corpora_with_the_same_name_in_different_directories_never_share_a_cache(tmp_path):
  rng = np.random.default_rng(4)
  toy_corpus(tmp_path / "a" / "pile", rng, n_train=40)
  toy_corpus(tmp_path / "b" / "pile", rng, n_train=80)
  log = []
  a = build_toy(tmp_path / "a" / "pile", tmp_path / "data", log, corpus="pile")
  b = build_toy(tmp_path / "b" / "pile", tmp_path / "data", log, corpus="pile")
  assert len(b["train"]) > len(a["train"])
  assert sum(line.startswith("data: building") for line in log) == 2
  assert len(complete_caches(tmp_path / "data")) == 2


def test_an_unchanged_corpus_is_reused_without_running_the_builder(tmp_path, monkeypatch):
  toy_corpus(tmp_path / "toy", np.random.default_rng(5))
  monkeypatch.setattr(text, "_SETTLED_NS", 0)  # remember hashes of files just written
  log = []
  rows = len(build_toy(tmp_path / "toy", tmp_path / "data", log)["train"])

  def no_rebuild(*args, **kwargs):
    raise AssertionError("the builder ran on an unchanged corpus")

  monkeypatch.setattr(text, "tokenized_rows", no_rebuild)
  assert len(build_toy(tmp_path / "toy", tmp_path / "data", log)["train"]) == rows
  assert log[-1].startswith("data: using cache ") and f"({rows:,} train / " in log[-1]
  assert "sha256" not in log[-1]  # the remembered hash: the shards were not read again
  # A new mtime (touch, a copy, the same bytes written again) rehashes the shard but keeps the cache.
  os.utime(tmp_path / "toy" / "train.jsonl.zst")
  assert len(build_toy(tmp_path / "toy", tmp_path / "data", log)["train"]) == rows
  assert log[-1].startswith("data: using cache ") and "sha256 of" in log[-1]
  assert len(complete_caches(tmp_path / "data")) == 1


def _lines_bytes(lines):
  return zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n")


def _good_lines(n, seed=6):
  return [json.dumps(d).encode() for d in random_docs(np.random.default_rng(seed), n)]


def _with_line_17(raw):
  good = _good_lines(30)
  return _lines_bytes(good[:16] + [raw] + good[16:])


def _truncated():
  compressed = _lines_bytes(_good_lines(3000))
  return compressed[:len(compressed) // 2]


# The first line a truncated file cannot give whole: the complete lines a stream reader hands on, plus one.
_TRUNCATED_AT = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(_truncated())).read().count(b"\n") + 1

BAD_SHARDS = {
    "not_utf8": (_with_line_17(b'{"text": "caf\xe9"}'), r"line 17 is not valid UTF-8 \(invalid continuation byte"),
    "not_json": (_with_line_17(b'{"text": "x",'), r"line 17 is not valid JSON \(Expecting property name"),
    "no_text": (_with_line_17(b'{"meta": {}}'), r"line 17 has no string 'text' field"),
    "text_not_a_string": (_with_line_17(b'{"text": 3}'), r"line 17 has no string 'text' field"),
    "truncated": (_truncated(), rf"is truncated or corrupt from line {_TRUNCATED_AT} on \(zstd: the file ends "
                                r"inside a frame\)"),
    "not_zstd": (b"this is not zstandard data at all", r"is truncated or corrupt from line 1 on \(zstd: Unknown "
                                                       r"frame descriptor\)"),
    "garbage_after_the_frame": (_lines_bytes(_good_lines(30)) + b"junk", r"is truncated or corrupt from line 31 on"),
    "empty": (b"", r"is truncated or corrupt from line 1 on \(zstd: the file is empty\)"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SHARDS))
def test_a_bad_shard_is_one_line_naming_file_and_line_and_leaves_no_cache(tmp_path, kind):
  data, message = BAD_SHARDS[kind]
  manual = tmp_path / kind
  toy_corpus(manual, np.random.default_rng(7))
  (manual / "train.jsonl.zst").write_bytes(data)
  with pytest.raises(ValueError) as e:
    build_toy(manual, tmp_path / "data")
  assert "\n" not in str(e.value)
  assert str(e.value).startswith(f"data.manual_dir: {manual / 'train.jsonl.zst'} ")
  assert len(re.findall(message, str(e.value))) == 1, str(e.value)
  assert not os.listdir(tmp_path / "data" / "tfds" / text.BUILDER_NAME)  # nothing half-written


def test_a_failed_build_followed_by_a_fixed_shard_builds(tmp_path):
  manual = tmp_path / "toy"
  toy_corpus(manual, np.random.default_rng(8))
  good = (manual / "train.jsonl.zst").read_bytes()
  (manual / "train.jsonl.zst").write_bytes(good[:-7])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    build_toy(manual, tmp_path / "data")
  (manual / "train.jsonl.zst").write_bytes(good)
  log = []
  sources = build_toy(manual, tmp_path / "data", log)
  want = np.stack(list(text.tokenized_rows([str(manual / "train.jsonl.zst")], tokenizer_lib.load_tokenizer("gpt2"),
                                           16)))
  assert len(sources["train"]) == len(want) and log[0].startswith("data: building ")
  assert len(complete_caches(tmp_path / "data")) == 1


def test_missing_splits_are_one_line_errors(tmp_path):
  with pytest.raises(ValueError, match=rf"^data\.manual_dir: {tmp_path}/empty holds no train shards"):
    os.makedirs(tmp_path / "empty")
    build_toy(tmp_path / "empty", tmp_path / "d")
  write_shard(str(tmp_path / "noval" / "train.jsonl.zst"), random_docs(np.random.default_rng(9), 3))
  with pytest.raises(ValueError, match=rf"^data\.manual_dir: {tmp_path}/noval holds no validation shards "
                     r"\(expected val/\*\.jsonl\.zst, val\*\.jsonl\.zst or validation\*\.jsonl\.zst"):
    build_toy(tmp_path / "noval", tmp_path / "d")


def test_shakespeare_shards_hold_out_whole_plays(tmp_path):
  text.write_shakespeare(str(tmp_path), validation_plays=("macbeth",))
  val = list(text.read_documents(str(tmp_path / "val.jsonl.zst")))
  train = list(text.read_documents(str(tmp_path / "train.jsonl.zst")))
  assert len(val) == 1 and val[0].startswith("Macbeth") and "Fair is foul, and foul is fair" in val[0]
  assert len(train) == len(text.shakespeare_plays()) - 1 and not any(t.startswith("Macbeth\n") for t in train)
  assert "**" not in val[0]  # markdown markup removed
  # Written again, the shards are the same bytes: the same source key, the same cache.
  def digests():
    shards = [str(tmp_path / f) for f in ("train.jsonl.zst", "val.jsonl.zst")]
    return text.shard_sha256(shards, str(tmp_path / "memo.json"))[0]

  before = digests()
  text.write_shakespeare(str(tmp_path), validation_plays=("macbeth",))
  assert digests() == before
  with pytest.raises(ValueError, match=r"data\.validation_plays must name plays"):
    text.write_shakespeare(str(tmp_path), validation_plays=("hamlet-2",))


class _Rows:
  """A random-access source of n rows {'tokens': [i, i]} (row i holds its own index)."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"tokens": np.array([i, i], np.int32)}


def _take(it, n):
  return [next(it)["tokens"][:, 0] for _ in range(n)]


def test_loader_shuffles_by_seed_per_epoch_and_splits_global_batches_over_processes():
  src = _Rows(20)
  one = _take(text.train_batches(src, batch_size=4, seed=3, num_epochs=2), 10)
  assert sorted(np.concatenate(one[:5])) == list(range(20))  # epoch 1: a permutation
  assert sorted(np.concatenate(one[5:])) == list(range(20))  # epoch 2: another one
  assert not np.array_equal(np.concatenate(one[:5]), np.concatenate(one[5:]))
  assert not np.array_equal(np.concatenate(one), np.concatenate(_take(text.train_batches(
      src, batch_size=4, seed=4, num_epochs=2), 10)))
  # Two processes: each reads half of every global batch; together the same rows in the same order.
  halves = [_take(text.train_batches(src, batch_size=4, seed=3, num_epochs=2, process_index=p, process_count=2), 10)
            for p in (0, 1)]
  for s in range(10):
    np.testing.assert_array_equal(np.concatenate([halves[0][s], halves[1][s]]), one[s])


def test_loader_resume_mid_epoch_gives_the_same_next_batches():
  src = _Rows(30)
  it = text.train_batches(src, batch_size=4, seed=0, num_epochs=3)
  _take(it, 4)  # mid-epoch (7 batches per epoch)
  state = json.loads(json.dumps(it.get_state()))  # it goes through the checkpoint's JSON
  want = _take(it, 8)  # crosses into the next epoch
  resumed = text.train_batches(src, batch_size=4, seed=0, num_epochs=3)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(resumed, 8)), np.stack(want))


def test_eval_batches_cover_the_split_once_with_padding():
  src = _Rows(10)
  parts = [list(text.eval_batches(src, batch_size=4, process_index=p, process_count=2)) for p in (0, 1)]
  seen = []
  for b0, b1 in zip(*parts):
    tokens = np.concatenate([b0["tokens"], b1["tokens"]])[:, 0]
    weight = np.concatenate([b0["weight"], b1["weight"]])
    seen += list(tokens[weight > 0])
  assert seen == list(range(10))
