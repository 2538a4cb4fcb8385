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
  lease.json                the running trainer's lease: one writer per workdir (checkpoint/lease.py)
  config_changes.jsonl      one line per resume that changed the config: {"time", "step", "allowed_by",
                            "changes": [{"key", "old", "new"}]} (`check_resume_config`)

Saves are asynchronous (the arrays are copied to host memory before `save` returns, so the next step may donate
them); the last `checkpoint.keep` are kept. Orbax finalises a step directory only after every item is written, so
a save cut short by SIGKILL leaves a temporary directory that is never listed; a finalised step that does not
restore, or whose restored arrays do not match their checksums, is moved to corrupt_checkpoints/ and the previous
step is tried.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import re
import shutil
import time
import tempfile
from typing import Any

import grain.checkpoint as grain_checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from m3_jax import sharding as shd
from m3_jax.checkpoint import identity, params as params_io
from m3_jax.errors import Incompatible

log = logging.getLogger(__name__)

CONFIG = "config.json"
CONFIG_CHANGES = "config_changes.jsonl"
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


# Config fields a resumed run may change without --allow-config-change: they change when the run stops, how often
# it saves, logs or evaluates, never the numbers it computes.
# train.num_steps is free (a smoke run, then a longer one; m3 demo --steps): the LR schedule and the finest-first
# phase are fractions of it, so they are recomputed for the new length from the resumed step on (recorded).
RESUME_FREE = ("train.num_steps", "train.log_every", "train.eval_*", "eval.*", "checkpoint.every", "checkpoint.keep",
               "checkpoint.async_save", "checkpoint.lease_timeout")


class ConfigChanged(Incompatible):
  """A resumed run's config differs from the workdir's config.json in a field that changes the run's numbers."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_diff(old: dict, new: dict, defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
  """(key, old value, new value) for every dotted key whose value differs between two configs (JSON dicts). Keys
  this m3-jax no longer has are not compared; a key the old config lacks counts only when the new value is not the
  field's default (`defaults`: a JSON dict of the schema's defaults), so a field added by a newer m3-jax resumes."""
  old, new, defaults = _flat(old), _flat(new), _flat(defaults or {})
  missing = object()
  out = []
  for key in sorted(new):
    before = old.get(key, missing)
    if before is missing:
      if key in defaults and defaults[key] == new[key]:
        continue
      before = "(absent)"
    if before != new[key]:
      out.append((key, before, new[key]))
  return out


def check_resume_config(workdir: str | epath.PathLike, config_json: str, step: int, allow: bool = False,
                        defaults: dict | None = None, record: bool = True) -> list[tuple[str, Any, Any]]:
  """Compares the config of a run resuming `workdir` at `step` with its config.json. A change outside RESUME_FREE
  raises ConfigChanged listing every differing field (old and new values) unless `allow`; the changes are logged and
  (`record`: the primary process) appended to config_changes.jsonl. Returns the changes."""
  changes = config_diff(read_config(workdir), json.loads(config_json), defaults)
  if not changes:
    return changes
  bound = _bound(changes)
  listing = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in changes)
  if bound and not allow:
    raise ConfigChanged(
        f"training workdir {workdir} resumes at step {step} with a different config: {listing}. Resuming with "
        f"{', '.join(k for k, _, _ in bound)} changed changes the run's numbers; pass --allow-config-change to "
        f"resume anyway (the change is recorded in {CONFIG_CHANGES}), or use another --workdir")
  (log.warning if bound else log.info)("resuming %s at step %d with config changes: %s", workdir, step, listing)
  if record:
    record_config_changes(workdir, step, changes)
  return changes


def _bound(changes: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
  """The changes outside RESUME_FREE (those that change the run's numbers)."""
  return [c for c in changes if not any(fnmatch.fnmatchcase(c[0], p) for p in RESUME_FREE)]


def record_config_changes(workdir: str | epath.PathLike, step: int, changes: list[tuple[str, Any, Any]]) -> None:
  """Appends a resume's config changes (`check_resume_config`'s) to config_changes.jsonl."""
  path = epath.Path(workdir) / CONFIG_CHANGES
  entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": int(step),
           "allowed_by": "--allow-config-change" if _bound(changes) else "resume-free fields",
           "changes": [{"key": k, "old": a, "new": b} for k, a, b in changes]}
  path.write_text((path.read_text() if path.exists() else "") + json.dumps(entry, sort_keys=True) + "\n")


def write_processor(workdir: str | epath.PathLike, tokenizer, preprocessor: dict) -> None:
  """Writes the training tokenizer (`tokenizer/`) and `preprocessor_config.json` once, so that the workdir's
  checkpoints can be loaded as a model."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if not (workdir / PREPROCESSOR).exists():
    (workdir / PREPROCESSOR).write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    with tempfile.TemporaryDirectory() as local:  # transformers writes local files only; epath copies them
      tokenizer.save_pretrained(local)
      (workdir / TOKENIZER).mkdir(parents=True, exist_ok=True)
      for f in epath.Path(local).iterdir():
        f.copy(workdir / TOKENIZER / f.name, overwrite=True)


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
TRANSIENT = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED)\b|\btimed out\b|\bconnection "
                       r"(reset|refused|aborted)\b|\btemporarily unavailable\b|\btoo many open files\b|"
                       r"\bout of memory\b", re.I)


def transient(error: BaseException, where: str = "") -> bool:
  """Whether a failed restore says nothing about the checkpoint: out of memory, a timeout, a storage service or
  network error (in the error or its causes; their text with the checkpoint's path `where` left out, which may
  hold any word). A checksum mismatch never is. Such a step is not moved aside: the restore fails, to be retried."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, identity.ChecksumError):
      return False
    if isinstance(error, OtherProcessFailed):
      return error.transient
    text = str(error).replace(where, "") if where else str(error)
    if isinstance(error, (MemoryError, TimeoutError, ConnectionError)) or TRANSIENT.search(text):
      return True
    error = error.__cause__ or error.__context__
  return False


class OtherProcessFailed(Exception):
  """Another process of a multi-process run could not restore a step that this one restored, or failed on less
  gravely (its log names its error): every process falls back from the step together, or, when that process's
  failure is `transient`, raises."""

  def __init__(self, message: str, transient: bool):
    super().__init__(message)
    self.transient = transient


class CheckpointsUnreadable(Incompatible):
  """Every checkpoint step of a workdir failed to restore (the run changed, or all are damaged)."""


class SaveFailed(OSError):
  """A checkpoint step could not be written (a full disk, a quota, an I/O error). The steps before it are intact:
  orbax finalises a step only once every item is written."""


def _os_error(error: BaseException) -> OSError | None:
  """The OSError behind `error` (itself, its cause or context, or inside an exception group)."""
  seen = set()
  stack = [error]
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno is not None:
      return e
    stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
  return None


def free_space(directory: epath.Path) -> str:
  """"X GiB free of Y GiB" on `directory`'s filesystem (the nearest existing parent), or why it is unknown."""
  if "://" in str(directory):
    return "free space unknown on an object store"
  path = directory
  while not path.exists() and path.parent != path:
    path = path.parent
  usage = shutil.disk_usage(str(path))
  return f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB on that filesystem"


class _NoOrbaxTracebacks(logging.Filter):
  """Orbax logs a failed background save with a traceback from each thread it passes through; Checkpoints raises it
  once as SaveFailed, so orbax's records keep their one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and "orbax" in record.pathname:
      record.msg, record.args = f"{record.getMessage()} ({record.exc_info[1]!r})", ()
      record.exc_info, record.exc_text = None, None
    return True


_ORBAX_FILTER = _NoOrbaxTracebacks()


class Checkpoints:
  """`<workdir>/checkpoints/`: save / restore the train state and data iterator state by step."""

  def __init__(self, workdir: str | epath.PathLike, keep: int = 3, async_save: bool = True):
    self.workdir = params_io.absolute(workdir)
    self.directory = self.workdir / CHECKPOINTS
    self._options = ocp.CheckpointManagerOptions(max_to_keep=int(keep) if keep else None,
                                                 enable_async_checkpointing=bool(async_save),
                                                 cleanup_tmp_directories=True, create=True)
    self._saving: int | None = None   # the step of the save in flight (or last started)
    self.failed: SaveFailed | None = None
    logging.getLogger("absl").addFilter(_ORBAX_FILTER)
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
    self._finished()   # the previous save's failure, if any, is raised before this one starts
    self._saving = int(step)
    with self._reported():
      return self.manager.save(int(step), args=args, force=force)

  def check(self):
    """Raises SaveFailed as soon as a background save has failed (never waits for one in flight)."""
    if self.failed is None and self._saving is not None and not self.manager.is_saving_in_progress():
      self._finished()

  def wait(self):
    self._finished()

  def close(self):
    """Waits for the save in flight; its failure is raised (once: not again after `check` or `wait` raised it)."""
    try:
      if self.failed is None:
        self._finished()
    finally:
      if self.failed is None:
        self.manager.close()

  def _finished(self):
    with self._reported():
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _reported(self):
    """Turns a failed write into one SaveFailed naming the step's path, the error and the free space."""
    if self.failed is not None:
      raise self.failed
    try:
      yield
    except Exception as e:  # noqa: BLE001 -- an OSError anywhere in the background write's chain is reported
      cause = _os_error(e)
      if cause is None:
        raise
      where = self.directory / str(self._saving)
      earlier = [s for s in self.steps() if self._saving is None or s < self._saving]
      self.failed = SaveFailed(
          f"checkpoint step {self._saving} could not be written to {where}: {cause.strerror or cause} "
          f"({errno.errorcode.get(cause.errno, cause.errno)}); {free_space(self.directory)}; "
          f"{f'the last written checkpoint, step {earlier[-1]}, is intact' if earlier else 'no earlier checkpoint'}")
      self.failed.errno = cause.errno
      raise self.failed from None

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, Any] | None:
    """Restores the latest good step (or `step`) onto `abstract_state`'s shapes and shardings ->
    (step, state, data_state), or None when there is no checkpoint. A step that fails to restore or to match its
    checksums falls back to the one before it; once an earlier step restores, the failed later ones are moved aside
    (a crash mid-write, a flipped bit). When no step restores, nothing is moved and the error names each step's
    failure: every step failing alike means the run changed (the state's tree, the number of processes), not that
    the checkpoints are bad, and starting over from step 0 would silently lose them. `step=` never falls back, and
    neither does a `transient` failure (out of memory, a timeout, a storage or network error): it is raised, the
    step left in place for a retry. In a multi-process run the processes agree on each step (`_agreed`): one
    that fails makes every process fall back from it (or raise, when its failure is transient), so all of them
    resume from the same step."""
    candidates = [step] if step is not None else list(reversed(self.steps()))
    failed: list[tuple[int, Exception]] = []
    for s in candidates:
      where = f"{self.directory}/{s}"
      try:
        restored = self.manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                       data=grain_checkpoint.CheckpointRestore(_IteratorSnapshot()),
                                       meta=ocp.args.JsonRestore()))
        error = None
      except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint falls back to the previous one
        error = e
        _join_restore_barrier(self.manager)
      # Every process reads its own shards: they agree before the checksums (a collective) and after them.
      if (error := self._agreed(s, error)) is None:
        try:
          sums = _state_checksums(restored["meta"], where)
          if sums is not None:
            identity.verify(restored["state"], sums, where)
        except Exception as e:  # noqa: BLE001
          error = e
        error = self._agreed(s, error)
      if error is not None:
        # (a good step is not moved aside for a network or memory error)
        if step is not None or transient(error, str(self.directory)):
          raise error
        log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one", s,
                    self.directory, type(error).__name__, str(error)[:300])
        # (neither the state read nor the error's frames may hold it on the devices while the next step restores)
        restored = None
        failed.append((s, error.with_traceback(None)))
        continue
      for bad, _ in failed:
        self._quarantine(bad)
      return int(s), restored["state"], restored["data"].state
    if failed:
      raise CheckpointsUnreadable(
          f"no checkpoint in {self.directory} restores, so training does not start over: "
          + "; ".join(f"step {s}: {type(e).__name__}: {str(e)[:300]}" for s, e in failed)
          + ". If the run changed (the model or train.freeze, the number of processes), resume it as it was "
          f"saved; to start over, move {self.directory} aside.")
    return None

  def _agreed(self, step: int, error: Exception | None) -> Exception | None:
    """This process's outcome of restoring `step`, agreed by every process: None when all of them restored it;
    else this process's own error, or OtherProcessFailed naming those that failed (transient when any failure was,
    which then stops every process)."""
    code = 0 if error is None else 2 if transient(error, str(self.directory)) else 1
    codes = shd.per_process(code)
    worst = int(codes.max())
    if worst == 0:
      return None
    if code == worst:
      return error
    which = ", ".join(str(i) for i in np.flatnonzero(codes == worst))
    other = OtherProcessFailed(
        f"checkpoint step {step} in {self.directory}: process {which} of {len(codes)} could not restore it"
        + (" (a transient error: out of memory, a timeout, a storage or network error)" if worst == 2 else "")
        + "; that process's log names the error", transient=worst == 2)
    other.__cause__ = error   # this process's own failure, if any (a lesser one), stays named
    return other

  def _quarantine(self, step: int):
    """Moves a bad step directory out of the manager's sight so a later save of the same step can succeed."""
    try:
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
    finally:   # (a failed move still meets the others at the barrier, then raises)
      _sync_hosts(f"quarantine_{step}")
    self.manager.close()
    self._open()


def _join_restore_barrier(manager: ocp.CheckpointManager):
  """orbax's Checkpointer.restore ends in a barrier (a device collective) that a process whose read raised never
  reached: it joins it here, or every later collective (the agreement on the step, the training steps) would pair
  with another process's previous one. (tests/train/test_reliability_multiprocess.py fails if orbax's restore
  changes its barrier.) A read that raised after the barrier (a peer or the coordinator gone) meets a second one:
  the run is broken then anyway."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(_restore_barrier_key(manager),
                                        processes=getattr(manager._checkpointer, "_active_processes", None))


def _restore_barrier_key(manager: ocp.CheckpointManager) -> str:
  """The name of the barrier that ends orbax's Checkpointer.restore (orbax's unique_barrier_key)."""
  prefix = getattr(manager._checkpointer, "_barrier_sync_key_prefix", None)  # noqa: SLF001 -- orbax's own key
  return "Checkpointer:restore" if prefix is None else f"{prefix}_Checkpointer:restore"


def _sync_hosts(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
