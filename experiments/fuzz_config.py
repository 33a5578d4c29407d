r"""Fuzzes the MQAR binary's start-up checks with bad `--config` overrides; prints the outcomes by category.

  python experiments/fuzz_config.py                     # every case in-process, 12 also as subprocesses
  python experiments/fuzz_config.py --subprocesses=0    # in-process only

Every case is a bad command line for experiments/mqar.py and must end in exactly one line `error: ...`
that names the key, with nothing written. In-process, a case runs the binary's own start-up on a fresh
absl FlagValues: `cli.define_config_flag` (checks the override paths against the config file),
the binary's `--workdir` flag, `cli.parse_flags` (the values' types), then `config.expand_runs` (every
run, and the base below them, through `config.resolve`): all that experiments/mqar.py does before
`train.train_and_evaluate`. A sample (one case of each category first) also runs as real subprocesses of
experiments/mqar.py with a fresh `--workdir`.

Outcomes, the table's columns: `ok` (one line naming the key), `accepted` (no error: the run would
train), `traceback` (any other exception, or a Traceback on stderr), `multi-line` (an error of more than
one line), `unnamed` (one line that names neither the overridden key nor the key the case expects),
`written` (anything under the workdir). All but `ok` should be 0.

Cases, for several presets of experiments/configs/mqar.py (`--config=...:RUN`): unknown keys at every
depth and typos of real ones, indices past a list or into a section, values of the wrong type, NaN and
infinities, zero and negative sizes, huge sizes (parameters, data, batches past this machine's memory),
and the rules between fields (warmup past the run, a batch past the data or the mesh, heads that do not
divide d_model for every mixer with heads, h3's head_dim, blocked's block_size, sliding_window's window,
BaseConv's explicit kernel_size, MQAR's own sizes).
"""

import argparse
import collections
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

from absl import flags
from ml_collections import config_dict

from zoo_jax import cli
from zoo_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(REPO, "experiments", "mqar.py")
CONFIG = os.path.join(REPO, "experiments", "configs", "mqar.py")
PRESETS = ["", "attention", "base_conv", "hyena", "h3", "rwkv", "based", "mamba", "hybrid", "sliding_window",
           "blocked", "s4d", "retnet", "sparse_attention", "mamba2", "gla", "delta_net", "gated_delta_net",
           "rwkv7", "base_conv_L64"]  # "": the config's default runs
BASE_KEY_PRESETS = ("", "attention", "base_conv_L64")  # the base keys are fuzzed under these
OUTCOMES = ("ok", "accepted", "traceback", "multi-line", "unnamed", "written")
SEGMENTS = ("train_segments", "validation_segments", "test_segments")


@dataclasses.dataclass(frozen=True)
class Case:
  category: str
  args: tuple[str, ...]  # after the binary's --workdir (the --config file first)
  expect: str  # the key the error must name

  def command(self) -> str:
    return " ".join(self.args)


# ---------------------------------------------------------------------------------------------- Cases


def _bad_base_values(run_steps: int, train_examples: int) -> dict[str, list[tuple[str, str]]]:
  """{base key: [(category, value)]}: values of the base config's keys that must fail."""
  wrong_int = [("wrong_type", "abc"), ("wrong_type", "1.5"), ("wrong_type", "1e6"), ("wrong_type", "")]
  wrong_float = [("wrong_type", "abc"), ("wrong_type", "1,5")]
  nan_inf = [("nan_inf", "nan"), ("nan_inf", "inf"), ("nan_inf", "-inf")]
  out = {
      "seed": [("negative_zero", "-1"), ("huge", str(2**31)), *wrong_int[:2]],
      "data.vocab_size": [("negative_zero", "0"), ("negative_zero", "-5"), ("huge", str(10**12)),
                          ("cross_field", "16"), *wrong_int[:2]],
      "data.power_a": [("negative_zero", "0"), ("negative_zero", "-0.1"), ("range", "1.5"), *nan_inf,
                       *wrong_float],
      "data.random_non_queries": [("wrong_type", "3"), ("wrong_type", "maybe")],
      "model.d_model": [("negative_zero", "0"), ("negative_zero", "-64"), ("huge", "1000000"),
                        ("huge", str(10**9)), *wrong_int[:3]],
      "model.n_layers": [("negative_zero", "0"), ("huge", "100000"), ("huge", "1025"), *wrong_int[:2]],
      "model.state_mixer": [("bad_choice", "swiglu"), ("bad_choice", "")],
      "model.state_mixer_hidden_mult": [("negative_zero", "0"), *wrong_int[:1]],
      "model.block": [("bad_choice", "postnorm")],
      "model.learned_positions": [("wrong_type", "3"), ("wrong_type", "yes")],
      "model.dtype": [("bad_choice", "float16"), ("bad_choice", "int8")],
      "train.epochs": [("negative_zero", "0"), ("negative_zero", "-3"), *wrong_int[:3]],
      "train.batch_size": [("negative_zero", "0"), ("cross_field", str(train_examples + 1)),
                           ("huge", str(10**9)), *wrong_int[:2]],
      "train.eval_batch_size": [("negative_zero", "0"), ("huge", str(10**12)), *wrong_int[:1]],
      "train.learning_rate": [("negative_zero", "0"), ("negative_zero", "-1"), ("range", "11"), *nan_inf,
                              *wrong_float],
      "train.weight_decay": [("negative_zero", "-0.1"), ("range", "11"), *nan_inf],
      "train.warmup_steps": [("negative_zero", "-1"), ("cross_field", str(run_steps + 1)),
                             ("huge", str(10**12)), *wrong_int[:1]],
      "train.schedule": [("bad_choice", "linear"), ("bad_choice", "COSINE")],
      "train.grad_clip_norm": [("negative_zero", "-1"), *nan_inf],
      "train.early_stop_accuracy": [("negative_zero", "-0.1"), ("range", "3"), *nan_inf],
      "train.log_every_steps": [("negative_zero", "0")],
      "train.checkpoint_every_steps": [("negative_zero", "-1")],
      "train.keep_checkpoints": [("negative_zero", "0")],
      "mesh.data": [("negative_zero", "0"), ("negative_zero", "-2"), ("cross_field", "3"), *wrong_int[:1]],
      "mesh.model": [("negative_zero", "0"), ("negative_zero", "-1"), *wrong_int[:1]],
  }
  return out


def _bad_segment_values(seq_len: int, vocab_size: int) -> list[tuple[str, str, str]]:
  """[(key in a segment, category, value)] that fail MQAR's rules or the schema."""
  return [("seq_len", "negative_zero", "0"), ("seq_len", "negative_zero", "-2"),
          ("seq_len", "cross_field", str(seq_len + 1)),  # odd
          ("seq_len", "cross_field", str(vocab_size)),  # vocab_size must exceed it
          ("seq_len", "wrong_type", "abc"), ("num_kv_pairs", "negative_zero", "0"),
          ("num_kv_pairs", "cross_field", str(seq_len // 4 + 1)), ("num_examples", "negative_zero", "0"),
          ("num_examples", "huge", str(10**12)), ("num_examples", "wrong_type", "1e3")]


def _mixer_cases(seq_len: int, d_model: int) -> list[tuple[str, str, dict]]:
  """[(category, expected key, whole mixer)] that do not fit width d_model or length L."""
  odd = next(h for h in range(3, d_model) if d_model % h)  # heads that do not divide d_model
  ragged = next(b for b in range(3, seq_len) if seq_len % b)  # a block that does not divide L
  cases = [(name, odd) for name in ("attention", "retnet", "sliding_window", "blocked", "delta_net",
                                    "gated_delta_net", "gla", "rwkv7", "sparse_attention")]
  out = [("cross_field", "num_heads", dict(name=name, num_heads=heads)) for name, heads in cases]
  out += [
      ("cross_field", "num_heads", dict(name="based", num_heads=odd, num_key_value_heads=odd)),
      ("cross_field", "num_heads", dict(name="attention", num_heads=d_model, rotary=True)),  # width 1: odd
      ("cross_field", "num_heads", dict(name="retnet", num_heads=d_model)),  # rotary needs an even width
      ("cross_field", "head_dim", dict(name="h3", head_dim=odd)),
      ("cross_field", "head_dim", dict(name="mamba2", head_dim=odd)),
      ("cross_field", "ngroups", dict(name="mamba2", ngroups=odd)),
      ("cross_field", "block_size", dict(name="blocked", block_size=ragged)),
      ("cross_field", "window_size", dict(name="sliding_window", window_size=seq_len + 1)),
      ("cross_field", "kernel_size", dict(name="base_conv", kernel_size=seq_len + 1)),
      ("cross_field", "kernel_size", dict(name="base_conv", kernel_size=[3, seq_len + 8])),
      ("cross_field", "kernel_size", dict(name="base_conv", kernel_size=[3])),  # fewer entries than layers
      ("cross_field", "num_heads", dict(name="hybrid", mixers=[dict(name="base_conv", kernel_size=3),
                                                                dict(name="attention", num_heads=odd)])),
      ("unknown_key", "foo", dict(name="attention", foo=1)),
      ("bad_choice", "name", dict(name="transformer")),
      ("unknown_key", "name", dict(num_heads=2)),
      ("negative_zero", "num_heads", dict(name="attention", num_heads=0)),
      ("negative_zero", "d_state", dict(name="mamba", d_state=0)),
      ("wrong_type", "num_heads", dict(name="attention", num_heads=2.0)),
      ("wrong_type", "rotary", dict(name="attention", rotary=1)),
      ("range", "target", dict(name="hyena", target=2.0)),
  ]
  return out


def _leaves(value, path: str):
  """(dotted path, value) of every node of a config, sections and lists included."""
  yield path, value
  if isinstance(value, (dict, config_dict.ConfigDict)):
    for key in value:
      yield from _leaves(value[key], f"{path}.{key}" if path else key)
  elif isinstance(value, (list, tuple)):
    for i, item in enumerate(value):
      yield from _leaves(item, f"{path}[{i}]")


def cases() -> list[Case]:
  out = []
  for preset in PRESETS:
    config_arg = f"--config={CONFIG}:{preset}" if preset else f"--config={CONFIG}"
    config = cli.load_config(config_arg.split("=", 1)[1])
    runs = config_lib.expand_runs(config)
    first = next(iter(runs))
    run = runs[first]
    seq_len, d_model = config_lib.max_seq_len(run["data"]), run["model"]["d_model"]
    add = lambda category, override, expect: out.append(Case(category, (config_arg, override), expect))  # pylint: disable=cell-var-from-loop

    # Unknown keys and bad indices at every depth; list-valued and section-in-a-list keys (the base's keys
    # under a few presets, each preset's runs under every one).
    for path, value in _leaves(config, ""):
      if preset not in BASE_KEY_PRESETS and not path.startswith("runs."):
        continue
      flag = f"--config.{path}" if path else "--config"
      if isinstance(value, (dict, config_dict.ConfigDict)):
        add("unknown_key", f"{flag}.bogus=1", "bogus")
        for key in list(value)[:2]:
          if len(key) > 3:
            typo = key[:-1]
            add("unknown_key", f"{flag}.{typo}=1", typo)
        if path and isinstance(value, config_dict.ConfigDict) and preset in BASE_KEY_PRESETS:
          add("section_value", f"{flag}=3", path.rsplit(".", 1)[-1])
      elif isinstance(value, list):
        add("bad_index", f"{flag}[{len(value)}]=1" if not value or not isinstance(value[0], dict)
            else f"{flag}[{len(value) + 2}].seq_len=8", "out of range")
        add("bad_index", f"{flag}[{-len(value) - 1}]=1", "out of range")
        add("list_valued", f"{flag}=1", path.rsplit(".", 1)[-1])
        if value and isinstance(value[0], dict):
          add("list_valued", f"{flag}[0]=3", path.rsplit(".", 1)[-1])
      elif isinstance(value, int) and not isinstance(value, bool) and path.startswith("train"):
        add("bad_index", f"{flag}[0]=1", path.rsplit(".", 1)[-1])

    # Values of the base keys (every run starts from them).
    if preset in BASE_KEY_PRESETS:
      examples = sum(s["num_examples"] for s in config.data.train_segments)
      steps = config.train.epochs * (examples // config.train.batch_size)
      for key, bad in _bad_base_values(steps, examples).items():
        for category, value in bad:
          add(category, f"--config.{key}={value}", key.rsplit(".", 1)[-1])
      for split in SEGMENTS:
        for key, category, value in _bad_segment_values(config.data[split][0]["seq_len"], config.data.vocab_size):
          add(category, f"--config.data.{split}[0].{key}={value}", key)

    # The first run's own keys: its data, its mixer's hyperparameters and whole mixers that do not fit.
    if "runs" in config:
      prefix = f"--config.runs.{first}"
      if "data" in config.runs[first]:
        for key, category, value in _bad_segment_values(seq_len, config.data.vocab_size)[2:8]:
          add(category, f"{prefix}.data.train_segments[0].{key}={value}", key)
      mixer = config.runs[first].model.mixer
      for key, value in mixer.items():
        if isinstance(value, bool):
          add("wrong_type", f"{prefix}.model.mixer.{key}=3", key)
        elif isinstance(value, int):
          add("negative_zero", f"{prefix}.model.mixer.{key}=0", key)
          add("wrong_type", f"{prefix}.model.mixer.{key}=two", key)
        elif isinstance(value, str):
          add("bad_choice", f"{prefix}.model.mixer.{key}=bogus", key if key != "name" else "bogus")
      for category, expect, whole in _mixer_cases(seq_len, d_model):
        add(category, f"{prefix}.model.mixer={whole!r}", expect)
      if first in ("retnet", "h3", "mamba2", "gla", "delta_net", "gated_delta_net", "rwkv7"):  # 2+ heads
        add("cross_field", f"--config.model.d_model={d_model + 1}", "d_model")

  out.append(Case("config_file", (f"--config={CONFIG}:no_such_run",), "no_such_run"))
  out.append(Case("config_file", (f"--config={CONFIG}x",), "mqar.pyx"))
  out.append(Case("config_file", (f"--config={CONFIG}", "--workdri=/tmp/x"), "workdri"))
  return list(dict.fromkeys(out))  # unique, in order


def sample(all_cases: list[Case], n: int) -> list[Case]:
  """n of the cases: the first of each category, then others evenly spaced."""
  firsts = list({c.category: c for c in reversed(all_cases)}.values())[::-1]
  rest = [c for c in all_cases if c not in firsts]
  return (firsts + rest[::max(1, len(rest) // max(1, n - len(firsts)))])[:n]


# ---------------------------------------------------------------------------------------------- Running


def _outcome(message: str | None, case: Case, workdir: str) -> list[str]:
  """The outcomes of one case from its error (None: no error)."""
  written = ["written"] if os.path.exists(workdir) else []
  if message is None:
    return ["accepted", *written]
  lines = [line for line in message.strip().splitlines() if line.strip()]
  if "Traceback" in message:
    return ["traceback", *written]
  if len(lines) != 1:
    return ["multi-line", *written]
  key = case.args[-1].split("=", 1)[0].removeprefix("--config.")
  if case.expect not in lines[0] and key not in lines[0]:
    return ["unnamed", *written]
  return ["ok", *written] if lines[0].startswith("error: ") else ["unnamed", *written]


def run_in_process(case: Case, workdir: str) -> tuple[list[str], str]:
  """The binary's start-up up to training, on a fresh FlagValues; (outcomes, the error line or '')."""
  argv = [BINARY, f"--workdir={workdir}", *case.args]
  fv = flags.FlagValues()
  try:
    holder = cli.define_config_flag(CONFIG, flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Directory.", required=True, flag_values=fv)
    cli.parse_flags(argv, fv)
    config_lib.expand_runs(holder.value)
    message = None
  except SystemExit as e:
    message = str(e.code)
  except ValueError as e:  # experiments/mqar.py prints it as `error: {e}` and exits 1
    message = f"error: {e}"
  except Exception as e:  # pylint: disable=broad-except
    message = f"Traceback (in-process): {type(e).__name__}: {e}"
  return _outcome(message, case, workdir), message or ""


def run_subprocess(case: Case, workdir: str, timeout: float) -> tuple[list[str], str]:
  """The real binary; a run still going after `timeout` seconds was accepted (it is training)."""
  try:
    out = subprocess.run([sys.executable, BINARY, f"--workdir={workdir}", *case.args], capture_output=True,
                         text=True, timeout=timeout, cwd=tempfile.gettempdir())
  except subprocess.TimeoutExpired:
    return _outcome(None, case, workdir), "(still running: killed)"
  if out.returncode == 0:
    return _outcome(None, case, workdir), out.stderr.strip()
  return _outcome(out.stderr, case, workdir), out.stderr.strip()


def table(counts: dict[str, collections.Counter]) -> str:
  rows = [["category", "cases", *OUTCOMES], ["---"] * (len(OUTCOMES) + 2)]
  total = collections.Counter()
  for category in sorted(counts):
    total.update(counts[category])
    rows.append([category, str(counts[category]["cases"]), *(str(counts[category][o]) for o in OUTCOMES)])
  rows.append(["**all**", str(total["cases"]), *(str(total[o]) for o in OUTCOMES)])
  return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--subprocesses", type=int, default=12, help="cases also run as real subprocesses")
  parser.add_argument("--timeout", type=float, default=120.0, help="seconds per subprocess")
  parser.add_argument("--show", type=int, default=20, help="print this many cases that are not ok")
  args = parser.parse_args()
  all_cases = cases()
  bad = []
  with tempfile.TemporaryDirectory() as tmp:
    counts = collections.defaultdict(collections.Counter)
    start = time.time()
    for i, case in enumerate(all_cases):
      outcomes, message = run_in_process(case, os.path.join(tmp, f"in{i}"))
      counts[case.category].update(["cases", *outcomes])
      if outcomes != ["ok"]:
        bad.append((case, outcomes, message))
    seconds = time.time() - start
    print(f"in-process: {len(all_cases)} cases in {seconds:.1f} s\n\n{table(counts)}\n", flush=True)

    subprocess_cases = sample(all_cases, args.subprocesses)
    if subprocess_cases:
      counts = collections.defaultdict(collections.Counter)
      start = time.time()
      for i, case in enumerate(subprocess_cases):
        outcomes, message = run_subprocess(case, os.path.join(tmp, f"sub{i}"), args.timeout)
        counts[case.category].update(["cases", *outcomes])
        if outcomes != ["ok"]:
          bad.append((case, outcomes, message))
      print(f"subprocesses of experiments/mqar.py: {len(subprocess_cases)} cases in {time.time() - start:.1f} s\n\n"
            f"{table(counts)}\n", flush=True)
  for case, outcomes, message in bad[:args.show]:
    print(f"{'/'.join(outcomes)}: {case.command()}\n  {message[-300:]}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
