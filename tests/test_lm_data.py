"""LM data: the offline GPT-2 tokenizer, the Pile-format builder (array_record via tfds), the grain loader."""

import json
import os

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


def test_clear_errors_name_the_file(tmp_path):
  with pytest.raises(ValueError, match=rf"{tmp_path}/empty holds no training shards"):
    os.makedirs(tmp_path / "empty")
    text.build(str(tmp_path / "empty"), corpus="x", tokenizer="gpt2", seq_len=8, data_dir=str(tmp_path / "d"))
  corrupt = tmp_path / "corrupt" / "train.jsonl.zst"
  os.makedirs(corrupt.parent)
  corrupt.write_bytes(b"this is not zstandard data at all")
  with pytest.raises(ValueError, match=rf"{corrupt}: corrupt zstandard data"):
    text.build(str(corrupt.parent), corpus="x", tokenizer="gpt2", seq_len=8, data_dir=str(tmp_path / "d"))
  no_text = tmp_path / "notext" / "train.jsonl.zst"
  write_shard(str(no_text), random_docs(np.random.default_rng(2), 3), raw_lines=['{"meta": {}}'])
  with pytest.raises(ValueError, match=rf"{no_text}:4: the JSON object has no string 'text' field"):
    text.build(str(no_text.parent), corpus="x", tokenizer="gpt2", seq_len=8, data_dir=str(tmp_path / "d"))


def test_shakespeare_shards_hold_out_whole_plays(tmp_path):
  text.write_shakespeare(str(tmp_path), validation_plays=("macbeth",))
  val = list(text.read_documents(str(tmp_path / "val.jsonl.zst")))
  train = list(text.read_documents(str(tmp_path / "train.jsonl.zst")))
  assert len(val) == 1 and val[0].startswith("Macbeth") and "Fair is foul, and foul is fair" in val[0]
  assert len(train) == len(text.shakespeare_plays()) - 1 and not any(t.startswith("Macbeth\n") for t in train)
  assert "**" not in val[0]  # markdown markup removed
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
