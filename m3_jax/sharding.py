"""One device mesh ("data", "fsdp", "tensor") and the shardings of params, optimiser state and batches.

Parameters carry logical axis names (`nn.with_logical_partitioning`); `mesh.rules` in the config maps them to mesh
axes (MaxText's `logical_axis_rules`). The same code runs on 1 CPU device and on a pod: only `mesh.shape` changes.
A dimension that a mesh axis does not divide is replicated instead (logged once), so a tiny test model runs on a
mesh made for a 7B one.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
log = logging.getLogger(__name__)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills the one -1 in `shape` with the devices left over: (-1, 2, 1) on 8 devices -> (4, 2, 1)."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(AXES):
    raise ValueError(f"mesh.shape={shape} must have {len(AXES)} entries, one per axis {AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape={shape} has more than one -1 (at most one axis takes the remaining devices)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape={shape}: {num_devices} devices do not divide by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices, but there are {num_devices} "
                     f"(use -1 for one axis to take whatever is there)")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(shape, len(devices))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # CPU / uncommon topologies: plain order is as good as any
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def rules_of(rules) -> tuple[tuple[str, Any], ...]:
  """Config rules (tuples or lists from config.json) -> Flax's ((logical, mesh axis | tuple | None), ...)."""
  out = []
  for logical, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((logical, target))
  return tuple(out)


def logical_to_mesh_axes(names: Sequence[str | None], rules) -> P:
  """Logical dim names -> PartitionSpec: each dim takes the first rule for its name whose mesh axes this array
  does not use yet (as Flax's, but a logical name may repeat, e.g. a conv kernel's ("conv", "conv", ...))."""
  used: set[str] = set()
  spec = []
  for name in names:
    chosen = None
    for logical, target in rules:
      if logical != name or name is None:
        continue
      axes = () if target is None else (target if isinstance(target, tuple) else (target,))
      if used.intersection(axes):
        continue
      chosen = target
      used.update(axes)
      break
    spec.append(chosen)
  return P(*spec)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, where: str) -> P:
  """Drops mesh axes from dimensions they do not divide (that dimension is then replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = math.prod(mesh.shape[a] for a in names)
    if dim % size:
      log.info("replicating dim %d of %s %s: mesh axes %s (size %d) do not divide it", dim, where, shape, names,
               size)
      fitted.append(None)
    else:
      fitted.append(axes)
  return P(*fitted)


def logical_shardings(boxed: Any, mesh: Mesh, rules) -> Any:
  """Boxed (nn.Partitioned) abstract params, e.g. from `jax.eval_shape(model.init, ...)` -> unboxed tree of
  NamedSharding. Leaves without logical names are replicated."""
  rules = rules_of(rules)

  def one(path, leaf):
    if isinstance(leaf, nn.Partitioned):
      spec = logical_to_mesh_axes(leaf.names, rules)
      value = leaf.value
    else:
      spec, value = P(), leaf
    return NamedSharding(mesh, _fit(spec, tuple(value.shape), mesh, jax.tree_util.keystr(path)))

  return jax.tree_util.tree_map_with_path(one, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension over ("data", "fsdp"): FSDP shards the batch as well as the weights."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def opt_state_shardings(abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Each optimiser-state leaf whose key path ends with a parameter's path (Adam's mu/nu) takes that parameter's
  sharding; counters and anything else are replicated. (optax.tree_map_params cannot see through the masked
  states of multi_transform.)"""
  by_path = {tuple(path): s for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  longest = max((len(k) for k in by_path), default=0)

  def one(path, leaf):
    path = tuple(path)
    for n in range(min(longest, len(path)), 0, -1):
      s = by_path.get(path[-n:])
      if s is not None:
        return s
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays split over ("data", "fsdp"). On several hosts each contributes its
  own rows (the data pipeline shards by process), and the global batch is their concatenation."""
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
  return out


def bytes_per_device(tree: Any) -> dict[int, int]:
  """Bytes of `tree`'s arrays held by each device id (what FSDP should divide)."""
  held: dict[int, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
  return held
