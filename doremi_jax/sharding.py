"""One device mesh (data, fsdp, model) and the logical-axis rules that map onto it."""
from typing import Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axes. A mesh axis is used at most once per array: flax takes the
# first rule whose mesh axes are still free, so activations' `embed` stays unsharded
# once `batch` has taken (data, fsdp).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("heads", "model"),
    ("mlp", "model"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
)


@gin.configurable
def make_mesh(mesh_shape: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
  """A (data, fsdp, model) mesh; one -1 entry takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = list(mesh_shape)
  if len(shape) != 3:
    raise ValueError(f"MESH_SHAPE={tuple(mesh_shape)}: give 3 sizes (data, fsdp, model).")
  if shape.count(-1) > 1:
    raise ValueError(f"MESH_SHAPE={tuple(mesh_shape)}: at most one entry may be -1.")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if known <= 0 or n % known:
      raise ValueError(f"MESH_SHAPE={tuple(mesh_shape)} does not divide the {n} devices; "
                       f"use sizes whose product divides {n}.")
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f"MESH_SHAPE={tuple(mesh_shape)} needs {int(np.prod(shape))} devices but "
                     f"{n} are available; make the product equal {n} or use -1 for one axis.")
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except  # CPU or odd topologies
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_shardings(logical_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of logical PartitionSpecs (from nn.get_partition_spec)."""
  mesh_specs = nn.logical_to_mesh(logical_tree, rules)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of [B, L] batch arrays."""
  spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
