"""The training workdir (`m3 train --workdir DIR`; eval, generate and the demo read it):

  config.json               the run config (ml_collections JSON), written at every start
  checkpoints/<step>/       one orbax CheckpointManager step, three items:
    state                     params, optimiser state, step, RNG (StandardSave: every host writes its shards)
    data                      the data iterator's state, one JSON file per process (grain's checkpoint handler)
    meta                      {"step", "checksum_algorithm", "checksums": {state tree path: "DTYPE:CHECKSUM"}}
  corrupt_checkpoints/<step>  finalised steps that failed to restore or to match their checksums, moved aside
  metrics.jsonl, tb/        training metrics and TensorBoard events (train.metrics writes them here)
  tokenizer/                the training tokenizer (transformers `save_pretrained`)
  preprocessor_config.json  the image-processor settings of the training images

Saves are asynchronous (the arrays are copied to host memory before `save` returns, so the next step may donate
them); the last `checkpoint.keep` are kept. Orbax finalises a step directory only after every item is written, so
a save cut short by SIGKILL leaves a temporary directory that is never listed; a finalised step that does not
restore, or whose restored arrays do not match their checksums, is moved to corrupt_checkpoints/ and the previous
step is tried.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import grain.checkpoint as grain_checkpoint
import jax
import orbax.checkpoint as ocp
from etils import epath

from m3_jax.checkpoint import identity, params as params_io

log = logging.getLogger(__name__)

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
CORRUPT = "corrupt_checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
TOKENIZER = "tokenizer"
PREPROCESSOR = "preprocessor_config.json"
_PARAMS = "['params']"  # the params' prefix in the state tree's checksum keys


def is_workdir(directory: str | epath.PathLike) -> bool:
  d = epath.Path(directory)
  return (d / CONFIG).exists() and (d / CHECKPOINTS).exists()


def metrics_path(workdir: str | epath.PathLike) -> epath.Path:
  return epath.Path(workdir) / METRICS


def tensorboard_dir(workdir: str | epath.PathLike) -> epath.Path:
  return epath.Path(workdir) / TENSORBOARD


def tokenizer_dir(workdir: str | epath.PathLike) -> epath.Path:
  return epath.Path(workdir) / TOKENIZER


def write_config(workdir: str | epath.PathLike, config_json: str) -> None:
  """Writes the run config (a JSON string, e.g. ConfigDict.to_json_best_effort) as `<workdir>/config.json`."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / CONFIG).write_text(config_json.rstrip("\n") + "\n")


def read_config(workdir: str | epath.PathLike) -> dict:
  path = epath.Path(workdir) / CONFIG
  if not path.exists():
    raise FileNotFoundError(f"{workdir} is not a training workdir: it has no {CONFIG} (`m3 train` writes one)")
  return json.loads(path.read_text())


def write_processor(workdir: str | epath.PathLike, tokenizer, preprocessor: dict) -> None:
  """Writes the training tokenizer (`tokenizer/`) and `preprocessor_config.json` once, so that the workdir's
  checkpoints can be loaded as a model."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if not (workdir / PREPROCESSOR).exists():
    (workdir / PREPROCESSOR).write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(workdir / TOKENIZER))


def read_preprocessor(workdir: str | epath.PathLike) -> dict | None:
  path = epath.Path(workdir) / PREPROCESSOR
  return json.loads(path.read_text()) if path.exists() else None


def steps(workdir: str | epath.PathLike) -> list[int]:
  """The finalised checkpoint steps, ascending (an unfinished save is never listed)."""
  directory = epath.Path(workdir) / CHECKPOINTS
  return sorted(ocp.utils.checkpoint_steps(params_io.absolute(directory))) if directory.exists() else []


def latest_step(workdir: str | epath.PathLike) -> int | None:
  found = steps(workdir)
  return found[-1] if found else None


def resolve_step(workdir: str | epath.PathLike, step: int | None = None) -> int:
  """`step`, or the latest one, checked to exist."""
  found = steps(workdir)
  if not found:
    raise FileNotFoundError(f"training workdir {workdir} has no finished checkpoint in {CHECKPOINTS}/")
  if step is None:
    return found[-1]
  if step not in found:
    raise FileNotFoundError(f"training workdir {workdir} has no checkpoint for step {step}; it has {found}")
  return int(step)


def read_meta(workdir: str | epath.PathLike, step: int) -> dict:
  """The `meta` item of a step: {"step", "checksum_algorithm", "checksums"} (older steps: {"step", ...})."""
  path = params_io.absolute(workdir) / CHECKPOINTS / str(step) / "meta"
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
    return ckptr.restore(path)


def _state_checksums(meta: dict, where: str) -> dict[str, str] | None:
  if "checksums" not in meta:
    log.warning("%s was written before per-array checksums: it is not verified", where)
    return None
  if meta.get("checksum_algorithm") != identity.ALGORITHM:
    raise ValueError(f"{where}: checksum algorithm {meta.get('checksum_algorithm')!r}, this m3-jax reads "
                     f"{identity.ALGORITHM!r}")
  return meta["checksums"]


def params_checksums(workdir: str | epath.PathLike, step: int | None = None) -> dict[str, str] | None:
  """The checksums of a step's params (the latest step's when None), keyed relative to the params tree."""
  step = resolve_step(workdir, step)
  sums = _state_checksums(read_meta(workdir, step), f"{workdir}/{CHECKPOINTS}/{step}")
  return None if sums is None else identity.subtree(sums, _PARAMS)


def load_params(workdir: str | epath.PathLike, step: int | None = None, target_shardings: Any = None,
                abstract: Any = None) -> Any:
  """The params of `<workdir>/checkpoints/<step>` (the latest when `step` is None; nothing else of the train state
  is read), verified against the step's checksums; `target_shardings` and `abstract` as in params.restore."""
  workdir = params_io.absolute(workdir)
  step = resolve_step(workdir, step)
  where = f"{workdir}/{CHECKPOINTS}/{step}"
  sums = _state_checksums(read_meta(workdir, step), where)
  return params_io.restore(workdir / CHECKPOINTS / str(step) / "state", subtree="params",
                           target_shardings=target_shardings, abstract=abstract, checksums=sums)


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


# ---- the checkpoint manager ------------------------------------------------------------------------------------
class Checkpoints:
  """`<workdir>/checkpoints/`: save / restore the train state and data iterator state by step."""

  def __init__(self, workdir: str | epath.PathLike, keep: int = 3, async_save: bool = True):
    self.workdir = params_io.absolute(workdir)
    self.directory = self.workdir / CHECKPOINTS
    self._options = ocp.CheckpointManagerOptions(max_to_keep=int(keep) if keep else None,
                                                 enable_async_checkpointing=bool(async_save),
                                                 cleanup_tmp_directories=True, create=True)
    self._open()

  def _open(self):
    self.manager = ocp.CheckpointManager(
        self.directory, options=self._options, item_names=("state", "data", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain_checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    found = self.steps()
    return found[-1] if found else None

  def save(self, step: int, state: Any, data_state: Any = None, force: bool = False) -> bool:
    meta = {"step": int(step), "checksum_algorithm": identity.ALGORITHM, "checksums": identity.checksums(state)}
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
    (step, state, data_state), or None when there is no checkpoint. A step that fails to restore or to match its
    checksums is moved aside and the one before it is tried; `step=` given explicitly never falls back."""
    candidates = [step] if step is not None else list(reversed(self.steps()))
    for s in candidates:
      try:
        restored = self.manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                       data=grain_checkpoint.CheckpointRestore(_IteratorSnapshot()),
                                       meta=ocp.args.JsonRestore()))
        where = f"{self.directory}/{s}"
        sums = _state_checksums(restored["meta"], where)
        if sums is not None:
          identity.verify(restored["state"], sums, where)
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
      target = self.workdir / CORRUPT
      target.mkdir(exist_ok=True)
      source = self.directory / str(step)
      if source.exists():
        dest = target / str(step)
        n = 1
        while dest.exists():
          dest, n = target / f"{step}.{n}", n + 1
        source.rename(dest)
    _sync_hosts(f"quarantine_{step}")
    self.manager.close()
    self._open()


def _sync_hosts(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
