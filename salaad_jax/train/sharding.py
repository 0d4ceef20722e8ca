"""Device mesh and shardings: data parallelism over all devices plus
FSDP-style sharding of params and optimizer state over the 'fsdp' axis.

Mesh axes are ('data', 'fsdp'); a batch is split over both.  Every array of
the training state (params, AdamW moments, the SALAAD state) is sharded on
its largest axis that divides evenly by the 'fsdp' size, else replicated.
A compactly stored S (1-D values and indices per block) is thus split along
its capacity when that divides evenly; it is scattered into the dense S
where a round or the penalty needs it.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from salaad_jax.train.config import TrainConfig, TrainError

MESH_AXES = ("data", "fsdp")
BATCH_SPEC = P(MESH_AXES)


def mesh_shape(config: TrainConfig, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes, resolving one -1 to the devices left over."""
  data, fsdp = config.mesh_data, config.mesh_fsdp
  if data == -1 and fsdp == -1:
    raise TrainError("only one of --mesh_data and --mesh_fsdp may be -1")
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if num_devices % known:
      raise TrainError(f"{num_devices} devices cannot be split into groups of {known} "
                       "(--mesh_data / --mesh_fsdp)")
    data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
  if data * fsdp != num_devices:
    raise TrainError(f"--mesh_data={data} x --mesh_fsdp={fsdp} = {data * fsdp} does not "
                     f"match the {num_devices} devices")
  return data, fsdp


def make_mesh(config: TrainConfig, devices=None) -> Mesh:
  """The ('data', 'fsdp') mesh over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """'fsdp' on the largest axis whose size is a positive multiple of
  ``fsdp_size`` (the first such axis on ties); replicated when there is none."""
  if fsdp_size <= 1:
    return P()
  candidates = [(d, -i) for i, d in enumerate(shape) if d > 0 and d % fsdp_size == 0]
  if not candidates:
    return P()
  axis = -max(candidates)[1]
  return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def state_shardings(abstract_tree, mesh: Mesh):
  """A NamedSharding per leaf of ``abstract_tree`` by :func:`fsdp_spec`."""
  size = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, size)),
                      abstract_tree)


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the given shardings (an Orbax restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def check_batch_divisible(name: str, batch_size: int, num_devices: int,
                          micro_batches: int = 1) -> None:
  """TrainError unless every (micro-)batch splits evenly over the devices."""
  needed = num_devices * micro_batches
  if batch_size % needed:
    detail = f"{num_devices} devices" + (
        f" x --grad_accum={micro_batches}" if micro_batches > 1 else "")
    raise TrainError(f"--{name}={batch_size} is not divisible by {needed} ({detail})")


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Global arrays from this process's rows of the batch."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
