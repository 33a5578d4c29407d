"""What every kernel dispatcher shares: validating `implementation`, the per-backend default, and whether
Pallas runs interpreted (on CPU it cannot compile)."""

from collections.abc import Mapping, Sequence

import jax


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


def compiler_params():
  """Pallas compiler parameters for the current backend. GPU: the Triton backend, chosen explicitly (jax
  0.10 defaults `pallas_call` to Mosaic GPU; see `ops._fftconv` for why Triton). TPU: Mosaic's
  defaults."""
  if jax.default_backend() != "gpu":
    return None
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return pltriton.CompilerParams(num_warps=4, num_stages=1)
