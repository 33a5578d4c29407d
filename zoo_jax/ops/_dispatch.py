"""What every kernel dispatcher shares: validating `implementation`, the per-backend default, and whether
Pallas runs interpreted (on CPU it cannot compile).

Defaults. Each op's `FASTEST` maps a backend to its default path. It is 'xla' for every op on every
backend until a path is measured faster on that hardware (`experiments/bench_kernels.py`, or the
accelerator check below): the Pallas kernels have been run interpreted on CPU and lowered (not run) for
TPU and GPU, nothing more. A path listed in `EXPERIMENTAL` for a backend must not be its default there
(tests/test_accelerator_check.py checks both).

The GPU Pallas path is experimental. The fused FFT-conv kernel (`ops._fftconv`) is one grid + BlockSpec
`pallas_call`; on GPU it is lowered by Pallas's Triton backend, chosen by `compiler_params()`. jax 0.10
already defaults `pallas_call` on GPU to Mosaic GPU, and jax 0.11 deprecates the Triton backend (it is
still there, with a deprecation warning, and will be removed later); a Mosaic GPU port is a different
kernel (`plgpu.kernel`, warpgroups, explicit SMEM pipelines) and waits for a GPU to test it on.
`pallas_gpu_backend()` says whether this jax still has the Triton backend: when it does not, the
dispatchers' 'pallas' on GPU falls back to the XLA Monarch path (an explicit `*_pallas` call is a one-line
ValueError), so the library keeps working when Triton is removed. `experiments/accelerator_check.py` runs
the compiled kernels against their references and records pass/fail and time, so the first GPU run tells
whether the Triton path works on that jax.
"""

from collections.abc import Mapping, Sequence

import jax

# Paths that are not to be any backend's default (`FASTEST`): on GPU the Pallas kernels' Triton lowering
# (deprecated in jax 0.11, never run on a GPU here).
EXPERIMENTAL = {"gpu": ("pallas",)}


def resolve(op: str, implementation: str | None, accepted: Sequence[str], fastest: Mapping[str, str]) -> str:
  """`implementation`, or the fastest measured path for the current backend when it is None.

  `fastest` maps `jax.default_backend()` ('cpu', 'gpu', 'tpu') to a path; a backend it does not name gets
  'xla'. An unknown name is a one-line ValueError naming the accepted values."""
  if implementation is None:
    return fastest.get(jax.default_backend(), "xla")
  if implementation not in accepted:
    raise ValueError(f"{op}: implementation must be one of None, "
                     f"{', '.join(repr(a) for a in accepted)}; got {implementation!r}")
  return implementation


def interpret() -> bool:
  """Pallas kernels run in interpret mode on CPU (tests only: far slower than the XLA paths)."""
  return jax.default_backend() == "cpu"


def channel_block(channels: int, block_c: int | None) -> int:
  """Channels per Pallas program: `block_c` if given, else 128 (a TPU lane tile) or 16 on GPU, or all
  channels when there are fewer. A last, partial block is padded by Pallas and its writes
  masked; channels are independent, so padding never reaches a real output."""
  if block_c is None:  # GPU: 16, so that a program's (L, 16) tile fits on chip at long L (see _fftconv)
    return min(16 if jax.default_backend() == "gpu" else 128, channels)
  if block_c < 1:
    raise ValueError(f"block_c must be >= 1, got {block_c}")
  return min(block_c, channels)


def pallas_gpu_backend() -> str | None:
  """'triton' when this jax has Pallas's Triton backend (`jax.experimental.pallas.triton.CompilerParams`),
  else None (removed: the GPU Pallas paths are then unsupported and the dispatchers use XLA)."""
  try:
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return "triton" if hasattr(pltriton, "CompilerParams") else None


def compiler_params():
  """Pallas compiler parameters for the current backend. GPU: the Triton backend, chosen explicitly (jax
  0.10 defaults `pallas_call` to Mosaic GPU; see the module docstring and `ops._fftconv` for why Triton);
  a one-line ValueError when this jax no longer has it. TPU: Mosaic's defaults."""
  if jax.default_backend() != "gpu":
    return None
  if pallas_gpu_backend() is None:
    raise ValueError(f"the Pallas GPU paths need Pallas's Triton backend, which jax {jax.__version__} does "
                     "not have; use implementation='xla' (the default)")
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return pltriton.CompilerParams(num_warps=4, num_stages=1)
