"""Checkpoints: the training workdir's `checkpoints/` (orbax CheckpointManager) and m3 checkpoint `params/`.

A training checkpoint (one step directory under `<workdir>/checkpoints/`) holds three items:
  state  params, optimiser state, step, RNG (orbax StandardSave: sharded arrays, every host writes its shards)
  data   the data iterator's state, one JSON file per process (grain's checkpoint handler)
  meta   step and a fingerprint of the state (float64 sums per part) written when the state was saved
Saves are asynchronous (the arrays are copied to host memory before `save` returns, so the next step may donate
them); the last `checkpoint.keep` are kept. Orbax finalises a step directory only after every item is written, so
a save cut short by SIGKILL leaves a temporary directory that is never listed; a finalised step that does not
restore, or whose restored state does not match its fingerprint, is moved to `<workdir>/corrupt_checkpoints/` and
the previous step is tried.

An m3 checkpoint directory (DESIGN.md) stores its weights in `params/` with `save_params` / `load_params`; the
converter writes it with them and `checkpoint.init_from` reads it. `load_params` also reads the params of a
training workdir (latest or a given step), which is what `--ckpt WORKDIR` means for eval and generate.
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any, Callable

import grain.checkpoint as grain_checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


# ---- the data iterator's state ---------------------------------------------------------------------------------
class _IteratorSnapshot:
  """Stands in for the data iterator inside orbax: holds the state captured when `save` was called (an async save
  must not read the live iterator later, after it has moved on) and receives the state on restore."""

  def __init__(self, state: Any = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes):
    self.state = json.loads(state.decode())

  def start_prefetch(self):
    pass


def iterator_state(iterator) -> Any:
  """A JSON-able snapshot of `iterator` (grain DatasetIterator: dict; DataLoaderIterator: bytes of JSON)."""
  state = iterator.get_state()
  if isinstance(state, bytes):
    return {"__bytes__": state.decode()}
  return state


def set_iterator_state(iterator, state: Any):
  if isinstance(state, dict) and set(state) == {"__bytes__"}:
    state = state["__bytes__"].encode()
  iterator.set_state(state)


# ---- fingerprints ------------------------------------------------------------------------------------------------
@jax.jit
def _fingerprint(tree) -> jax.Array:
  leaves = [jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.sum(jnp.stack(leaves)) if leaves else jnp.zeros(())


def fingerprint(tree) -> float:
  """Sum of |x| over every float array: a cheap check that what was restored is what was saved (a zarr chunk lost
  from disk would otherwise read back silently as zeros)."""
  return float(jax.device_get(_fingerprint(tree)))


# ---- the training checkpoint manager ---------------------------------------------------------------------------
class Checkpoints:
  """`<workdir>/checkpoints/`: save / restore the train state and data iterator state by step."""

  def __init__(self, workdir: str | pathlib.Path, keep: int = 3, async_save: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.directory = self.workdir / "checkpoints"
    self._options = ocp.CheckpointManagerOptions(max_to_keep=int(keep) if keep else None,
                                                 enable_async_checkpointing=bool(async_save),
                                                 cleanup_tmp_directories=True, create=True)
    self._open()

  def _open(self):
    self.manager = ocp.CheckpointManager(
        self.directory.absolute(), options=self._options, item_names=("state", "data", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain_checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_state: Any = None, force: bool = False) -> bool:
    meta = {"step": int(step), "fingerprint": fingerprint(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain_checkpoint.CheckpointSave(_IteratorSnapshot(data_state)),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(int(step), args=args, force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, Any] | None:
    """Restores the latest good step (or `step`) onto `abstract_state`'s shapes and shardings ->
    (step, state, data_state), or None when there is no checkpoint. A step that fails to restore or to match
    its fingerprint is moved aside and the one before it is tried; `step=` given explicitly never falls back."""
    candidates = [step] if step is not None else list(reversed(self.steps()))
    for s in candidates:
      try:
        restored = self.manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                       data=grain_checkpoint.CheckpointRestore(_IteratorSnapshot()),
                                       meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        got = fingerprint(restored["state"])
        if not np.isclose(got, meta["fingerprint"], rtol=1e-5, atol=0):
          raise ValueError(f"restored state fingerprint {got} != saved {meta['fingerprint']}")
        return int(s), restored["state"], restored["data"].state
      except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint falls back to the previous one
        if step is not None:
          raise
        log.warning("checkpoint step %d in %s is unreadable (%s: %s); falling back to the previous one", s,
                    self.directory, type(e).__name__, str(e)[:300])
        self._quarantine(s)
    return None

  def _quarantine(self, step: int):
    """Moves a bad step directory out of the manager's sight so a later save of the same step can succeed."""
    if jax.process_index() == 0:
      target = self.workdir / "corrupt_checkpoints"
      target.mkdir(exist_ok=True)
      source = self.directory / str(step)
      if source.exists():
        dest = target / str(step)
        n = 1
        while dest.exists():
          dest, n = target / f"{step}.{n}", n + 1
        shutil.move(str(source), str(dest))
    _sync_hosts(f"quarantine_{step}")
    self.manager.close()
    self._open()


def _sync_hosts(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ---- m3 checkpoint directory params ----------------------------------------------------------------------------
def save_params(directory: str | pathlib.Path, params: Any):
  """Writes `params` (a pytree of arrays) to `<directory>/params` (orbax, replacing what is there). The caller
  writes `m3_config.json` and the tokenizer files beside it."""
  path = pathlib.Path(directory).absolute() / "params"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)
    ckptr.wait_until_finished()


def load_params(directory: str | pathlib.Path, target_shardings: Any = None, abstract: Any = None,
                step: int | None = None) -> Any:
  """Reads the params of an m3 checkpoint directory (`<directory>/params`) or of a training workdir (the params of
  `<directory>/checkpoints/<step>`, the latest when `step` is None; nothing else of the train state is read).

  With `target_shardings` (a tree of jax.sharding.Sharding matching the params) each array is read straight into
  its shards; with `abstract` (a tree of ShapeDtypeStruct, e.g. from jax.eval_shape(init)) the keys and shapes are
  checked first; otherwise arrays land on the default device. A mismatch is a ValueError naming each key."""
  directory = pathlib.Path(directory).absolute()
  if (directory / "params").exists():
    path, subtree = directory / "params", None
  elif (directory / "checkpoints").exists():
    steps = sorted(int(p.name) for p in (directory / "checkpoints").iterdir() if p.name.isdigit())
    if not steps:
      raise FileNotFoundError(f"training workdir {directory} has no finished checkpoint in checkpoints/")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"training workdir {directory} has no checkpoint for step {step}; it has {steps}")
    path, subtree = directory / "checkpoints" / str(step) / "state", "params"
  else:
    raise FileNotFoundError(f"{directory} is neither an m3 checkpoint directory (m3_config.json + params/, written "
                            "by `m3 convert` or save_params) nor a training workdir (checkpoints/)")
  with ocp.PyTreeCheckpointer() as ckptr:
    stored = ckptr.metadata(path)
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
    if subtree is not None:
      stored = stored[subtree]
    stored_shapes = {jax.tree_util.keystr(p): (tuple(m.shape), np.dtype(m.dtype))
                     for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
    if abstract is None:
      abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)
    else:
      check_tree_matches(abstract, stored_shapes, str(path))
    if target_shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target_shardings = jax.tree_util.tree_map(lambda _: device, abstract)
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                    target_shardings)
    if subtree is not None:
      target = {subtree: target}
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return restored[subtree] if subtree is not None else restored


def check_tree_matches(abstract: Any, stored_shapes: dict[str, tuple[tuple[int, ...], np.dtype]], where: str):
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


# ---- checkpoint.init_from --------------------------------------------------------------------------------------
# Fields that are run choices, not architecture: they may differ between the init checkpoint and the run. The
# pooling chain (`m3`) is what M3 training sets up on top of a plain LLaVA checkpoint.
_RUN_CHOICES = ("dtype", "remat", "m3")


def read_model_config(directory: str | pathlib.Path) -> dict:
  """The model config dict stored in `<directory>/m3_config.json` (either the ModelConfig dict itself or under a
  "model" key), without keys that are not ModelConfig fields (e.g. the chat template name)."""
  import dataclasses
  from m3_jax.models.config import ModelConfig
  path = pathlib.Path(directory) / "m3_config.json"
  if not path.exists():
    raise FileNotFoundError(f"checkpoint.init_from={str(directory)!r} has no m3_config.json: expected an m3 "
                            "checkpoint directory (`m3 convert SRC OUT` writes one)")
  stored = json.loads(path.read_text())
  stored = stored.get("model", stored)
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  return {k: v for k, v in stored.items() if k in fields}


def check_init_from(directory: str | pathlib.Path, model_config) -> None:
  """Raises a ValueError naming every architecture field where `<directory>/m3_config.json` differs from the
  run's ModelConfig (ignoring run choices: dtype, remat and the M3 scale chain)."""
  from m3_jax.models.config import ModelConfig
  stored = ModelConfig.from_dict(read_model_config(directory)).to_dict()
  ours = model_config.to_dict()
  diffs = []
  for key in sorted(set(stored) | set(ours)):
    if key in _RUN_CHOICES:
      continue
    a, b = stored.get(key), ours.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += [f"model.{key}.{k}: checkpoint {a.get(k)!r}, run config {b.get(k)!r}"
                for k in sorted(set(a) | set(b)) if _norm(a.get(k)) != _norm(b.get(k))]
    elif _norm(a) != _norm(b):
      diffs.append(f"model.{key}: checkpoint {a!r}, run config {b!r}")
  if diffs:
    raise ValueError(f"checkpoint.init_from={str(directory)!r} was written for a different model:\n  "
                     + "\n  ".join(diffs) + "\nfix the run config (or --config.model...=) to match the checkpoint")


def _norm(v):
  if isinstance(v, (list, tuple)):
    return tuple(_norm(x) for x in v)
  return v
