r"""Reliability of the training core, end to end: real runs of experiments/mqar.py killed, damaged, raced.

  nice python experiments/bench_reliability.py                    # all six parts, ~6 min on 2 loaded cores
  python experiments/bench_reliability.py --parts=1,2 --kinds=truncate,flip --kills=4 --keep

Every run is the binary itself, `experiments/mqar.py --config=<root>/tiny.py:attention --workdir=DIR
[--config.train.*=...]`, as a subprocess: a tiny MQAR attention run (V=64, L=16, kv=2, 512 training
examples, batch 32: 16 steps per epoch, 4 epochs = 64 steps, a checkpoint every 4 steps, the newest 3
kept, no early stop), ~8 s with a warm compilation cache. `tiny.py` is written into the bench's root
directory: the MQAR config's data splits are lists, which `--config.*` overrides cannot shrink. Runs share
JAX's persistent compilation cache (`--no-compilation_cache`: each run compiles); when part 6 runs, a
warm-up run fills it first, so that the reference's times, which part 6 draws its kill times from, are warm.
The uninterrupted run U is the reference of every part. Each run's command, exit status and timestamped
output go to `<root>/logs/` (`--keep` keeps them).

Parts, one markdown table each (a measurement: the script exits 0 whatever it finds; `verdict` says ok or
what failed):
  1. damaged newest checkpoint: a run killed (SIGKILL) once its 2nd checkpoint is on disk is copied; A
     resumes a copy as is, A' a copy with the newest step deleted; every other copy has its newest step
     damaged in one way (the kinds of tests/test_checkpoint.py, plus a one-bit flip and every step
     damaged) and resumes: its exit code, the step it resumed from, the `warning: ... skipped` lines,
     tracebacks, other stderr lines, and its summary against A' (against A for a stray step beside the
     newest); exit 0 with a summary that differs is flagged SILENT WRONG RESULT;
  2. two processes started at once on one workdir (and one started once the first has checkpointed): how
     fast the second refuses (after its own start-up: imports and config), its stderr, the first's summary
     against U; the one holding the lock is paused (SIGSTOP) until the other has exited, so that load cannot
     let it finish first (its wall time includes the pause);
  3. `checkpoints` is a file, a dangling symlink or a symlink to a file: exit code, stderr, seconds (a
     timeout catches hangs), nothing written;
  4. a non-finite loss (lr 10, weight decay 10, batch 8) before any checkpoint and after good ones: the
     message names the last good checkpoint only when there is one, that one is the newest on disk and
     restores without a warning; no `*.orbax-checkpoint-tmp` left, no traceback ("cannot schedule new
     futures");
  5. a changed config in an existing workdir (finished and interrupted): one line, every file unchanged
     (sha256 of the tree, `.lock` aside);
  6. kill -9 at moments drawn at random in start-up, in training, within a save (its temporary directory
     just appeared) and in the run's tail (test evaluation, summary.json, exit), then a last resume: its
     summary against U, metrics.jsonl lines that do not parse, checkpoints/ leftovers.

Summaries are compared on validation/test accuracy and loss, per-slice accuracies, best epoch and steps,
to 1e-6.
"""

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(REPO, "experiments", "mqar.py")
RUN = "attention"  # the one run of tiny.py; its workdir is <workdir>/attention
TOTAL_STEPS = 64
EPOCHS = 4  # of 16 steps
TMP_SUFFIX = ".orbax-checkpoint-tmp"
TOLERANCE = 1e-6
COMPARED = ("validation_accuracy", "validation_loss", "test_accuracy", "test_loss", "best_epoch", "steps",
            "test_slices", "validation_slices")

TINY_CONFIG = '''"""The tiny MQAR run of experiments/bench_reliability.py (which writes this file): 64 steps."""
from zoo_jax.configs.mqar import get_config as _mqar_config


def get_config(arg=None):
  c = _mqar_config(arg or "attention")
  segment = lambda n: [dict(seq_len=16, num_kv_pairs=2, num_examples=n)]
  c.data.vocab_size = 64
  c.data.train_segments, c.data.validation_segments, c.data.test_segments = segment(512), segment(64), segment(64)
  c.model.d_model = 32
  c.train.update(epochs=4, batch_size=32, eval_batch_size=64, log_every_steps=8, checkpoint_every_steps=4,
                 keep_checkpoints=3, early_stop_accuracy=2.0)
  for run in c.runs.values():
    run["data"] = {}  # the run's own splits would replace the tiny ones
  return c
'''

# Runs JAX in a subprocess for what the bench itself does not (it imports no JAX): `non_finite` rewrites the
# newest step with a NaN in a parameter and a checksum record that matches its bytes (a state `save` refuses
# to write, so Orbax writes it directly); `restore` loads the workdir as a notebook would.
HELPER = r'''
import json, os, shutil, sys
import jax, jax.numpy as jnp
import orbax.checkpoint as ocp
from zoo_jax import checkpoint as ck, config as config_lib, sharding, trainer

command, workdir = sys.argv[1], sys.argv[2]
directory = os.path.join(workdir, "checkpoints")
if command == "non_finite":
  with open(os.path.join(workdir, "config.json")) as f:
    config, model_cfg = config_lib.resolve(json.load(f))
  member = trainer.Member("run", config.seed, config.train.learning_rate, config.train.weight_decay)
  like = trainer.init_state(model_cfg, config.train, [member], 1, sharding.make_mesh(devices=jax.devices()[:1]))[1]
  with ck.Checkpointer(directory) as checkpointer:
    state, progress, step = checkpointer.restore(like)
  first = jax.tree_util.tree_flatten_with_path(state["params"])[0][0][0]
  state["params"] = jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[(0,) * x.ndim].set(jnp.nan) if path == first else x, state["params"])
  progress[ck.CHECKSUMS_KEY] = dict(format=ck.CHECKSUM_FORMAT, leaves=ck.checksums(state)[0])
  shutil.rmtree(os.path.join(directory, str(step)))
  manager = ocp.CheckpointManager(directory)
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             progress=ocp.args.JsonSave(progress)))
  manager.wait_until_finished()
  manager.close()
elif command == "restore":
  ck.load_for_inference(workdir)
print("ok")
'''


# ---------------------------------------------------------------------------------------------- Runs


class Run:
  """One experiments/mqar.py subprocess; every output line kept with its time since the start."""

  def __init__(self, env: dict, config: str, workdir: str, *overrides: str, log: str | None = None):
    self.workdir = workdir
    self.log = log  # where wait() writes the command, stdout and stderr
    self.args = [sys.executable, BINARY, f"--config={config}:{RUN}", f"--workdir={workdir}", *overrides]
    self.start = time.monotonic()
    self.popen = subprocess.Popen(
        self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    self.out: list[tuple[float, str]] = []
    self.err: list[tuple[float, str]] = []
    self.end: float | None = None
    self.killed_at: float | None = None
    self.timed_out = False
    self._threads = [threading.Thread(target=self._read, args=(self.popen.stdout, self.out), daemon=True),
                     threading.Thread(target=self._read, args=(self.popen.stderr, self.err), daemon=True),
                     threading.Thread(target=self._reap, daemon=True)]
    for thread in self._threads:
      thread.start()

  def _read(self, stream, lines) -> None:
    for line in stream:
      lines.append((time.monotonic() - self.start, line.rstrip("\n")))

  def _reap(self) -> None:
    self.popen.wait()
    self.end = time.monotonic() - self.start

  def alive(self) -> bool:
    return self.popen.poll() is None

  def kill(self) -> bool:
    """SIGKILL, as a crash or an OOM killer would; True if the process was still running."""
    if not self.alive():
      return False
    self.killed_at = time.monotonic() - self.start
    self.popen.send_signal(signal.SIGKILL)
    return True

  def pause(self) -> bool:
    """SIGSTOP (it keeps its flock and its place; SIGKILL still ends it); True if it was still running."""
    if not self.alive():
      return False
    self.popen.send_signal(signal.SIGSTOP)
    return True

  def resume(self) -> None:
    if self.alive():
      self.popen.send_signal(signal.SIGCONT)

  def wait(self, timeout: float) -> "Run":
    try:
      self.popen.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      self.popen.wait()
      self.timed_out = True
    for thread in self._threads:
      thread.join()
    if self.log:
      with open(self.log, "w") as f:
        f.write(f"$ {' '.join(self.args)}\nexit {self.rc}, {self.wall:.2f} s"
                + (f", killed at {self.killed_at:.2f} s" if self.killed_at is not None else "") + "\n")
        f.writelines(f"[{t:7.2f} out] {line}\n" for t, line in self.out)
        f.writelines(f"[{t:7.2f} err] {line}\n" for t, line in self.err)
    return self

  @property
  def rc(self) -> int:
    return self.popen.returncode

  @property
  def wall(self) -> float:
    return self.end if self.end is not None else time.monotonic() - self.start

  def stdout(self) -> list[str]:
    return [line for _, line in self.out]

  def stderr(self) -> list[str]:
    return [line for _, line in self.err]

  def warnings(self) -> list[str]:
    """`warning: ` lines; one printed while another thread prints (a traceback) counts wherever it starts."""
    return [line[line.index("warning: "):] for line in self.stderr() if "warning: " in line]

  def errors(self) -> list[str]:
    return [line[line.index("error: "):] for line in self.stderr() if "error: " in line]

  def spliced(self) -> int:
    """`warning: ` / `error: ` lines that do not start their line: other output printed into them."""
    return sum(("warning: " in line and not line.startswith("warning: "))
               or ("error: " in line and not line.startswith("error: ")) for line in self.stderr())

  def tracebacks(self) -> int:
    return sum("Traceback (most recent call last)" in line for line in self.stderr())

  def other_stderr(self) -> list[str]:
    """Stderr lines that are neither `warning: ` nor `error: ` lines (tracebacks, logging)."""
    return [line for line in self.stderr() if line.strip() and not line.startswith(("warning: ", "error: "))]

  def resumed_from(self) -> int | None:
    for line in self.stdout():
      if line.startswith("resumed from step "):
        return int(line.split()[-1])
    return None

  def time_of(self, prefix: str) -> float | None:
    return next((t for t, line in self.out if line.startswith(prefix)), None)

  def last_line_before(self, t: float) -> str:
    lines = [line for s, line in self.out if s <= t and line.strip()]
    return lines[-1] if lines else "(nothing printed yet: imports)"


class Bench:
  def __init__(self, root: str, compilation_cache: bool, timeout: float):
    self.root = root
    self.timeout = timeout
    self.config = os.path.join(root, "tiny.py")
    with open(self.config, "w") as f:
      f.write(TINY_CONFIG)
    self.env = dict(os.environ, PYTHONUNBUFFERED="1")
    if compilation_cache:
      self.env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    self.reference: Run | None = None
    self.logs = os.path.join(root, "logs")
    os.makedirs(self.logs, exist_ok=True)
    self._count = 0

  def path(self, *names: str) -> str:
    return os.path.join(self.root, *names)

  def start(self, workdir: str, *overrides: str) -> Run:
    self._count += 1
    label = os.path.relpath(workdir, self.root).replace(os.sep, "_")
    log = os.path.join(self.logs, f"{self._count:03d}_{label}.log")
    return Run(self.env, self.config, workdir, *overrides, log=log)

  def run(self, workdir: str, *overrides: str) -> Run:
    return self.start(workdir, *overrides).wait(self.timeout)

  def run_until_checkpoints(self, workdir: str, count: int, *overrides: str) -> Run:
    """A run SIGKILLed the moment `count` finished steps are in its checkpoints directory."""
    run = self.start(workdir, *overrides)
    deadline = time.monotonic() + self.timeout
    while run.alive() and time.monotonic() < deadline:
      if len(finished_steps(workdir)) >= count:
        run.kill()
        break
      time.sleep(0.002)
    return run.wait(self.timeout)

  def helper(self, command: str, run_dir: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HELPER, command, run_dir], capture_output=True, text=True,
                          cwd=REPO, env=self.env, timeout=self.timeout)


# ---------------------------------------------------------------------------------------------- Workdirs


def run_dir(workdir: str) -> str:
  return os.path.join(workdir, RUN)


def ckpt_dir(workdir: str) -> str:
  return os.path.join(workdir, RUN, "checkpoints")


def entries(workdir: str) -> list[str]:
  try:
    names = os.listdir(ckpt_dir(workdir))
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted(names, key=lambda n: (int(n.split(".")[0]) if n.split(".")[0].isdigit() else 10**9, n))


def finished_steps(workdir: str) -> list[int]:
  directory = ckpt_dir(workdir)
  return sorted(int(n) for n in entries(workdir) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def lock_holder(workdir: str) -> int | None:
  """The pid in the run's `.lock`, which `open_workdir` writes once it holds the flock; None before."""
  try:
    with open(os.path.join(run_dir(workdir), ".lock")) as f:
      text = f.read().strip()
  except FileNotFoundError:
    return None
  return int(text) if text.isdigit() else None


def leftovers(workdir: str) -> list[str]:
  """What the checkpoints directory holds besides finished step directories."""
  directory = ckpt_dir(workdir)
  return [n for n in entries(workdir) if not (n.isdigit() and os.path.isdir(os.path.join(directory, n)))]


def saves_in_flight(workdir: str, stale: frozenset = frozenset()) -> frozenset:
  """The unfinished saves in the checkpoints directory, as (name, inode, ctime); those in `stale` left out
  (Orbax reuses the name of a killed save's temporary directory when it saves that step again)."""
  out = set()
  for name in entries(workdir):
    if name.endswith(TMP_SUFFIX):
      try:
        st = os.stat(os.path.join(ckpt_dir(workdir), name))
      except FileNotFoundError:
        continue
      out.add((name, st.st_ino, st.st_ctime_ns))
  return frozenset(out - stale)


def summary_of(workdir: str) -> dict | None:
  try:
    with open(os.path.join(run_dir(workdir), "summary.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def compare(summary: dict | None, reference: dict | None) -> str:
  """'equal', or the first key that differs by more than TOLERANCE."""
  if summary is None or reference is None:
    return "no summary" if summary is None else "no reference"

  def flat(d):
    out = {}
    for key in COMPARED:
      value = d.get(key)
      if isinstance(value, dict):
        out.update({f"{key}.{k}": v for k, v in value.items()})
      else:
        out[key] = value
    return out

  a, b = flat(summary), flat(reference)
  for key in sorted(a.keys() | b.keys()):
    x, y = a.get(key), b.get(key)
    if x is None or y is None or abs(float(x) - float(y)) > TOLERANCE:
      return f"differs: {key} {x} vs {y}"
  return "equal"


def copy_workdir(src: str, dst: str) -> str:
  shutil.copytree(src, dst, symlinks=True)
  return dst


def tree_hashes(path: str) -> dict[str, str]:
  """{relative path: sha256} of every file under `path` but `.lock` (whose content is the holder's pid)."""
  out = {}
  for dirpath, _, files in os.walk(path):
    for name in files:
      full = os.path.join(dirpath, name)
      rel = os.path.relpath(full, path)
      if name == ".lock" or os.path.islink(full):
        continue
      with open(full, "rb") as f:
        out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


def metrics_check(workdir: str) -> tuple[int, int]:
  """(lines of metrics.jsonl that do not parse, training records repeating an earlier record's step: the
  steps a killed run trained past its last checkpoint are trained and logged again on resume)."""
  try:
    with open(os.path.join(run_dir(workdir), "metrics.jsonl")) as f:
      lines = f.read().split("\n")
  except OSError:
    return -1, -1
  bad, seen, repeated = 0, set(), 0
  for line in lines:
    if line.strip():
      try:
        record = json.loads(line)
      except ValueError:
        bad += 1
        continue
      if "train/loss" in record:
        repeated += record["step"] in seen
        seen.add(record["step"])
  return bad, repeated


def table(header: list[str], rows: list[list]) -> str:
  def cell(x):
    return f"{x:.2f}" if isinstance(x, float) else str(x).replace("|", "\\|")

  lines = [header, ["---"] * len(header)] + [[cell(x) for x in row] for row in rows]
  return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def verdicts(markdown: str) -> list[str]:
  """The cells of every `verdict` column of the markdown tables in `markdown`, one per row."""
  out, column = [], None
  for line in markdown.splitlines():
    if not line.startswith("| "):
      column = None
      continue
    cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
    if column is None:
      column = cells.index("verdict") if "verdict" in cells else -1
    elif column >= 0 and set(cells) != {"---"}:
      out.append(cells[column])
  return out


def short(text: str, limit: int = 150) -> str:
  return text if len(text) <= limit else text[:limit - 1] + "…"


def note(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- Damage

# Each kind damages the checkpoints directory of a killed run whose newest finished step is `newest`.


def largest_data_file(step_dir: str) -> str:
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def truncate(step_dir, _):
  path = largest_data_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def zero(step_dir, _):
  path = largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.write(bytes(os.path.getsize(path)))


def flip(step_dir, _, mask: int = 0xFF, count: int = 8):
  path = largest_data_file(step_dir)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ mask for b in data[middle:middle + count])
    f.seek(0)
    f.write(data)


def flip_one_bit(step_dir, bench):
  flip(step_dir, bench, mask=0x01, count=1)


def remove(rel):
  def damage(step_dir, _):
    path = os.path.join(step_dir, rel)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  damage.__name__ = f"remove {rel}"
  return damage


def write_progress(text, name):
  def damage(step_dir, _):
    with open(os.path.join(step_dir, "progress", "metadata"), "w") as f:
      f.write(text)
  damage.__name__ = name
  return damage


def edit_record(step_dir, _):
  """The checksum record says float16 for a float32 parameter."""
  path = os.path.join(step_dir, "progress", "metadata")
  with open(path) as f:
    record = json.load(f)
  leaves = record["_checksums"]["leaves"]
  leaves[sorted(k for k in leaves if k.startswith("['params']"))[0]][1] = "float16"
  with open(path, "w") as f:
    json.dump(record, f)


def non_finite(step_dir, bench):
  result = bench.helper("non_finite", os.path.dirname(os.path.dirname(step_dir)))
  if result.returncode != 0:
    raise RuntimeError(f"non_finite damage failed: {result.stderr[-2000:]}")


def to_file(step_dir, _):
  shutil.rmtree(step_dir)
  with open(step_dir, "w") as f:
    f.write("not a checkpoint")


def unfinished(step_dir, _):
  os.rename(step_dir, step_dir + TMP_SUFFIX)


STRAY = 999


def stray_dir(step_dir, _):
  os.mkdir(os.path.join(os.path.dirname(step_dir), str(STRAY)))


def stray_file(step_dir, _):
  open(os.path.join(os.path.dirname(step_dir), str(STRAY)), "w").close()


def stray_unfinished(step_dir, _):
  newest = int(os.path.basename(step_dir))
  shutil.copytree(step_dir, os.path.join(os.path.dirname(step_dir), f"{newest + 1}{TMP_SUFFIX}"))


def every_step_zeroed(step_dir, bench):
  directory = os.path.dirname(step_dir)
  for name in os.listdir(directory):
    if name.isdigit():
      zero(os.path.join(directory, name), bench)


@dataclasses.dataclass(frozen=True)
class Damage:
  name: str
  apply: object
  target: str = "newest"  # 'newest': skips the newest, resumes from the previous (reference A');
  # 'stray': skips a step beside the newest, resumes from the newest (reference A); 'all': exit 1


DAMAGE = [
    Damage("truncate", truncate), Damage("zero", zero), Damage("flip", flip), Damage("flip_one_bit", flip_one_bit),
    Damage("remove_state", remove("state")), Damage("remove_progress", remove("progress")),
    Damage("progress_garbage", write_progress("{not json", "progress_garbage")),
    Damage("progress_empty", write_progress("", "progress_empty")),
    Damage("progress_no_record", write_progress('{"epoch": 2}', "progress_no_record")),
    Damage("remove_CHECKPOINT_METADATA", remove("_CHECKPOINT_METADATA")),
    Damage("remove_state_METADATA", remove("state/_METADATA")),
    Damage("remove_manifest_ocdbt", remove("state/manifest.ocdbt")),
    Damage("remove_progress_metadata", remove("progress/metadata")),
    Damage("remove_state_d", remove("state/d")),
    Damage("edit_record", edit_record), Damage("non_finite", non_finite), Damage("to_file", to_file),
    Damage("unfinished", unfinished),
    Damage("stray_dir", stray_dir, "stray"), Damage("stray_file", stray_file, "stray"),
    Damage("stray_unfinished", stray_unfinished, "stray"),
    Damage("every_step_zeroed", every_step_zeroed, "all"),
]


# ---------------------------------------------------------------------------------------------- Parts


def part_reference(bench: Bench, warm_up: bool) -> str:
  rows = []
  if warm_up:  # fills the compilation cache, so that U's times (part 6 draws its kill times from them) are warm
    run = bench.run(bench.path("warm_up"))
    rows.append(["warm-up (fills the compilation cache)", run.rc, run.wall, "", "", "", len(run.warnings()),
                 run.tracebacks(), "ok" if run.rc == 0 else "FAILED"])
  run = bench.run(bench.path("U"))
  bench.reference = run
  s = summary_of(bench.path("U"))
  ok = run.rc == 0 and s is not None and s["steps"] == TOTAL_STEPS and not run.warnings() and not run.tracebacks()
  rows += [["U (uninterrupted)", run.rc, run.wall, s and s["steps"], s and f"{s['test_accuracy']:.4f}",
           s and f"{s['test_loss']:.6f}", len(run.warnings()), run.tracebacks(), "ok" if ok else "FAILED"]]
  return table(["run", "exit", "wall s", "steps", "test acc", "test loss", "warnings", "tracebacks", "verdict"], rows)


def part1(bench: Bench, kinds: list[str]) -> str:
  killed = bench.path("p1", "killed")
  run = bench.run_until_checkpoints(killed, 2)
  steps, left = finished_steps(killed), leftovers(killed)
  if len(steps) < 2:
    return f"the run was not stopped with 2 checkpoints (exit {run.rc}, steps {steps}); part 1 skipped"
  newest, previous = steps[-1], steps[-2]
  reference = summary_of(bench.path("U"))
  a = bench.run(copy_workdir(killed, bench.path("p1", "A")))
  a_prime_dir = copy_workdir(killed, bench.path("p1", "A_prime"))
  shutil.rmtree(os.path.join(ckpt_dir(a_prime_dir), str(newest)))
  a_prime = bench.run(a_prime_dir)
  summary_a, summary_a_prime = summary_of(bench.path("p1", "A")), summary_of(a_prime_dir)
  lines = [f"killed at {run.killed_at:.2f} s with checkpoints/ = {entries(killed)} (leftovers: {left or 'none'}); "
           f"A resumed from step {a.resumed_from()} (exit {a.rc}, vs U: {compare(summary_a, reference)}); "
           f"A' (step {newest} deleted) from step {a_prime.resumed_from()} (exit {a_prime.rc}, vs U: "
           f"{compare(summary_a_prime, reference)}, vs A: {compare(summary_a_prime, summary_a)})", ""]
  rows, skip_lines = [], []
  for damage in [d for d in DAMAGE if d.name in kinds]:
    note(f"part 1: {damage.name}")
    workdir = copy_workdir(killed, bench.path("p1", damage.name))
    damage.apply(os.path.join(ckpt_dir(workdir), str(newest)), bench)
    res = bench.run(workdir)
    skipped_step = {"newest": newest, "stray": STRAY if damage.name != "stray_unfinished" else newest + 1,
                    "all": newest}[damage.target]
    expected_step = {"newest": previous, "stray": newest, "all": None}[damage.target]
    ref = summary_a if damage.target == "stray" else summary_a_prime
    skips = [w for w in res.warnings() if " skipped" in w]
    naming = [w for w in skips if f"step {skipped_step} " in w]
    others = [w for w in res.warnings() if w not in skips]
    verdict_parts = []
    if damage.target == "all":
      result = "—"
      if res.rc != 1:
        verdict_parts.append(f"exit {res.rc}, expected 1")
      if len(res.errors()) != 1 or "every checkpoint" not in " ".join(res.errors()):
        verdict_parts.append(f"{len(res.errors())} error lines")
      if summary_of(workdir) is not None:
        verdict_parts.append("wrote a summary")
    else:
      result = compare(summary_of(workdir), ref) if res.rc == 0 else "—"
      if res.rc != 0:
        verdict_parts.append(f"exit {res.rc}")
      elif result != "equal":
        verdict_parts.append("SILENT WRONG RESULT")
      if res.rc == 0 and res.resumed_from() != expected_step:
        verdict_parts.append(f"resumed from {res.resumed_from()}")
      if len(skips) != 1 or len(naming) != 1:
        verdict_parts.append(f"{len(skips)} skip lines, {len(naming)} naming step {skipped_step}")
    if res.spliced():
      verdict_parts.append(f"{res.spliced()} warning/error line(s) spliced with a traceback")
    if res.tracebacks():
      verdict_parts.append(f"{res.tracebacks()} traceback(s)")
    if res.timed_out:
      verdict_parts.append("TIMED OUT")
    rows.append([damage.name, skipped_step, res.rc, f"{res.resumed_from()} ({expected_step})", len(skips),
                 "yes" if naming else "no", len(others), res.tracebacks(), len(res.other_stderr()),
                 " ".join(leftovers(workdir)) or "—", result,
                 "ok" if not verdict_parts else "; ".join(verdict_parts)])
    skip_lines.append(f"- {damage.name}: " + (" / ".join(short(w, 200) for w in skips + others + res.errors()
                                                         + res.other_stderr()) or "(no stderr)"))
  header = ["damage", "skipped step", "exit", "resumed from (expected)", "skip lines", "names it", "other warnings",
            "tracebacks", "other stderr lines", "checkpoints/ leftovers after", "summary vs reference", "verdict"]
  return "\n\n".join(lines) + table(header, rows) + "\n\nstderr warning/error lines per kind:\n" + "\n".join(skip_lines)


def part2(bench: Bench, trials: int) -> str:
  reference = summary_of(bench.path("U"))
  rows = []
  for trial in range(trials + 1):
    workdir = bench.path("p2", f"trial{trial}")
    at_once = trial < trials
    # The run holding the lock is paused (SIGSTOP, which keeps its flock) from the event (its pid in `.lock`;
    # its first checkpoint on disk) until the other has exited: on a loaded machine it could otherwise finish
    # before the other's start-up reaches the lock, and the other would then resume a finished run.
    first = bench.start(workdir)
    deadline = time.monotonic() + bench.timeout
    if not at_once:  # the second once the first has written a checkpoint
      while first.alive() and not finished_steps(workdir) and time.monotonic() < deadline:
        time.sleep(0.002)
      first.pause()
    second = bench.start(workdir)
    holder, other = first, second
    if at_once:
      pids = {first.popen.pid: (first, second), second.popen.pid: (second, first)}
      while (first.alive() or second.alive()) and lock_holder(workdir) not in pids and time.monotonic() < deadline:
        time.sleep(0.002)
      holder, other = pids.get(lock_holder(workdir), (first, second))
      holder.pause()
    try:
      other.wait(bench.timeout)
    finally:
      holder.resume()
    holder.wait(bench.timeout)
    runs = sorted([first, second], key=lambda r: r.rc != 0)  # the one that trained first
    winner, loser = runs
    after_startup = (loser.wall - loser.time_of(f"=== {RUN} ===")) if loser.time_of(f"=== {RUN} ===") else None
    problems = []
    if winner.rc != 0 or loser.rc == 0:
      problems.append(f"exits {first.rc}, {second.rc}")
    result = compare(summary_of(workdir), reference)
    if result != "equal":
      problems.append("summary " + result)
    refusal = loser.stderr()
    if len(refusal) != 1 or "in use by another run" not in refusal[0]:
      problems.append(f"{len(refusal)} stderr lines")
    elif f"(pid {winner.popen.pid})" not in refusal[0]:
      problems.append("names another pid")
    if any(line.startswith("training ") for line in loser.stdout()):
      problems.append("the second trained")
    rows.append([trial + 1, "at once" if at_once else "after the 1st's checkpoint",
                 "1st" if winner is first else "2nd", winner.rc, winner.wall, result, loser.rc, loser.wall,
                 after_startup, len(refusal), short(refusal[0] if refusal else "", 160),
                 "ok" if not problems else "; ".join(problems)])
  return table(["trial", "start", "winner", "winner exit", "winner wall s", "winner summary vs U", "loser exit",
                "loser wall s", "loser s after start-up", "loser stderr lines", "loser stderr", "verdict"], rows)


def part3(bench: Bench) -> str:
  rows = []
  for case in ("a file", "a dangling symlink", "a symlink to a file"):
    workdir = bench.path("p3", case.replace(" ", "_"))
    os.makedirs(run_dir(workdir))
    path = ckpt_dir(workdir)
    if case == "a file":
      open(path, "w").close()
    elif case == "a dangling symlink":
      os.symlink(os.path.join(workdir, "nowhere"), path)
    else:
      open(os.path.join(workdir, "target"), "w").close()
      os.symlink(os.path.join(workdir, "target"), path)
    res = bench.run(workdir)
    written = sorted(set(os.listdir(run_dir(workdir))) - {"checkpoints", ".lock"})
    problems = []
    if res.rc != 1 or len(res.stderr()) != 1 or "not a directory" not in " ".join(res.stderr()):
      problems.append(f"exit {res.rc}, {len(res.stderr())} stderr lines")
    if written:
      problems.append(f"wrote {written}")
    if res.timed_out:
      problems.append("TIMED OUT")
    rows.append([f"checkpoints is {case}", res.rc, res.wall, len(res.stderr()), short(" / ".join(res.stderr()), 200),
                 " ".join(written) or "nothing", "ok" if not problems else "; ".join(problems)])
  return table(["case", "exit", "wall s", "stderr lines", "stderr", "written", "verdict"], rows)


DIVERGE = ("--config.train.learning_rate=10", "--config.train.weight_decay=10", "--config.train.batch_size=8")


def part4(bench: Bench) -> str:
  rows = []
  for case, every in (("no checkpoint yet", 0), ("after good checkpoints", 1)):
    workdir = bench.path("p4", case.replace(" ", "_"))
    res = bench.run(workdir, *DIVERGE, f"--config.train.checkpoint_every_steps={every}")
    steps = finished_steps(workdir)
    message = " ".join(res.errors())
    named = None
    if "last good checkpoint is step " in message:
      named = int(message.split("last good checkpoint is step ")[1].split()[0])
    problems = []
    if res.rc != 1 or len(res.errors()) != 1 or "non-finite" not in message:
      problems.append(f"exit {res.rc}, {len(res.errors())} error lines")
    if every == 0 and (named is not None or "no checkpoint had been written yet" not in message or steps):
      problems.append("claims a checkpoint" if named is not None else f"steps on disk {steps}")
    restores = "—"
    if every:
      if named is None or not steps or named != steps[-1]:
        problems.append(f"names step {named}, newest on disk {steps[-1] if steps else None}")
      else:
        check = bench.helper("restore", run_dir(workdir))
        clean = check.returncode == 0 and "warning:" not in check.stderr
        restores = "yes" if clean else short(check.stderr.strip()[-150:])
        if restores != "yes":
          problems.append("the named step does not restore cleanly")
    tmp = [n for n in leftovers(workdir) if n.endswith(TMP_SUFFIX)]
    futures = sum("cannot schedule new futures" in line for line in res.stderr())
    if tmp:
      problems.append(f"left {tmp}")
    if res.tracebacks() or futures:
      problems.append(f"{res.tracebacks()} traceback(s)")
    rows.append([case, res.rc, res.wall, len(res.stderr()), short(message, 220), named, steps[-1] if steps else None,
                 restores, " ".join(tmp) or "none", res.tracebacks(), futures,
                 "ok" if not problems else "; ".join(problems)])
  return table(["case", "exit", "wall s", "stderr lines", "error line", "names step", "newest step on disk",
                "named step restores", "tmp left", "tracebacks", "'cannot schedule'", "verdict"], rows)


def part5(bench: Bench) -> str:
  rows = []
  interrupted = bench.path("p1", "killed")
  cases = [("finished (U)", bench.path("U"), "--config.train.learning_rate=0.001"),
           ("finished (U)", bench.path("U"), "--config.model.d_model=64"),
           ("interrupted", interrupted, "--config.train.epochs=5")]
  for i, (kind, source, override) in enumerate(cases):
    if not os.path.isdir(source):
      source = bench.path("p5", "interrupted_source")
      if not os.path.isdir(source):
        bench.run_until_checkpoints(source, 2)
    workdir = copy_workdir(source, bench.path("p5", f"case{i}"))
    before = tree_hashes(workdir)
    res = bench.run(workdir, override)
    after = tree_hashes(workdir)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    problems = []
    if res.rc != 1 or len(res.stderr()) != 1 or "different config" not in " ".join(res.stderr()):
      problems.append(f"exit {res.rc}, {len(res.stderr())} stderr lines")
    if changed:
      problems.append(f"changed {changed[:4]}")
    rows.append([kind, override, res.rc, res.wall, len(res.stderr()), short(" / ".join(res.stderr()), 200),
                 len(before), " ".join(changed[:4]) or "none", "ok" if not problems else "; ".join(problems)])
  return table(["workdir", "change", "exit", "wall s", "stderr lines", "stderr", "files hashed", "files changed",
                "verdict"], rows)


def part6(bench: Bench, kills: int, seed: int) -> str:
  rng = random.Random(seed)
  reference = bench.reference
  # Kill times follow U's timeline: start-up (imports, data, init, restore) until "compiling the train step",
  # then training until the last validation, then the tail (test evaluation, summary.json, results.md).
  startup = reference.time_of("compiling the train step") or 3.0
  last_validation = reference.time_of(f"epoch {EPOCHS}: validation") or reference.wall
  training = last_validation - startup
  tail = max((reference.time_of("done:") or reference.wall) - last_validation, 0.05)
  # Kill moments cycle through start-up (a random time before U's "compiling the train step"), training (a
  # random time after this life's "compiling" line, within the training left), the moment a save's
  # temporary directory appears (and up to 20 ms later), and, for the last two, the tail after the last
  # validation (test evaluation, summary.json, results.md, exit) or after resuming a finished run.
  cycle = ["start-up", "checkpoint write", "training", "checkpoint write", "training"]
  plan = [cycle[i % len(cycle)] for i in range(max(kills - 2, 0))] + ["end of run"] * min(kills, 2)
  workdir = bench.path("p6", "killed")
  rows, landed, lives = [], 0, 0
  while landed < kills and lives < 3 * kills:
    lives += 1
    steps = finished_steps(workdir)
    remaining = (TOTAL_STEPS - (steps[-1] if steps else 0)) / TOTAL_STEPS
    mode = plan[landed]
    if (mode in ("checkpoint write", "training") and remaining == 0) or (rows and rows[-1][3] != "yes"):
      mode = "start-up"  # nothing left to train, or the last life ended before its kill
    stale = saves_in_flight(workdir)  # left by an earlier kill
    run = bench.start(workdir)
    in_write, hit, fire_at = False, False, None
    if mode == "start-up":
      fire_at = rng.uniform(0.2, startup)
    while run.alive():
      now = time.monotonic() - run.start
      if fire_at is None:
        if mode == "training" and run.time_of("compiling the train step") is not None:
          fire_at = now + rng.uniform(0.0, remaining * training)
        elif mode == "checkpoint write" and saves_in_flight(workdir, stale):
          fire_at = now + rng.uniform(0.0, 0.02)
        elif mode == "end of run" and (run.time_of(f"epoch {EPOCHS}: validation") is not None
                                       or run.time_of(f"resumed from step {TOTAL_STEPS}") is not None):
          fire_at = now + rng.uniform(0.0, tail)
      due = fire_at is not None and now >= fire_at
      if due:
        in_write = bool(saves_in_flight(workdir, stale))
        hit = run.kill()
        break
      time.sleep(0.001)
    run.wait(bench.timeout)
    landed += hit
    rows.append([lives, mode, f"{run.killed_at:.2f}" if hit else "—", "yes" if hit else f"no (exit {run.rc})",
                 run.resumed_from(), short(run.last_line_before(run.killed_at), 70) if hit else "—",
                 "yes" if in_write else "no", " ".join(entries(workdir)) or "—", run.tracebacks()])
  final = bench.run(workdir)
  result = compare(summary_of(workdir), summary_of(bench.path("U")))
  bad_lines, repeated = metrics_check(workdir)
  problems = []
  if final.rc != 0 or result != "equal":
    problems.append(f"exit {final.rc}; " + ("SILENT WRONG RESULT" if final.rc == 0 else result))
  if final.tracebacks():
    problems.append(f"{final.tracebacks()} traceback(s)")
  if bad_lines:
    problems.append(f"{bad_lines} metrics.jsonl lines do not parse")
  if leftovers(workdir):
    problems.append(f"left {leftovers(workdir)}")
  if landed < kills:
    problems.append(f"only {landed} kills landed")
  during_writes = sum(r[6] == "yes" and r[3] == "yes" for r in rows)
  head = table(["life", "kill mode", "killed at s", "kill landed", "resumed from", "last stdout line before the kill",
                "a save in flight", "checkpoints/ after", "tracebacks"], rows)
  totals = table(["kills landed", "during a save", "final exit", "final resumed from", "final summary vs U",
                "final warnings", "final tracebacks", "metrics.jsonl bad lines", "metrics.jsonl repeated steps",
                 "checkpoints/ leftovers", "verdict"],
               [[landed, during_writes, final.rc, final.resumed_from(), result,
                 short(" / ".join(final.warnings()), 200) or "none", final.tracebacks(), bad_lines,
                 repeated, " ".join(leftovers(workdir)) or "none", "ok" if not problems else "; ".join(problems)]])
  return head + "\n\n" + totals


# ---------------------------------------------------------------------------------------------- Main


def measure(root: str, parts: list[int], kinds: list[str], trials: int, kills: int, seed: int,
            compilation_cache: bool = True, timeout: float = 300.0) -> list[tuple[str, str, float]]:
  """[(title, markdown, seconds)] of the reference run and each part asked for."""
  bench = Bench(root, compilation_cache, timeout)
  out = []

  def timed(title, fn, *args):
    note(f"{title}…")
    start = time.monotonic()
    out.append((title, fn(bench, *args), time.monotonic() - start))

  timed("Reference: one uninterrupted run", part_reference, compilation_cache and 6 in parts)
  if 1 in parts:
    timed("1. Damaged newest checkpoint, then resume", part1, kinds)
  if 2 in parts:
    timed("2. Two processes on one workdir", part2, trials)
  if 3 in parts:
    timed("3. `checkpoints` is not a directory", part3)
  if 4 in parts:
    timed("4. Non-finite loss", part4)
  if 5 in parts:
    timed("5. A changed config in an existing workdir", part5)
  if 6 in parts:
    timed(f"6. kill -9 at random moments ({kills} kills), then resume", part6, kills, seed)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="1,2,3,4,5,6", help="comma-separated parts to run")
  parser.add_argument("--kinds", default=",".join(d.name for d in DAMAGE), help="damage kinds of part 1")
  parser.add_argument("--trials", type=int, default=3, help="part 2: trials started at once (plus one staggered)")
  parser.add_argument("--kills", type=int, default=12, help="part 6: kills that land")
  parser.add_argument("--seed", type=int, default=0, help="part 6: the kill times")
  parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
  parser.add_argument("--compilation_cache", action=argparse.BooleanOptionalAction, default=True,
                      help="runs share a persistent JAX compilation cache (a warm-up run fills it when part 6 runs)")
  parser.add_argument("--root", default=None, help="where the workdirs go (default: a new temporary directory)")
  parser.add_argument("--keep", action="store_true", help="keep the workdirs")
  args = parser.parse_args()
  kinds = [k for k in args.kinds.split(",") if k]
  unknown = sorted(set(kinds) - {d.name for d in DAMAGE})
  if unknown:
    sys.exit(f"error: --kinds: unknown {unknown}; accepted: {[d.name for d in DAMAGE]}")
  root = args.root or tempfile.mkdtemp(prefix="bench_reliability_")
  os.makedirs(root, exist_ok=True)
  load_before, start = os.getloadavg(), time.monotonic()
  try:
    results = measure(root, [int(p) for p in args.parts.split(",") if p], kinds, args.trials, args.kills,
                      args.seed, args.compilation_cache, args.timeout)
  finally:
    if not args.keep and args.root is None:
      shutil.rmtree(root, ignore_errors=True)
  load_after = os.getloadavg()
  print(f"# bench_reliability: {time.monotonic() - start:.0f} s wall in all; load average (1, 5, 15 min) "
        f"{tuple(round(x, 2) for x in load_before)} at the start, {tuple(round(x, 2) for x in load_after)} at the "
        f"end; {os.cpu_count()} CPUs; compilation cache {'on' if args.compilation_cache else 'off'}; "
        f"workdirs {root if (args.keep or args.root) else '(removed)'}\n")
  for title, text, seconds in results:
    print(f"## {title} ({seconds:.0f} s)\n\n{text}\n", flush=True)


if __name__ == "__main__":
  main()
