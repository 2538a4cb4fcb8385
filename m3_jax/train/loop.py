"""The training loop: resume, step, report, checkpoint, stop on SIGTERM (`fit`), and the configured data source.

`fit(step, workdir)` trains a `state.TrainStep` up to `train.num_steps` in `workdir`, resuming from its latest good
checkpoint. Metrics are read one step late, so the host queues step n+1 before it waits for step n. A non-finite
step (its update was not applied by the step) stops the run (`train.on_nonfinite="raise"`, NonFiniteError) or is
logged and skipped (`"skip"`). SIGTERM (a preempted TPU VM, SLURM's time limit) saves a checkpoint and returns.

`workdir` may be an object-store path (gs://...): every file goes through etils.epath (checkpoints, config.json,
metrics.jsonl, TensorBoard). Evaluation during training (`train.eval_every`) is the caller's `on_eval(step, params)`
(cli/train.py builds it from m3_jax.eval, which train does not import); its scalars are logged beside the loss.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from typing import Callable, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath

from m3_jax import sharding as shd
from m3_jax.checkpoint import lease as lease_lib, workdir as workdir_lib
from m3_jax.configs import base as config_base
from m3_jax.errors import BadValue
from m3_jax.train import objective as obj
from m3_jax.train.metrics import MetricsWriter
from m3_jax.train.state import TrainStep

log = logging.getLogger(__name__)
ON_NONFINITE = ("raise", "skip")   # train.on_nonfinite: stop at a non-finite step, or log it and go on


class NonFiniteError(FloatingPointError):
  """The loss or gradient norm of a step was NaN or infinite (the state was left as it was before that step)."""


EvalFn = Callable[[int, dict], dict]  # (step, params) -> {"eval/<task>/scale_<N>": score, ...}


def fit(trainer: TrainStep, workdir: str | epath.PathLike, batches: Iterator[dict] | None = None,
        progress: bool = True, on_eval: EvalFn | None = None, allow_config_change: bool = False) -> dict:
  """Trains `trainer` in `workdir` up to `train.num_steps`, resuming from its latest good checkpoint. Returns a
  summary ({"step", "loss", "stopped"}). `batches` (host-local numpy batches with get_state/set_state) defaults to the
  configured data source. `on_eval(step, params)` runs every `train.eval_every` steps and at the last step (when
  eval_every > 0) on every process; process 0 logs the scalars it returns.

  One trainer writes a workdir: process 0 holds its lease (checkpoint/lease.py; LeaseHeld names the holder). A run
  resuming a checkpoint with a config that differs from config.json outside workdir.RESUME_FREE raises
  workdir.ConfigChanged unless `allow_config_change` (the change is then logged and recorded)."""
  workdir = epath.Path(workdir)
  config, train = trainer.config, trainer.config.train
  if train.on_nonfinite not in ON_NONFINITE:
    raise ValueError(f"train.on_nonfinite={train.on_nonfinite!r}: expected one of {', '.join(ON_NONFINITE)}")
  for key, value in (("checkpoint.every", config.checkpoint.every), ("train.log_every", train.log_every)):
    if not isinstance(value, int) or value < 1:
      raise BadValue(f"{key}={value!r}: expected a whole number of steps >= 1")
  primary = jax.process_index() == 0
  lease = lease_lib.hold(workdir, float(config.checkpoint.get("lease_timeout", 300.0)))   # None on processes > 0
  try:   # until the loop's own try: whatever fails releases the lease (a second fit in this process may take it)
    config_json = config.to_json_best_effort(indent=2, sort_keys=True)
    resumes = workdir_lib.latest_step(workdir)
    changes = []
    if resumes is not None:
      changes = workdir_lib.check_resume_config(workdir, config_json, resumes, allow=allow_config_change,
                                                defaults=json.loads(config_base.base().to_json_best_effort()),
                                                record=False)
      if jax.process_count() > 1:   # every process has read config.json before process 0 rewrites it
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("m3_resume_config_checked")
    batches = batches if batches is not None else make_batches(config, workdir)
    ckpts = workdir_lib.Checkpoints(workdir, keep=int(config.checkpoint.keep),
                                    async_save=bool(config.checkpoint.get("async_save", True)))
    restored = ckpts.restore(trainer.abstract_state())
    data_state = None
    if restored is None:
      state, start = trainer.init_state(), 0
    else:
      start, state, data_state = restored
      if data_state is not None and hasattr(batches, "set_state"):
        workdir_lib.set_iterator_state(batches, data_state)
      log.info("resumed from %s at step %d", ckpts.directory, start)
    # The new config (and the record of its changes) only once the run it describes has resumed or started: a
    # failed restore leaves the workdir as it was, resumable with the command that made it.
    if primary:
      if changes:   # (at the step resumed: an earlier one than the latest when that was unreadable)
        workdir_lib.record_config_changes(workdir, start, changes)
      workdir_lib.write_config(workdir, config_json)
  except BaseException:
    if lease is not None:
      lease.release()
    raise

  log.info("scale curriculum: %s", trainer.curriculum.describe(int(train.num_steps)))
  writer = MetricsWriter(workdir, enabled=primary)
  if start == 0:
    writer.text("config", "```\n" + config.to_json_best_effort(indent=2, sort_keys=True) + "\n```")
  eval_every = int(train.get("eval_every", 0) or 0) if on_eval is not None else 0
  stopper = _Preemption()
  every, num_steps, log_every = int(config.checkpoint.every), int(train.num_steps), int(train.log_every)
  bar = _progress(start, num_steps, enabled=progress and primary)
  pending: list = []
  last_loss, stopped, step = math.nan, "", start
  clock = _Clock()
  last_saved = start
  lockstep = True   # False once a process left the loop on its own (the others are not at a save)
  try:
    for step in range(start, num_steps):
      sigterm, lost = stopper.agreed(lease is not None and bool(lease.lost))
      if lost:   # every process stops, not only process 0 (the others would wait in the next collective)
        if lease is not None:
          lease.check()
        raise lease_lib.LeaseLost("process 0 lost this workdir's lease to another trainer: every process stops")
      ckpts.check()   # a failed background save stops the run before the next step
      if sigterm:
        stopped = "SIGTERM"
        break
      try:
        with stopper.interruptible():   # a source that never yields a batch must not outlive SIGTERM
          host_batch = {k: v for k, v in next(batches).items() if k in trainer.batch_ndim}
      except _Interrupted:
        stopped, lockstep = "SIGTERM", jax.process_count() == 1
        log.warning("SIGTERM while waiting for the next batch (step %d)", step + 1)
        break
      budget = obj.label_budget(host_batch["labels"], trainer.objective.max_label_tokens,
                                worst=int(shd.per_process(np.sum(host_batch["labels"] != obj.IGNORE, axis=1).max()).max()))
      data_state = workdir_lib.iterator_state(batches) if hasattr(batches, "get_state") else None
      batch = shd.shard_batch(host_batch, trainer.mesh, trainer.rules)
      state, metrics = trainer.compiled_step(batch, budget)(state, batch)
      clock.add(_tokens(trainer, host_batch))
      # Metrics are read one step late, so the host queues step n+1 before waiting for step n.
      for done in pending:
        last_loss = _report(trainer, done, writer, bar, clock)
      pending = [(step + 1, metrics)]
      if ((step + 1) % log_every != 0 and (step + 1) % every != 0 and step + 1 != num_steps
          and not (eval_every and (step + 1) % eval_every == 0)):
        continue
      for done in pending:
        last_loss = _report(trainer, done, writer, bar, clock, force_log=step + 1 == num_steps)
      pending = []
      if (step + 1) % every == 0 or step + 1 == num_steps:   # saved before the evaluation, which may fail
        ckpts.save(step + 1, state, data_state, force=True)
        last_saved = step + 1
      if eval_every and ((step + 1) % eval_every == 0 or step + 1 == num_steps):
        _evaluate(on_eval, step + 1, state["params"], writer, clock)
    else:
      step = num_steps
    for done in pending:
      last_loss = _report(trainer, done, writer, bar, clock, force_log=True)
    pending = []
    if stopped and step > last_saved and lockstep:
      log.warning("SIGTERM: saving a checkpoint at step %d and exiting", step)
      ckpts.save(step, state, data_state, force=True)
  finally:
    try:
      ckpts.close()   # waits for the save in flight: SIGTERM meanwhile lets it finish (it is the save SIGTERM wants)
    finally:
      writer.close()
      bar.close()
      stopper.restore()
      if lease is not None:
        lease.release()
  return {"step": int(step), "loss": last_loss, "stopped": stopped}


def _evaluate(on_eval: EvalFn, step: int, params, writer: MetricsWriter, clock: _Clock):
  """Runs the in-training evaluation on the current params and logs its scalars; its time is not counted in the
  steps/s and tokens/s rates."""
  began = time.perf_counter()
  scalars = on_eval(step, params)
  if scalars:
    writer.write(step, scalars)
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in sorted(scalars.items())))
  clock.pause(time.perf_counter() - began)


def _tokens(trainer: TrainStep, host_batch: dict) -> int:
  """Decoder tokens this step processes: text tokens at every trained scale plus each scale's visual tokens (a
  NeXT image's own packed count); one scale's worth, the mean, when scales are sampled."""
  text = int(np.asarray(host_batch["attention_mask"]).sum())
  images = int(np.asarray(host_batch["has_image"]).sum())
  visual = [int((np.asarray(host_batch[obj.index_key(s)]) >= 0).sum()) if obj.index_key(s) in host_batch
            else images * s for s in trainer.scales]
  per_scale = [text + v for v in visual]
  if trainer.curriculum.sampling != "all":
    return int(sum(per_scale) / len(per_scale) * jax.process_count())
  return int(sum(per_scale) * jax.process_count())


def _report(trainer: TrainStep, done, writer: MetricsWriter, bar, clock: _Clock, force_log: bool = False) -> float:
  step, metrics = done
  m = jax.device_get(metrics)
  loss = float(m["loss"])
  if not bool(m["finite"]):
    message = (f"non-finite loss or gradient at step {step} (loss={loss}, grad_norm={float(m['grad_norm'])}); "
               "the update was not applied")
    if trainer.config.train.on_nonfinite == "raise":
      raise NonFiniteError(message + "; no checkpoint was written after it (set train.on_nonfinite='skip' to "
                           "skip such steps)")
    log.warning(message + " (train.on_nonfinite='skip')")
  rates = clock.rates()
  bar.update(step - bar.n)
  bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{rates[0]:.2f}", tokens_s=f"{rates[1]:.0f}", refresh=False)
  if force_log or step % int(trainer.config.train.log_every) == 0:
    scalars = {"loss": loss, "grad_norm": float(m["grad_norm"]), "skipped": int(not bool(m["finite"])),
               "num_targets": int(m["num_targets"]), "steps_per_s": rates[0], "tokens_per_s": rates[1]}
    for s, value, trained in zip(trainer.scales, m["per_scale"], m["trained"]):
      if trained:
        scalars[f"loss/scale_{s}"] = float(value)
    scalars.update({k: float(v) for k, v in m.items() if k.startswith("lr/")})
    writer.write(step, scalars)
    if bar.disable:  # without a progress bar, the log shows the run going on
      log.info("step %d/%d: loss %.4f, grad_norm %.3f, %.2f steps/s, %.0f tokens/s", step, bar.total, loss,
               scalars["grad_norm"], rates[0], rates[1])
  return loss


def make_batches(config: ml_collections.ConfigDict, workdir: epath.PathLike | None) -> Iterator[dict]:
  """The configured data source as an iterator of host-local numpy batches with get_state / set_state."""
  data, mc = config.data, config.model
  if data.source == "synthetic":
    if mc.type != "llava15":
      raise BadValue(f"data.source='synthetic' makes LLaVA-1.5 batches (one image each), not model.type="
                     f"{mc.type!r}'s anyres crops; train LLaVA-NeXT on the probe (data.source='probe', "
                     "data.probe_aspects='1:1,2:1,1:2') or on llava_json data")
    from m3_jax.data.synthetic import SyntheticBatches
    return SyntheticBatches(batch_size=int(config.train.batch_size), seq_len=int(data.max_length),
                            image_size=int(mc.vision.image_size), vocab_size=int(mc.llm.vocab_size),
                            image_token_id=int(mc.image_token_id), bos_token_id=int(mc.bos_token_id),
                            eos_token_id=int(mc.eos_token_id), pad_token_id=int(mc.pad_token_id),
                            seed=int(data.get("seed", 0)))
  from m3_jax.data import pipeline
  return pipeline.train_iterator(config, workdir)


class _Interrupted(BaseException):
  """SIGTERM arrived during a wait that `_Preemption.interruptible` may cut short (a BaseException, so that no
  `except Exception` on the way swallows it)."""


class _Preemption:
  """SIGTERM (a preempted TPU VM, SLURM's time limit) asks the loop to save a checkpoint and return; inside
  `interruptible()` it also ends the wait at once (raising _Interrupted)."""

  def __init__(self):
    self.requested = False
    self._waiting = False
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None

  def _handle(self, signum, frame):
    self.requested = True
    if self._waiting:
      self._waiting = False
      raise _Interrupted()

  @contextlib.contextmanager
  def interruptible(self):
    """A wait that SIGTERM ends at once (the handler raises _Interrupted in the main thread)."""
    self._waiting = True
    try:
      yield
    finally:
      self._waiting = False

  def agreed(self, lost: bool = False) -> tuple[bool, bool]:
    """(any host got SIGTERM, any host lost the workdir's lease), the same on every host (the checkpoint save that
    follows SIGTERM is collective; a lost lease must stop every host, not leave the others in a collective)."""
    flags = shd.per_process(int(self.requested) | (int(lost) << 1))
    return bool((flags & 1).any()), bool((flags & 2).any())

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Clock:
  """Steps and tokens per second, timed from the first step's dispatch (which waits for compilation)."""

  def __init__(self):
    self.start = None
    self.steps = 0
    self.tokens = 0

  def add(self, tokens: int):
    if self.start is None:
      self.start = time.perf_counter()
      return
    self.steps += 1
    self.tokens += tokens

  def pause(self, seconds: float):
    """Leaves `seconds` (an evaluation) out of the rates."""
    if self.start is not None:
      self.start += seconds

  def rates(self) -> tuple[float, float]:
    dt = time.perf_counter() - self.start if self.start is not None else 0.0
    if self.steps <= 0 or dt <= 0:
      return 0.0, 0.0
    return self.steps / dt, self.tokens / dt


def _progress(start: int, total: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
