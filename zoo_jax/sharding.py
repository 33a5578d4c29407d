"""The device mesh and the one table of logical-axis rules that maps parameter axes onto it.

Mesh axes: `runs` (the models of a population, `zoo_jax.trainer`), `data` (batch parallelism), `fsdp` (batch parallelism with the parameters' `embed` dimension split
over it too: fully-sharded data parallelism, ZeRO-3 style; the compiler all-gathers a weight where it is
used) and `model` (tensor parallelism over heads / MLP / vocabulary). The batch is split over `data` × `fsdp`.
Parameters carry logical axis names (`zoo_jax.layers.logical`); `LOGICAL_RULES` says which mesh axis each
one is split over. A dimension that the mesh axis does not divide is replicated instead (small widths on
a large `model` axis), so every config runs on every mesh.
"""

from collections.abc import Callable, Mapping
import contextlib
import functools
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ("runs", "data", "fsdp", "model")

LOGICAL_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "heads": "model",
    "mlp": "model",
    "embed": "fsdp",
    "head_dim": None,  # within a head: never split (the heads axis is)
}


def make_mesh(data: int = -1, model: int = 1, devices=None, *, fsdp: int = 1, runs: int = 1) -> jax.sharding.Mesh:
  """A (runs, data, fsdp, model) mesh over `devices` (default: all). `data=-1` takes what `runs`·`model`·`fsdp`
  leave. `runs` splits a population of models (`zoo_jax.trainer`); a single run has runs = 1."""
  devices = list(devices if devices is not None else jax.devices())
  if runs < 1 or len(devices) % runs:
    raise ValueError(f"the runs axis ({runs}) must divide the device count ({len(devices)})")
  n = len(devices) // runs
  if model < 1 or n % model:
    raise ValueError(f"mesh.model must be >= 1 and divide the device count ({n}), got {model}")
  if fsdp < 1 or n % (model * fsdp):
    raise ValueError(f"mesh.fsdp must be >= 1 and mesh.fsdp × mesh.model divide the device count ({n}), "
                     f"got {fsdp}")
  if data == -1:
    data = n // (model * fsdp)
  if data < 1 or data * fsdp * model != n:
    raise ValueError(f"mesh.data × mesh.fsdp × mesh.model must equal the device count ({n}), "
                     f"got {data} × {fsdp} × {model}")
  return jax.make_mesh((runs, data, fsdp, model), MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)


def logical_to_mesh(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  axes = []
  for name, size in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
    mesh_axis = LOGICAL_RULES.get(name) if name is not None else None
    if name is not None and name not in LOGICAL_RULES:
      raise ValueError(f"logical axis {name!r} has no rule in zoo_jax.sharding.LOGICAL_RULES")
    if mesh_axis is not None and (size % mesh.shape[mesh_axis] or mesh.shape[mesh_axis] == 1):
      # Not divisible: replicate this dimension. Size-1 axes are dropped too: the spec means the same,
      # and XLA:CPU runs a program with size-1 mesh axes in its specs ~2.5x slower (measured, jax 0.10.2).
      mesh_axis = None
    axes.append(mesh_axis)
  return P(*axes)


def named(mesh: jax.sharding.Mesh, spec: P) -> jax.sharding.Sharding:
  """`NamedSharding(mesh, spec)`, or the one device itself on a one-device mesh.

  Measured on XLA:CPU (jax 0.10.2, 2 cores): the same train step over a 1×1 mesh runs 2–2.5× slower
  (≈260 vs ≈115 ms per step, 2-layer d=64 attention at L=128, batch 64) when its arrays carry
  NamedShardings than when they carry a SingleDeviceSharding, though there is nothing to partition.
  """
  if mesh.size == 1:
    return jax.sharding.SingleDeviceSharding(mesh.devices.flat[0])
  return NamedSharding(mesh, spec)


def param_shardings(logical_specs: Any, abstract_params: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings for a parameter tree, from its logical PartitionSpecs and shapes."""
  return jax.tree.map(lambda spec, x: named(mesh, logical_to_mesh(spec, x.shape, mesh)),
                      logical_specs, abstract_params,
                      is_leaf=lambda x: isinstance(x, P))


def batch_axes(mesh: jax.sharding.Mesh) -> str | tuple[str, ...]:
  """The mesh axes the batch is split over: `data`, and `fsdp` where it has more than one device (size-1
  axes are left out of specs: see `logical_to_mesh`)."""
  return ("data", "fsdp") if mesh.shape.get("fsdp", 1) > 1 else "data"


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.Sharding:
  return named(mesh, P(batch_axes(mesh)))


def activation_mesh(batch: jax.sharding.Sharding):
  """The context a jitted step traces its model in, given its batch sharding: the mesh (abstract) where the
  batch is split over `fsdp`, so that `constrain_batch` splits activations by batch; otherwise no context.

  Measured: without it XLA's partitioner follows the embedding's (vocab, embed/fsdp) layout and keeps the
  activations split along the width with the whole batch on every device: the step of a 2-layer × 768 LM
  at L = 256, 32 examples over (data 1, fsdp 8) held 4.97 GiB of temporaries per device against 0.94 GiB
  over (data 8) (XLA:CPU, jax 0.10.2); with it 0.84 GiB.
  """
  mesh = getattr(batch, "mesh", None)
  if mesh is None or mesh.shape.get("fsdp", 1) == 1:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def with_activation_mesh(fn: Callable, batch: jax.sharding.Sharding) -> Callable:
  """`fn` traced under `activation_mesh(batch)`: what the trainer jits as its train and eval steps."""

  @functools.wraps(fn)
  def wrapped(*args):
    with activation_mesh(batch):
      return fn(*args)

  return wrapped


def constrain_batch(x: jax.Array) -> jax.Array:
  """x with its leading (batch) axis split over data × fsdp, inside `activation_mesh`; elsewhere x itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get("fsdp", 1) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, P(batch_axes(mesh)))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.Sharding:
  return named(mesh, P())


def put(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Host numpy batch (this process's rows) -> global arrays with `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def put_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host numpy batch -> global arrays split over the `data` axis (this process's rows)."""
  return put(batch, batch_sharding(mesh))

