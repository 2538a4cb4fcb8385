"""Params IO: a params pytree to and from one orbax directory, with key/shape checks and checksum verification.

`save` writes the tree (orbax PyTreeCheckpointHandler: OCDBT + zarr3, every host writes its shards) and returns its
per-array checksums (identity.checksums); `restore` reads it back, in the stored dtype, straight into the target
shardings, verifies the checksums when given, then casts to the requested dtype. Where the checksums are kept is
the business of the layout around the directory (m3dir, workdir).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from m3_jax.checkpoint import identity


def absolute(path: str | epath.PathLike) -> epath.Path:
  """An epath.Path orbax accepts (local paths made absolute; gs://... as it is)."""
  path = epath.Path(path)
  return path if path.is_absolute() else path.absolute()


@dataclasses.dataclass(frozen=True)
class Deferred:
  """A params leaf made only when `save` writes it: `make()` -> the numpy array of `shape` and `dtype`. Deferred
  leaves are made, written, hashed and dropped one at a time, so a tree of them is never whole in memory (m3 convert
  converts each tensor as it is written). Stored exactly as the made numpy array would be."""
  shape: tuple[int, ...]
  dtype: Any
  make: Callable[[], np.ndarray]


def save(path: str | epath.PathLike, params: Any) -> dict[str, str]:
  """Writes `params` (a pytree of arrays: jax or numpy, or `Deferred`) to the orbax directory `path`, replacing what
  is there; -> the per-array checksums of what was written."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  keys = [jax.tree_util.keystr(p) for p, _ in flat]
  sums = identity.checksums(jax.tree_util.tree_map(lambda x: None if isinstance(x, Deferred) else x, params))

  def hashed(key: str, leaf: Deferred) -> Deferred:
    def make():
      x = leaf.make()
      sums[key] = identity.checksums(x)[""]
      return x
    return Deferred(leaf.shape, leaf.dtype, make)

  params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), [
      hashed(k, x) if isinstance(x, Deferred) else x for k, (_, x) in zip(keys, flat)])
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=_handlers())) as ckptr:
    ckptr.save(absolute(path), args=ocp.args.PyTreeSave(params), force=True)
  return {k: sums[k] for k in keys}


class _DeferredHandler(ocp.type_handlers.NumpyHandler):
  """Writes `Deferred` leaves one after another as numpy arrays (the same files and metadata), each made just
  before its write and released after it."""

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)

    async def one_at_a_time():
      for leaf, info, arg in zip(values, infos, args):
        await self._background_serialize([leaf.make()], [info], [arg])
    return [ocp.future.CommitFutureAwaitingContractedSignals(one_at_a_time(), name="deferred_numpy")]


def _handlers():
  """orbax's default type handlers, except that numpy arrays are written from the caller's buffers and `Deferred`
  leaves one at a time. orbax deep-copies host arrays so that the caller may change them during an async save; this
  save is synchronous, and that copy of the whole tree took `m3 convert`'s peak memory from 1x to 2x the output
  (benchmarks/convert_memory.py)."""
  th = ocp.type_handlers
  kinds = (int, float, bytes, np.number, jax.Array, str)
  return th.create_type_handler_registry((np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
                                         (Deferred, _DeferredHandler(deepcopy_host_arrays=False)),
                                         *((k, th.get_type_handler(k)) for k in kinds))


def restore(path: str | epath.PathLike, *, subtree: str | None = None, target_shardings: Any = None,
            abstract: Any = None, checksums: dict[str, str] | None = None) -> Any:
  """Reads the params tree stored at `path` (or its item `subtree`, e.g. "params" of a train state).

  With `target_shardings` (a tree of jax.sharding.Sharding matching the params) each array is read straight into
  its shards; with `abstract` (a tree of ShapeDtypeStruct, e.g. from jax.eval_shape(init)) the keys and shapes are
  checked first (a ValueError naming each key) and the arrays cast to its dtypes; otherwise arrays land on the
  default device in their stored dtypes. `checksums` (keyed like the stored tree) are verified: an
  identity.ChecksumError names every array whose bytes changed."""
  path = absolute(path)
  # The handler's own metadata: a Checkpointer's would look for a step-level _CHECKPOINT_METADATA inside the item
  # folder (a train state's checkpoints/N/state) and log a warning on every load.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    stored = handler.metadata(path)
  finally:
    handler.close()
  with ocp.PyTreeCheckpointer() as ckptr:
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
    if subtree is not None:
      stored = stored[subtree]
    stored_shapes = {jax.tree_util.keystr(p): (tuple(m.shape), np.dtype(m.dtype))
                     for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
    stored_abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)
    if abstract is None:
      abstract = stored_abstract
    else:
      check_tree_matches(abstract, stored_shapes, str(path))
    if target_shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target_shardings = jax.tree_util.tree_map(lambda _: device, abstract)
    # Read in the stored dtype (the checksums are of the stored bytes), cast afterwards.
    target = jax.tree_util.tree_map(lambda a, m, s: jax.ShapeDtypeStruct(a.shape, m.dtype, sharding=s), abstract,
                                    stored_abstract, target_shardings)
    if subtree is not None:
      target = {subtree: target}
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  if subtree is not None:
    restored = restored[subtree]
  if checksums is not None:
    identity.verify(restored, checksums, str(path), prefix="" if subtree is None else f"['{subtree}']")
  return jax.tree_util.tree_map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), restored, abstract)


def check_tree_matches(abstract: Any, stored_shapes: dict[str, tuple[tuple[int, ...], np.dtype]], where: str):
  """Raises a ValueError naming every key missing on either side or with another shape."""
  expected = {jax.tree_util.keystr(p): (tuple(a.shape), np.dtype(a.dtype))
              for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  problems = []
  for key in sorted(set(expected) | set(stored_shapes)):
    if key not in stored_shapes:
      problems.append(f"  {key}: missing in {where} (expected shape {expected[key][0]})")
    elif key not in expected:
      problems.append(f"  {key}: in {where} but not in the model (shape {stored_shapes[key][0]})")
    elif expected[key][0] != stored_shapes[key][0]:
      problems.append(f"  {key}: shape {stored_shapes[key][0]} in {where}, the model expects {expected[key][0]}")
  if problems:
    raise ValueError(f"parameters in {where} do not match the model ({len(problems)} keys):\n"
                     + "\n".join(problems[:40]) + ("\n  ..." if len(problems) > 40 else ""))
