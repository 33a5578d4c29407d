"""Checkpoints and workdirs: the one place that builds Orbax's `CheckpointManager`.

A run's workdir is claimed by `open_workdir`: an flock on `<workdir>/.lock` (two processes never train
into one workdir; the kernel drops the lock with the process, so a kill -9 leaves none) and a
`config.json` check (a workdir is never resumed under another config). Its `checkpoints/` directory is
written and read by a `Checkpointer`, in the layout train.py has always written:

    checkpoints/<step>/state/      the arrays (Orbax `StandardSave`: OCDBT + zarr, sharded as they are)
    checkpoints/<step>/progress/   the caller's progress dict (`JsonSave`) plus, under `CHECKSUMS_KEY`,
                                   each state leaf's shape, dtype and checksum

Why checksums: Orbax restores a data file with flipped bytes without complaint (nothing in OCDBT or zarr
checks the bytes), and a run resumed from such a file trained on with NaN losses. So `save` digests every
leaf, on device, from the very arrays it hands to Orbax, and `restore` digests what it read back. A leaf's
digest is Σ_i mix(w_i ⊕ i) mod 2³² over its 32-bit words w (see `_checksum`): one jitted pass, exact
integer arithmetic, so it does not depend on how the leaf is sharded, and it covers arrays that are not
fully addressable (multi-process runs) too. `save` refuses a state with a non-finite float, so every
checkpoint written is one `restore` accepts.

`restore` tries steps newest first and skips a damaged one with one warning line on stderr.
Damaged, and how it is seen (tests/test_checkpoint.py damages step 2 of two in each of these ways):
  - the step is a file, not a directory (`checkpoints/2`, or a stray `99`)     listing
  - a stray empty step directory (`checkpoints/99/`)                           listing: files missing
  - `state/` or `progress/` missing                                            listing
  - `_CHECKPOINT_METADATA`, `state/_METADATA` or `progress/metadata` missing   listing (Orbax restores
    without the first two when given a target, but a step without them is not one Orbax finished, and
    a restore without a target tree, as for inference, needs `_METADATA`)
  - progress JSON garbage, or empty                                            Orbax's JsonRestore raises
  - progress JSON without the checksum record (not written by this module)    record check
  - leaves, shapes or dtypes that differ from `like`'s (or from the record)    record check
  - `state/manifest.ocdbt` missing, the data directory `state/d/` missing, a data file truncated or
    zeroed                                                                     Orbax / TensorStore raises
  - bytes flipped in a data file (Orbax silently restores wrong values)       checksum mismatch
  - a non-finite value in a float leaf                                         checked with the digest
  - an unfinished save: `<step>.orbax-checkpoint-tmp` and no `<step>/` (a killed process, or a save
    still being written by the run while another process restores)            listing; Orbax ignores it
                                                                               and replaces it when it
                                                                               saves that step again
Every step damaged raises CheckpointError (one line: each step and why, and to move the directory aside);
when every step's leaves differ from the state's in names, shapes or dtypes, the line says the checkpoints
hold another model structure (another zoo_jax version or model config), not damage. A directory with no
finished step at all restores to None.

What happens to damaged steps: `restore` deletes and renames nothing (an evaluation may restore while the
run trains). But Orbax saves no step at or below its newest (a stray `99/` would silently drop every save
up to step 99) and a damaged step holds one of the `keep` slots, so the writer's first `save` after a
`restore` that skipped steps renames them to `<step>.damaged` (`.damaged.1`, … if taken; one warning
line each): out of Orbax's sight, kept for inspection, safe to delete. A save at or below a step that is
on disk and not known to be damaged is refused (Orbax would skip it silently). Unfinished saves are left
to Orbax. `latest_step()` reads the directory (newest finished step directory not known to be damaged),
so it never names an in-flight or failed async save the way Orbax's own step list does.

Cost, measured on this repo's 2-core CPU machine while others loaded it (load average ~6): a state of
1M float32 parameters in 8 leaves digests in 2 ms (64 leaves: 6 ms), so `save` blocks ~10–45 ms instead
of Orbax's ~6–25 ms and `restore` takes ~50–100 ms instead of ~20–65 ms (the digest plus a separate read
of the progress record before the arrays). 100M float32 (400 MB, 8 leaves): the digest takes 0.65–0.7 s,
all of it blocking, against Orbax's 15 ms of blocking and 1.2–1.7 s of writing; restore 1.8 → 2.5 s.
XLA:CPU's integer reductions are the bottleneck (a float sum of the same array takes 41 ms, an integer
sum ~300 ms; zlib.crc32 of the host bytes 0.18 s); on an accelerator the digest is one bandwidth-bound
pass over device memory, with nothing copied to the host. The first `save` also compiles the digest:
0.3 s for 8 leaves, 0.6 s for 64.

Orbax's noise, silenced: when TensorStore fails one array of a restore (truncated, zeroed or missing
data), Orbax 0.12.8 closes its event loop with the other array reads in flight. Each abandoned read then
reports itself as the garbage collector or TensorStore's threads reach it, through four channels: an
unraisable exception (`Exception ignored in: <coroutine object _read_array_index_and_device_put>`, or
"RuntimeError: Event loop is closed" from `call_soon_threadsafe`), the asyncio logger ("Task / Future
exception was never retrieved"), and a RuntimeWarning ("coroutine 'Store._get_array_metadatas' was never
awaited"): 30–110
tracebacks, up to ~5,000 stderr lines, for a 2-layer model, sometimes written into the middle of the
warning line. The step's skip line already says what failed; before its first read, a restore
installs (`_silence_abandoned_reads`) filters that drop exactly these reports (matched by Orbax's coroutine
name, the event-loop message, or a TensorStore read error) and pass everything else on unchanged.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import gc
import json
import logging as std_logging
import os
import re
import sys
import threading
import types
import warnings
import weakref
from typing import Any, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CHECKSUMS_KEY = "_checksums"  # reserved key of the progress JSON
CHECKSUM_FORMAT = "zoo_jax.checkpoint/1"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's atomicity_types.TMP_DIR_SUFFIX (POSIX: atomic rename)
_STEP_RE = re.compile(r"^(0|[1-9]\d*)$")  # Orbax's standard step names (no prefix, no padding)
_TMP_RE = re.compile(r"^(0|[1-9]\d*)" + re.escape(_TMP_SUFFIX))
# What every step Orbax 0.12 finishes holds and restore relies on beyond what Orbax checks itself.
_REQUIRED = ("state", "progress", "_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt",
             "progress/metadata")


class _Mismatch(str):
  """Why a step was skipped, when its leaves' names, shapes or dtypes differ from the state's: not damage
  but another model structure (a checkpoint written by another zoo_jax version or model config)."""


class CheckpointError(RuntimeError):
  """A checkpoint or workdir problem; the message is one line, meant to be printed as `error: {e}`."""


class WorkdirBusyError(CheckpointError):
  """Another process holds the workdir's lock."""


def _warn(message: str) -> None:
  """One warning line on stderr (not also through absl, which prints to stderr too: the line would show
  twice)."""
  print(f"warning: {message}", file=sys.stderr, flush=True)


def _names(names: list[str], limit: int = 3) -> str:
  """Leaf names for a message: the first few, then how many more."""
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _one_line(e: BaseException, limit: int = 200) -> str:
  """An exception as a short line: TensorStore's messages run to pages of JSON spec."""
  text = " ".join(str(e).split()) or type(e).__name__
  text = text.split(" See full TensorStore details")[0].split(" [tensorstore_spec")[0]
  return text if len(text) <= limit else text[:limit - 1] + "…"


# Orbax 0.12's per-array read and metadata coroutines, the ones its failed restores abandon (module
# docstring); an abandoned coroutine is recognised by its file, the never-awaited warning by these names.
_ORBAX_READ = "_read_array_index_and_device_put"
_ORBAX_COROUTINES = (_ORBAX_READ, "Store._get_array_metadatas", "_read_shard")
_silenced = False  # the asyncio-logger and warnings filters are installed
_hook = None  # the unraisable hook _silence_abandoned_reads installed last


def _abandoned_read(exc: BaseException | None, obj: Any = None) -> bool:
  """Whether an unretrieved exception (and the coroutine or task it was raised in) is an abandoned Orbax
  read."""
  if isinstance(obj, asyncio.Task):
    obj = obj.get_coro()
  if isinstance(obj, types.CoroutineType) and f"{os.sep}orbax{os.sep}" in obj.cr_code.co_filename:
    return True
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  text = str(exc) if exc is not None else ""
  return "Encountered error while reading array index" in text or "in OCDBT database at local file" in text


class _AbandonedReadFilter(std_logging.Filter):
  """Drops the asyncio logger's "Task/Future exception was never retrieved" of an abandoned Orbax read."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = str(record.msg)
    if "exception was never retrieved" not in message:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return not (_ORBAX_READ in message or _abandoned_read(exc))


def _silence_abandoned_reads() -> None:
  """Installs the filters described in the module docstring (again if someone replaced the hook since, as
  pytest does around each test); everything else passes on to the hook that was there before."""
  global _silenced, _hook
  if sys.unraisablehook is not _hook:
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
      if not _abandoned_read(unraisable.exc_value, unraisable.object):
        previous(unraisable)

    _hook = sys.unraisablehook = hook
  if not _silenced:
    _silenced = True
    std_logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())
    names = "|".join(re.escape(name) for name in _ORBAX_COROUTINES)
    warnings.filterwarnings("ignore", message=f"coroutine '({names})' was never awaited", category=RuntimeWarning)


# ---------------------------------------------------------------------------------------------- Workdir


class WorkdirLock:
  """The flock `open_workdir` took; `release()` (idempotent) or leave the `with` block to give it back."""

  def __init__(self, workdir: str, fd: int):
    self.workdir = workdir
    self._fd: int | None = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def open_workdir(workdir: str, config_json: str, defaults: Mapping[str, Any] | None = None) -> WorkdirLock:
  """Claims a run's workdir for this process and checks it holds this run.

  Creates `workdir`, takes an exclusive non-blocking flock on `<workdir>/.lock` (another claim, from any
  process, gets WorkdirBusyError at once; the kernel drops the lock when the process dies, so a kill -9
  leaves none behind), refuses a `checkpoints` path that is not a directory, then compares
  `<workdir>/config.json` with `config_json` as JSON: a different config is refused (CheckpointError
  naming the differing keys; lock released, nothing written); an absent one is written. With `defaults`
  (every key's default, nested like the config), a key the workdir's config lacks counts as unchanged when
  its new value is the default: a workdir written before an option existed resumes under a config that leaves
  the option at its default (options default to the computation they replace); its config.json stays as is.
  """
  try:
    new_config = json.loads(config_json)
  except ValueError as e:
    raise ValueError(f"config_json is not valid JSON ({_one_line(e)})") from None
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(os.path.join(workdir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    os.close(fd)
    raise WorkdirBusyError(f"workdir {workdir} is in use by another run (pid {holder}); wait for it to "
                           "finish or use a new --workdir") from None
  lock = WorkdirLock(workdir, fd)
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    ckpt_path = os.path.join(workdir, "checkpoints")
    if os.path.lexists(ckpt_path) and not os.path.isdir(ckpt_path):
      raise CheckpointError(f"{ckpt_path} exists and is not a directory; move it aside")
    _check_or_write_config(workdir, new_config, config_json, defaults)
  except BaseException:
    lock.release()
    raise
  return lock


def write_text(path: str, text: str) -> None:
  """Writes a workdir file whole or not at all (a temporary beside it, then a rename), even if the process
  dies mid-write: config.json, summary.json, results tables."""
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _check_or_write_config(workdir: str, new_config: Any, config_json: str,
                           defaults: Mapping[str, Any] | None = None) -> None:
  """A workdir holds one run: a different config is refused, never overwritten."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    write_text(path, config_json)
    return
  try:
    with open(path) as f:
      old_config = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} is unreadable ({_one_line(e)}); move it aside or use a new "
                          "--workdir") from None
  differ = config_differences(old_config, new_config, defaults)
  if not differ:
    return
  shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
  raise CheckpointError(f"workdir {workdir} holds a run with a different config ({shown}); use a new --workdir")


_ABSENT = object()


def config_differences(old: Any, new: Any, defaults: Any = None, prefix: str = "") -> list[str]:
  """The keys (dotted paths) at which `old` and `new` differ, each as `key: old -> new` (`absent` for a
  missing key). A key only `new` has is no difference where `defaults` gives it the same value."""
  if not (isinstance(old, dict) and isinstance(new, dict)):
    return [] if old == new else [f"{prefix or '<top level>'}: {_short(old)} -> {_short(new)}"]
  defaults = defaults if isinstance(defaults, Mapping) else {}
  out = []
  for key in sorted(old.keys() | new.keys()):
    path = f"{prefix}.{key}" if prefix else str(key)
    o, n, d = old.get(key, _ABSENT), new.get(key, _ABSENT), defaults.get(key, _ABSENT)
    if o is _ABSENT and n is not _ABSENT and _json_equal(n, d):
      continue
    if o is _ABSENT or n is _ABSENT:
      out.append(f"{path}: {_short(o)} -> {_short(n)}")
    else:
      out += config_differences(o, n, d, path)
  return out


def _json_equal(a: Any, b: Any) -> bool:
  if b is _ABSENT:
    return False
  return json.loads(json.dumps(a, sort_keys=True, default=str)) == json.loads(
      json.dumps(b, sort_keys=True, default=str))


def _short(x: Any) -> str:
  if x is _ABSENT:
    return "absent"
  text = json.dumps(x, sort_keys=True, default=str)
  return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------- Digest


def _words(x: jax.Array) -> jax.Array:
  """A leaf's bits as uint32 words: narrower dtypes widened, 64-bit ones split in two."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.iscomplexobj(x):
    x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = jnp.dtype(x.dtype).itemsize * 8
  if bits == 64:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """Σ_i mix(w_i ⊕ i) mod 2³² over a leaf's words w, i the flat index, mix(v) = g ⊕ (g >> 15) with
  g = v · 0x9E3779B1: a bijection per word, so any single changed word changes the sum, and a moved
  word changes it too (its index enters); two or more changes cancel with chance ~2⁻³²."""
  w = _words(x)
  i = jnp.zeros(w.shape, jnp.uint32)
  for axis, n in enumerate(w.shape):  # the flat index mod 2³², without an arange of the whole size
    i = i * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
  g = (w ^ i) * jnp.uint32(0x9E3779B1)
  return jnp.sum(g ^ (g >> 15), dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


_digest = jax.jit(lambda state: (jax.tree.map(_checksum, state), jax.tree.map(_finite, state)))


def _leaves(tree) -> list[tuple[str, Any]]:
  """(name, leaf) pairs, named as `jax.tree_util.keystr` names paths: `['params']['w']`."""
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _spec(leaf) -> list:
  return [[int(n) for n in leaf.shape], str(leaf.dtype)]


def checksums(state) -> tuple[dict[str, list], list[str]]:
  """({leaf name: [shape, dtype, checksum]}, names of float leaves holding a non-finite value)."""
  checksums, finite = jax.device_get(_digest(state))
  records, non_finite = {}, []
  for (name, leaf), checksum, ok in zip(_leaves(state), jax.tree.leaves(checksums), jax.tree.leaves(finite)):
    records[name] = [*_spec(leaf), int(checksum)]
    if not ok:
      non_finite.append(name)
  return records, non_finite


# ---------------------------------------------------------------------------------------------- Checkpointer


# Orbax numbers its save operations with one process-wide counter (`OperationIdGenerator`), and an async
# save's background commit reads the *current* number: two CheckpointManagers saving at once in two
# threads of one process (experiments/mqar.py --parallel_runs, sweep.parallel_groups) wait on each other's
# signals and fail ("No ArrayMetadata found", or a 300 s "Timeout waiting for key
# 'awaitable_signals_contract_N/...'"; measured: the README's first command on a clean clone, and
# tests/test_checkpoint.py). So every Orbax call of every Checkpointer holds this lock, and while more
# than one Checkpointer is open in the process each save is finished before the lock is released
# (synchronous); a lone Checkpointer keeps its saves async.
_ORBAX_LOCK = threading.RLock()
_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


class Checkpointer:
  """Async Orbax checkpoints of (a pytree of jax arrays, a JSON progress dict) in one directory.

  Keeps the newest `keep` steps (Orbax's retention). One writer per directory (hold `open_workdir`'s
  lock); any number of readers may `restore` while it writes. Several Checkpointers may be used from
  several threads of one process (each by one thread): their Orbax calls take turns (`_ORBAX_LOCK`), and
  their saves are synchronous while more than one is open.
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep!r}")
    self.directory = os.path.abspath(directory)
    if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f"{self.directory} exists and is not a directory; move it aside")
    self._damaged: set[int] = set()  # steps restore skipped, moved aside by the next save
    self._closed = False
    self._failed: CheckpointError | None = None  # an in-flight save another Checkpointer waited out
    with _ORBAX_LOCK:
      for other in list(_OPEN):  # their saves become synchronous from now on: finish the one in flight
        other._finish_in_flight()
      self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=async_save))
      _OPEN.add(self)
    # A safety net for a caller that never reaches close(): at interpreter exit, finish the in-flight
    # write before concurrent.futures stops its executors (Orbax's finalize thread would otherwise die
    # with "cannot schedule new futures after shutdown" and leave `<step>.orbax-checkpoint-tmp`).
    # threading's exit hooks run newest first, so this one runs before concurrent.futures' own.
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
      register(functools.partial(_close_at_exit, weakref.ref(self)))

  # -- listing

  def _entries(self) -> dict[int, str]:
    """{step: 'dir' | 'file' | 'tmp'} of the directory's step-named entries; a finished step wins over
    an unfinished save of the same number."""
    entries: dict[int, str] = {}
    try:
      names = os.listdir(self.directory)
    except FileNotFoundError:
      return entries
    for name in names:
      if m := _STEP_RE.match(name):
        entries[int(m.group(1))] = "dir" if os.path.isdir(os.path.join(self.directory, name)) else "file"
      elif m := _TMP_RE.match(name):
        entries.setdefault(int(m.group(1)), "tmp")
    return entries

  def latest_step(self) -> int | None:
    """The newest finished step directory on disk that is not known to be damaged; None if none."""
    steps = [s for s, kind in self._entries().items() if kind == "dir" and s not in self._damaged]
    return max(steps, default=None)

  # -- save

  def save(self, step: int, state, progress: dict) -> None:
    """Starts an async save of `state` (arrays, sharded as they are) and `progress` under `step`.

    Blocks for the digest of `state` (one jitted pass over it) and Orbax's copy to host; the writing
    happens in the background (`wait()`). Raises CheckpointError, saving nothing, when a float leaf holds
    a non-finite value, when the previous async save failed, or when `step` is not after the newest step
    on disk.
    """
    if self._closed:
      raise CheckpointError(f"step {step} not saved: the checkpointer of {self.directory} is closed")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be an integer >= 0, got {step!r}")
    step = int(step)
    if not isinstance(progress, dict):
      raise ValueError(f"progress must be a dict, got {type(progress).__name__}")
    if CHECKSUMS_KEY in progress:
      raise ValueError(f"progress must not hold the key {CHECKSUMS_KEY!r} (the checkpoint's own record)")
    records, non_finite = checksums(state)
    if non_finite:
      raise CheckpointError(f"step {step} not saved: non-finite values in state leaves {_names(non_finite)}")
    with _ORBAX_LOCK:
      self._save(step, state, progress, records)
      if len(_OPEN) > 1:
        self.wait()

  def _save(self, step: int, state, progress: dict, records: dict) -> None:
    self.wait()
    self._move_damaged_aside()
    existing = [s for s, kind in self._entries().items() if kind != "tmp" and s >= step]
    if existing:
      raise CheckpointError(f"step {step} not saved: {self.directory} already holds step "
                            f"{max(existing)}; a run saves steps in increasing order")
    record = {**progress, CHECKSUMS_KEY: dict(format=CHECKSUM_FORMAT, leaves=records)}
    saved = self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             progress=ocp.args.JsonSave(record)))
    if not saved:  # Orbax's own step list disagrees with the directory: never drop a save silently
      raise CheckpointError(f"step {step} not saved: Orbax lists step {self._manager.latest_step()} in "
                            f"{self.directory}")

  def _move_damaged_aside(self) -> None:
    """Renames the steps restore skipped to `<step>.damaged[.k]`: out of Orbax's sight, nothing deleted.
    One process renames; the others wait for it (the directory is shared)."""
    if not self._damaged:
      return
    if jax.process_index() == 0:
      for step in sorted(self._damaged):
        src = os.path.join(self.directory, str(step))
        if not os.path.lexists(src):
          continue
        dst, k = src + ".damaged", 0
        while os.path.lexists(dst):
          k += 1
          dst = f"{src}.damaged.{k}"
        os.rename(src, dst)
        _warn(f"checkpoint step {step} in {self.directory} was damaged; moved to {os.path.basename(dst)}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"zoo_jax.checkpoint: damaged steps moved aside in {self.directory}")
    self._damaged.clear()
    self._manager.reload()

  # -- restore

  def restore(self, like) -> tuple[Any, dict, int] | None:
    """(state, progress, step) of the newest good checkpoint, arrays placed like `like`'s leaves.

    `like`: a pytree of jax arrays or `jax.ShapeDtypeStruct`s with `.sharding`. None when the directory
    holds no checkpoint. A damaged step is skipped with one warning line; all damaged → CheckpointError.
    """
    self.wait()
    entries = self._entries()
    skipped, reasons = [], []
    for step in sorted(entries, reverse=True):
      if entries[step] == "tmp":
        _warn(f"checkpoint step {step} in {self.directory} skipped: unfinished save ({step}{_TMP_SUFFIX}, "
              "left by a killed process or still being written)")
        continue
      restored = self._restore_step(step, entries[step], like)
      if isinstance(restored, tuple):
        return restored
      skipped.append(f"step {step}: {restored}")
      reasons.append(restored)
      self._damaged.add(step)
      _warn(f"checkpoint step {step} in {self.directory} skipped: {restored}")
    if not skipped:
      return None
    if all(isinstance(why, _Mismatch) for why in reasons):
      raise CheckpointError(f"every checkpoint in {self.directory} holds a model of another structure than "
                            f"this code builds from the run's config (written by another zoo_jax version?): "
                            f"{'; '.join(skipped)}; move {self.directory} aside to start afresh")
    raise CheckpointError(f"every checkpoint in {self.directory} is damaged ({'; '.join(skipped)}); move "
                          f"{self.directory} aside to start afresh")

  def _restore_step(self, step: int, kind: str, like) -> tuple[Any, dict, int] | str:
    """(state, progress, step), or why the step is damaged.

    Failures come back as text, never as a live exception: Orbax's exception holds the traceback of the
    reads it abandoned, and keeping it alive only delays their noisy collection."""
    path = os.path.join(self.directory, str(step))
    if kind != "dir":
      return "not a directory"
    missing = []
    for rel in _REQUIRED:  # a missing directory is named alone, not with each file it held
      if not os.path.exists(os.path.join(path, rel)) and os.path.dirname(rel) not in missing:
        missing.append(rel)
    if missing:
      return f"missing {', '.join(missing)}"
    progress, why = self._read(step, progress=ocp.args.JsonRestore())
    if why:
      return f"progress unreadable: {why}"
    record = progress.get(CHECKSUMS_KEY) if isinstance(progress, dict) else None
    expected = record.get("leaves") if isinstance(record, dict) and record.get("format") == CHECKSUM_FORMAT else None
    if not isinstance(expected, dict) or not all(isinstance(v, list) and len(v) == 3 for v in expected.values()):
      return f"progress holds no {CHECKSUMS_KEY} record of format {CHECKSUM_FORMAT}"
    like_leaves = _leaves(like)
    names = [name for name, _ in like_leaves]
    if sorted(names) != sorted(expected):
      only_saved, only_like = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
      return _Mismatch(f"leaves differ from the state's (checkpoint only: {_names(only_saved) or 'none'}; "
                       f"state only: {_names(only_like) or 'none'})")
    for name, leaf in like_leaves:
      if _spec(leaf) != expected[name][:2]:
        return _Mismatch(f"leaf {name} is {expected[name][:2]} in the checkpoint, {_spec(leaf)} in the state")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    state, why = self._read(step, state=ocp.args.StandardRestore(abstract))
    if why:
      return f"arrays unreadable: {why}"
    got, non_finite = checksums(state)
    if non_finite:
      return f"non-finite values in {_names(non_finite)}"
    corrupted = [name for name in names if got[name][2] != expected[name][2]]
    if corrupted:
      return f"checksum mismatch in {_names(corrupted)} (data files corrupted)"
    return state, {k: v for k, v in progress.items() if k != CHECKSUMS_KEY}, step

  def _read(self, step: int, **item_args) -> tuple[Any, str | None]:
    """(the one item Orbax restores, None) or (None, why it failed, one line)."""
    (name, args), = item_args.items()
    _silence_abandoned_reads()  # before the read: TensorStore's threads report while Orbax is failing
    try:
      with _ORBAX_LOCK:
        return self._manager.restore(step, args=ocp.args.Composite(**{name: args}))[name], None
    except Exception as e:  # pylint: disable=broad-except  # any failure to read marks the step damaged
      why = _one_line(e)
    gc.collect()  # the exception's traceback held the abandoned reads: collect them now, filters in place
    return None, why

  # -- lifetime

  def wait(self) -> None:
    """Blocks until in-flight async saves are written; CheckpointError if one failed."""
    with _ORBAX_LOCK:
      self._finish_in_flight()
      failed, self._failed = self._failed, None
    if failed is not None:
      raise failed

  def _finish_in_flight(self) -> None:
    """Waits for the in-flight save (holding `_ORBAX_LOCK`); a failure is kept for this one's `wait`."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed = self._failed or CheckpointError(
          f"an async checkpoint save in {self.directory} failed: {_one_line(e)}")

  def close(self) -> None:
    """Waits for in-flight saves, then releases Orbax's threads; a second call does nothing.

    A failed in-flight save raises CheckpointError, unless close() runs while another exception is on its
    way out (a `finally` or `with` block): then it is one warning line and that exception stays the one
    the caller sees."""
    if self._closed:
      return
    self._closed = True
    propagating = sys.exc_info()[1] is not None
    try:
      self.wait()
    except CheckpointError as e:
      if not propagating:
        raise
      _warn(str(e))
    finally:
      with _ORBAX_LOCK:
        _OPEN.discard(self)
        try:
          self._manager.close()
        except Exception as e:  # pylint: disable=broad-except  # a failed save was reported by wait() above
          logging.info("closing the checkpoint manager: %s", _one_line(e))

  @property
  def closed(self) -> bool:
    return self._closed

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _close_at_exit(ref: "weakref.ref[Checkpointer]") -> None:
  """Closes a checkpointer its caller left open (interpreter exit; see Checkpointer.__init__)."""
  checkpointer = ref()
  if checkpointer is not None and not checkpointer.closed:
    try:
      checkpointer.close()
    except CheckpointError as e:
      _warn(str(e))


# ---------------------------------------------------------------------------------------------- Inference


RUNS_FILE = "runs.json"  # a population's workdir: [{run_id, config}] of its models (`sweep.train_group`)


def load_for_inference(workdir: str, member: int | str | None = None):
  """(LanguageModel holding the best-validation parameters, full run config) of a run's workdir (an MQAR
  run of `zoo_jax.train` or an LM run of `zoo_jax.lm`), finished or interrupted, on one device.

  The newest good checkpoint is restored (damaged steps are skipped as in training); the model's
  parameters are its `best_params`. A population's workdir (a run of seeds × learning rates, e.g. the
  README's first command, `experiments/mqar.py`; or a sweep group's directory) holds several models:
  `member` picks one, by index or run id (`<run>-lr<lr>-s<seed>`, as summary.json's `members` name them);
  it may be omitted for a population of one. `load_population_for_inference` gives every model at once.
  """
  configs, ids = _recorded_configs(workdir)
  if ids is None:  # one run
    if member not in (None, 0):
      raise ValueError(f"member must be None or 0 for {workdir} (one run, not a population), got {member!r}")
    index = 0
  else:
    index = _member_index(member, ids, workdir)
  models, config = _restore_best(workdir, configs, index)
  return models(index), config


def load_population_for_inference(workdir: str) -> list[tuple[str, Any, Any]]:
  """[(run id, LanguageModel, full run config)] of every model of a run's workdir, in `member` order (one
  entry, run id 'run', for a single run), from one restore of its checkpoint (`load_for_inference`)."""
  from zoo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  configs, ids = _recorded_configs(workdir)
  models, first = _restore_best(workdir, configs, 0)
  return [(run_id, models(i), first if i == 0 else config_lib.resolve(configs[i])[0])
          for i, run_id in enumerate(ids or ["run"])]


def _recorded_configs(workdir: str) -> tuple[list[dict], list[str] | None]:
  """(each model's full config, their run ids; None for a single run) as a run's workdir records them:
  config.json holds a single run's config, or a population's member ids beside its runs.json."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{config_path} not found: not a run's workdir (written by zoo_jax.train or zoo_jax.lm)")
  with open(config_path) as f:
    written = json.load(f)
  if isinstance(written, Mapping):
    return [written], None
  runs_path = os.path.join(workdir, RUNS_FILE)
  if not os.path.isfile(runs_path):
    raise CheckpointError(f"{workdir} holds a population written without {RUNS_FILE} (by zoo_jax before it "
                          "was recorded): its models' configs are unknown; train it again to load it")
  with open(runs_path) as f:
    runs = json.load(f)
  return [r["config"] for r in runs], [r["run_id"] for r in runs]


def _restore_best(workdir: str, configs: list[dict], index: int):
  """(i -> the LanguageModel of model i's best parameters, model `index`'s resolved config): the newest
  good checkpoint of the workdir's population (its models share one architecture), restored once."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from zoo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from zoo_jax import sharding  # pylint: disable=g-import-not-at-top
  from zoo_jax import trainer  # pylint: disable=g-import-not-at-top
  config, model_cfg = config_lib.resolve(configs[index])
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  members = []
  for i, c in enumerate(configs):
    resolved = config if i == index else config_lib.resolve(c)[0]
    members.append(trainer.Member(f"m{i}", resolved.seed, resolved.train.learning_rate, resolved.train.weight_decay))
  graphdef, like, _, _, _ = trainer.init_state(model_cfg, config.train, members, 1, mesh)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
  try:
    restored = checkpointer.restore(like)
  finally:
    checkpointer.close()
  if restored is None:
    raise CheckpointError(f"{workdir}/checkpoints holds no checkpoint")
  best = restored[0]["best_params"]
  return (lambda i: nnx.merge(graphdef, jax.tree.map(lambda x: x[i], best))), config


def _member_index(member: int | str | None, ids: list[str], workdir: str) -> int:
  """The index of `member` (an index or a run id) among a population's `ids`; one-line errors."""
  if member is None and len(ids) == 1:
    return 0
  if isinstance(member, str) and member in ids:
    return ids.index(member)
  if isinstance(member, (int, np.integer)) and not isinstance(member, bool) and 0 <= member < len(ids):
    return int(member)
  raise ValueError(f"{workdir} holds a population of {len(ids)} models: member must be an index in [0, "
                   f"{len(ids) - 1}] or one of {ids}, got {member!r}")
