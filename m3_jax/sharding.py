"""One device mesh ("data", "fsdp", "tensor"), the logical axis names and their rules, and the shardings of
params, optimiser state, batches and activations.

Parameters carry logical axis names (`nn.with_logical_partitioning`) and activations in the transformer blocks are
pinned by them (`constrain`); `RULES` maps each name to mesh axes (MaxText's `logical_axis_rules`; a run's
`mesh.rules` starts from `DEFAULT_RULES`). The same code runs on 1 CPU device and on a pod: only `mesh.shape`
changes. A dimension that a mesh axis does not divide is replicated instead (logged), so a tiny test model runs on
a mesh made for a 7B one. A name without a rule is an error, never a silent replica.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")

# Logical axis names (dimensions of parameters and activations).
BATCH = "batch"          # examples (or crops, in the vision tower)
LENGTH = "length"        # sequence positions / patches
EMBED = "embed"          # LLM width
VIT_EMBED = "vit_embed"  # vision tower width
HEADS = "heads"          # attention query heads (and heads x head_dim in fused kernels)
KV = "kv"                # key/value heads
MLP = "mlp"              # MLP hidden (and the projector's)
VOCAB = "vocab"
LAYERS = "layers"        # the stacked-layer axis of scanned blocks
NORM = "norm"            # norm scales and biases
CONV = "conv"            # patch-embedding kernel window and input channels

# Logical name -> mesh axis, a tuple of them, or None (replicated). FSDP: the batch over ("data", "fsdp"), the
# embedding dimension of every weight over "fsdp", the wide dimensions over "tensor". A dimension takes the first
# rule for its name whose mesh axes the array does not use yet, so an activation [batch, length, embed] keeps
# embed whole (batch took "fsdp").
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (EMBED, "fsdp"),
    (VIT_EMBED, "fsdp"),
    (HEADS, "tensor"),
    (KV, "tensor"),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (LAYERS, None),
    (NORM, None),
    (CONV, None),
)
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
  """Config rules (tuples or lists from config.json) -> ((logical, mesh axis | tuple | None), ...)."""
  out = []
  for logical, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((logical, target))
  return tuple(out)


def logical_to_mesh_axes(names: Sequence[str | None], rules=DEFAULT_RULES) -> P:
  """Logical dim names -> PartitionSpec: each dim takes the first rule for its name whose mesh axes this array
  does not use yet (as Flax's, but a logical name may repeat, e.g. a conv kernel's ("conv", "conv", ...)).
  None names a dimension that is always replicated; a name without a rule is a ValueError."""
  rules = rules_of(rules)
  known = [logical for logical, _ in rules]
  used: set[str] = set()
  spec = []
  for name in names:
    if name is not None and name not in known:
      raise ValueError(f"logical axis {name!r} (of {tuple(names)}) has no rule in mesh.rules; the rules name "
                       f"{', '.join(dict.fromkeys(known))}")
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


def logical_shardings(boxed: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
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


def per_process(value: int) -> np.ndarray:
  """Every process's int `value`, int32[process_count] in process order: an all-gather, every process must call it
  (on one process, no collective)."""
  if jax.process_count() == 1:
    return np.asarray([value], np.int32)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1, rules=DEFAULT_RULES) -> NamedSharding:
  """The leading (batch) dimension by the "batch" rule (by default ("data", "fsdp"): FSDP shards the batch as
  well as the weights), the rest replicated."""
  return NamedSharding(mesh, logical_to_mesh_axes((BATCH,) + (None,) * (ndim - 1), rules))


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


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays split by the "batch" rule. On several hosts each contributes its
  own rows (the data pipeline shards by process), and the global batch is their concatenation."""
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim, rules), value)
  return out


_LAYOUT: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("m3_activation_layout",
                                                                                     default=None)


@contextlib.contextmanager
def activation_layout(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
  """Within this context, `constrain` pins activations to `mesh` by `rules`. Enter it inside the jitted function
  or around its call. It also enters JAX's abstract mesh, which is part of jit's cache key, so a function traced
  without a layout is traced again under one (one rules table per mesh and process: the cache cannot see rules)."""
  token = _LAYOUT.set((mesh, rules_of(rules)))
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      yield
  finally:
    _LAYOUT.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """x with its layout pinned by logical dim names (e.g. (BATCH, LENGTH, EMBED)) under `activation_layout`;
  x unchanged outside one (a single device, or an engine that lets XLA choose)."""
  layout = _LAYOUT.get()
  if layout is None:
    return x
  mesh, rules = layout
  if len(names) != x.ndim:
    raise ValueError(f"logical names {tuple(names)} for an activation of shape {x.shape}: one name per dimension")
  spec = _fit(logical_to_mesh_axes(names, rules), tuple(x.shape), mesh, f"activation {tuple(names)}")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def bytes_per_device(tree: Any) -> dict[int, int]:
  """Bytes of `tree`'s arrays held by each device id (what FSDP should divide)."""
  held: dict[int, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
  return held
