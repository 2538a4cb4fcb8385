"""A training run's reliability (issue 11): one trainer per workdir (a second `m3 train` is refused naming the holder);
a resume with a changed config is refused listing the fields, unless they cannot change the numbers or
--allow-config-change (recorded); a source with no good record (or none at all) stops naming the count; SIGTERM ends
a wait for data at once, saving; a checkpoint that cannot be written stops the run before its next step, once, naming
the path and the free space (exit 4), the previous checkpoint intact."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import orbax.checkpoint as ocp
import pytest

from m3_jax import cli, sharding as shd
from m3_jax.checkpoint import lease as lease_lib, workdir as workdir_lib
from m3_jax.data import pipeline
from m3_jax.data.synthetic import SyntheticBatches
from m3_jax.errors import BadFile, BadValue
from m3_jax.train import loop
from m3_jax.train.metrics import read_metrics
from m3_jax.train.state import TrainStep

from train_testlib import FAST_COMPILE, REPO, small_config, small_overrides


BATCH = {"train.batch_size": 8}   # the CLI shards the batch over the test session's 8 CPU devices


def m3_train(workdir, *extra: str, **overrides) -> list[str]:
  return ["train", "--config", str(REPO / "configs/tiny.py"), "--workdir", str(workdir), "--no-progress", *extra,
          *[f"--config.{o}" for o in small_overrides(**{**BATCH, **overrides})]]


@pytest.fixture(scope="module")
def trainer():
  """One compiled small trainer for the in-process runs (the host loop reads num_steps, every and keep from its
  config, so tests change them without recompiling)."""
  config = small_config(**{"train.num_steps": 2, "checkpoint.every": 2, **BATCH})
  return TrainStep(config, mesh=shd.make_mesh((1, 1, 1), jax.devices()[:1]), compiler_options=FAST_COMPILE)


@pytest.fixture
def config_of(trainer):
  """Sets fields of the shared trainer's config for one test."""
  saved = json.loads(trainer.config.to_json())
  def set_fields(**fields):
    for key, value in fields.items():
      section, name = key.split(".")
      trainer.config[section][name] = value
  yield set_fields
  for section in ("train", "checkpoint"):
    for name, value in saved[section].items():
      if not isinstance(value, list):
        trainer.config[section][name] = value


def synthetic(config, block_after: int | None = None):
  mc = config.model
  class Batches(SyntheticBatches):
    def __next__(self):
      if block_after is not None and self.index >= block_after:
        threading.Event().wait()   # a source that never yields again (a stuck reader, a filter that never passes)
      return super().__next__()
  return Batches(batch_size=int(config.train.batch_size), seq_len=int(config.data.max_length),
                 image_size=int(mc.vision.image_size), vocab_size=int(mc.llm.vocab_size),
                 image_token_id=int(mc.image_token_id))


def test_a_second_trainer_on_a_held_workdir_is_refused_naming_the_holder(tmp_path, capsys):
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])   # the running trainer
  try:
    (tmp_path / "lease.json").write_text(json.dumps({
        "token": "t", "host": socket.gethostname(), "pid": holder.pid, "pid_namespace": lease_lib._pid_namespace(),
        "started": time.time() - 60, "heartbeat": time.time() - 3, "timeout_s": 300.0}))
    assert cli.main(m3_train(tmp_path)) == 2
  finally:
    holder.kill()
    holder.wait()
  err = capsys.readouterr().err.strip().splitlines()
  assert re.fullmatch(re.escape(f"m3 train: error: training workdir {tmp_path} is in use by another trainer (host "
                                f"{socket.gethostname()}, pid {holder.pid}, last heartbeat ") +
                      r"\d+\.\d s ago, expiring after 300 s\); one trainer writes a workdir: .*", err[-1]), err[-1]
  assert "Traceback" not in "\n".join(err)
  assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()


def test_a_resume_with_another_config_is_refused_unless_free_or_allowed(tmp_path, trainer, config_of, capsys):
  loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False)
  assert workdir_lib.steps(tmp_path) == [2] and not (tmp_path / "lease.json").exists()
  saved = (tmp_path / "config.json").read_text()
  code = cli.main(m3_train(tmp_path, **{"train.num_steps": 2, "checkpoint.every": 2, "train.lr": 1e-3,
                                        "train.seed": 7}))
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err == (f"m3 train: error: training workdir {tmp_path} resumes at step 2 with a different config: "
                 "train.lr: 0.003 -> 0.001; train.seed: 0 -> 7. Resuming with train.lr, train.seed changed changes "
                 "the run's numbers; pass --allow-config-change to resume anyway (the change is recorded in "
                 "config_changes.jsonl), or use another --workdir")
  assert (tmp_path / "config.json").read_text() == saved and not (tmp_path / "lease.json").exists()
  # Free fields: more steps, saved more often.
  config_of(**{"train.num_steps": 3, "checkpoint.every": 1})
  assert loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False)["step"] == 3
  # A bound field, allowed.
  config_of(**{"train.num_steps": 4, "train.grad_clip": 0.5})
  with pytest.raises(workdir_lib.ConfigChanged, match=r"train.grad_clip: 1.0 -> 0.5; train.num_steps: 3 -> 4\. "):
    loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False)
  loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False, allow_config_change=True)
  changes = [json.loads(l) for l in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
  assert [(c["step"], c["allowed_by"], c["changes"]) for c in changes] == [
      (2, "resume-free fields", [{"key": "checkpoint.every", "old": 2, "new": 1},
                                 {"key": "train.num_steps", "old": 2, "new": 3}]),
      (3, "--allow-config-change", [{"key": "train.grad_clip", "old": 1.0, "new": 0.5},
                                    {"key": "train.num_steps", "old": 3, "new": 4}])]
  assert json.loads((tmp_path / "config.json").read_text())["train"]["grad_clip"] == 0.5
  assert sorted(read_metrics(tmp_path)) == [1, 2, 3, 4]


def llava_records(tmp_path, n: int):
  records = [{"id": f"r{i}", "image": f"missing_{i}.png",
              "conversations": [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red"}]}
             for i in range(n)]
  path = tmp_path / "train.json"
  path.write_text(json.dumps(records))
  return path


def test_a_source_without_a_good_record_stops_naming_the_count(tmp_path, capsys):
  path = llava_records(tmp_path, 12)
  source = {"data.source": "'llava_json'", "data.path": repr(str(path)), "data.image_folder": repr(str(tmp_path)),
            "data.on_bad_record": "'skip'", "data.max_length": 64}
  began = time.perf_counter()
  assert cli.main(m3_train(tmp_path / "run", **source)) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f"m3 train: error: all 12 records of data.source=llava_json data.path={path} were bad "
                        "(first: record r"), err
  assert ": file not found" in err and err.endswith("data.on_bad_record='skip' leaves nothing to train on")
  report = [json.loads(line) for line in (tmp_path / "run" / "bad_records.jsonl").read_text().splitlines()]
  assert sorted(r["id"] for r in report) == sorted(f"r{i}" for i in range(12))  # every skipped id, once
  assert not (tmp_path / "run" / "lease.json").exists()
  path.write_text("[]")
  assert cli.main(m3_train(tmp_path / "empty", **source)) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f"m3 train: error: {path}: no records (an empty list); expected a JSON list of {{id, image?, conversations}}")
  with pytest.raises(BadFile, match=r"^data.source=tfds data.path=x has no records; expected at least one to train"):
    pipeline.make_dataset([], None, batch_size=1, process_index=0, process_count=1, name="data.source=tfds data.path=x")
  assert time.perf_counter() - began < 300


def test_a_failing_evaluation_comes_after_the_checkpoint_of_its_step(tmp_path, trainer, config_of):
  """Evaluation at a checkpoint step runs after the save: a bad eval set (or an evaluation that runs out of memory)
  loses no trained step."""
  config_of(**{"train.num_steps": 2, "checkpoint.every": 2, "train.eval_every": 2})
  def on_eval(step, params):
    raise FileNotFoundError("eval.json")
  with pytest.raises(FileNotFoundError):
    loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False, on_eval=on_eval)
  assert workdir_lib.steps(tmp_path) == [2] and not (tmp_path / "lease.json").exists()


def test_a_run_that_fails_before_its_first_step_leaves_the_workdir_as_it_was(tmp_path, trainer, config_of):
  """A failure while resuming (here: an unreadable checkpoint, after an allowed config change) releases the lease
  and keeps the workdir's config.json and change record as they were: the command that made the run resumes it."""
  loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False)
  saved = (tmp_path / "config.json").read_text()
  config_of(**{"train.grad_clip": 0.5})
  def unreadable(self, abstract):
    raise workdir_lib.CheckpointsUnreadable("no readable checkpoint")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(workdir_lib.Checkpoints, "restore", unreadable)
    with pytest.raises(workdir_lib.CheckpointsUnreadable):
      loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False, allow_config_change=True)
  assert (tmp_path / "config.json").read_text() == saved and not (tmp_path / "config_changes.jsonl").exists()
  assert not (tmp_path / "lease.json").exists()
  config_of(**{"train.grad_clip": 1.0})
  assert loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False)["step"] == 2  # resumes as it was


def test_a_transient_restore_failure_moves_no_step_aside(tmp_path, trainer, config_of):
  """A storage timeout (or out of memory) while restoring the latest step says nothing about the step: the resume
  fails, to be retried, and the step stays where it is instead of being moved aside for an earlier one."""
  config_of(**{"train.num_steps": 2, "checkpoint.every": 1})
  loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False)
  assert workdir_lib.steps(tmp_path) == [1, 2]
  real = ocp.CheckpointManager.restore
  def flaky(self, step, *args, **kwargs):
    if step == 2:
      raise ValueError("gs://bucket/run/checkpoints/2/state: DEADLINE_EXCEEDED: read timed out")
    return real(self, step, *args, **kwargs)
  config_of(**{"train.num_steps": 3})
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ocp.CheckpointManager, "restore", flaky)
    with pytest.raises(ValueError, match="DEADLINE_EXCEEDED"):
      loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False)
  assert workdir_lib.steps(tmp_path) == [1, 2] and not (tmp_path / workdir_lib.CORRUPT).exists()
  assert not (tmp_path / "lease.json").exists()
  assert loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False)["step"] == 3   # the retry resumes at 2
  assert sorted(read_metrics(tmp_path)) == [1, 2, 3]


def test_only_errors_that_say_nothing_about_the_step_count_as_transient():
  from m3_jax.checkpoint.identity import ChecksumError
  run = "gs://bucket/m3-timeout-ablation"   # a path may hold any word
  assert workdir_lib.transient(ValueError("read failed: DEADLINE_EXCEEDED"))
  assert workdir_lib.transient(TimeoutError()) and workdir_lib.transient(MemoryError())
  wrapped = RuntimeError("restore failed")
  wrapped.__cause__ = ConnectionError("connection reset by peer")
  assert workdir_lib.transient(wrapped)
  assert not workdir_lib.transient(ChecksumError(f"{run}/checkpoints/3: array params/x timed out"), run)
  assert not workdir_lib.transient(ValueError(f"{run}/checkpoints/3/state: not a valid zarr array"), run)
  assert not workdir_lib.transient(ValueError("UNAVAILABLEX"))   # whole words only


def test_a_trainer_whose_lease_is_taken_stops_before_its_next_step(tmp_path, trainer, config_of):
  """Another trainer takes the workdir mid-run (here: lease.json rewritten with its token): the heartbeat notices,
  and the run stops with LeaseLost before its next step (all processes together: the flag is agreed like SIGTERM),
  leaving the other trainer's lease in place."""
  config_of(**{"train.num_steps": 6, "checkpoint.every": 100, "checkpoint.lease_timeout": 1.0})
  base = synthetic(trainer.config)
  class Thief:
    def __init__(self):
      self.served = 0
    def __iter__(self):
      return self
    def __next__(self):
      if self.served == 2:
        held = json.loads((tmp_path / "lease.json").read_text())
        (tmp_path / "lease.json").write_text(json.dumps({**held, "token": "thief"}))
        time.sleep(0.5)   # a few heartbeats (every 0.1 s)
      self.served += 1
      return next(base)
  with pytest.raises(lease_lib.LeaseLost, match="taken by another trainer"):
    loop.fit(trainer, tmp_path, Thief(), progress=False)
  assert json.loads((tmp_path / "lease.json").read_text())["token"] == "thief"
  assert max(read_metrics(tmp_path), default=0) <= 3


@pytest.mark.parametrize("key", ["checkpoint.every", "train.log_every"])
def test_a_zero_step_interval_is_refused_by_name_before_anything_runs(tmp_path, trainer, config_of, key):
  config_of(**{key: 0})
  with pytest.raises(BadValue, match=rf"^{re.escape(key)}=0: expected a whole number of steps >= 1$"):
    loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False)
  assert not (tmp_path / "lease.json").exists() and not (tmp_path / "config.json").exists()


def test_sigterm_ends_a_wait_for_data_at_once_and_saves(tmp_path, trainer, config_of):
  config_of(**{"train.num_steps": 6, "checkpoint.every": 100})
  batches = synthetic(trainer.config, block_after=3)
  handler = signal.getsignal(signal.SIGTERM)
  def send_when_blocked():
    while batches.index < 3:
      time.sleep(0.05)
    time.sleep(0.5)   # inside the wait
    os.kill(os.getpid(), signal.SIGTERM)
  threading.Thread(target=send_when_blocked, daemon=True).start()
  summary = loop.fit(trainer, tmp_path, batches, progress=False)
  assert summary["stopped"] == "SIGTERM" and summary["step"] == 3
  assert workdir_lib.steps(tmp_path) == [3]
  assert sorted(read_metrics(tmp_path)) == [1, 2, 3]
  assert signal.getsignal(signal.SIGTERM) == handler and not (tmp_path / "lease.json").exists()


def test_a_full_disk_stops_the_run_at_once_naming_path_and_free_space(tmp_path, trainer, config_of, monkeypatch,
                                                                      caplog):
  config_of(**{"train.num_steps": 8, "checkpoint.every": 2})
  original = ocp.JsonCheckpointHandler._save_fn
  async def full_from_step_4(self, x, directory):
    if isinstance(x, dict) and x.get("step", 0) >= 4:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await original(self, x, directory)
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_from_step_4)
  with caplog.at_level(logging.ERROR):
    with pytest.raises(workdir_lib.SaveFailed) as err:
      loop.fit(trainer, tmp_path, synthetic(trainer.config), progress=False)
  assert err.value.errno == errno.ENOSPC
  message = str(err.value)
  assert message.startswith(f"checkpoint step 4 could not be written to {tmp_path}/checkpoints/4: No space left on "
                            "device (ENOSPC); ")
  assert " GiB free of " in message and message.endswith("the last written checkpoint, step 2, is intact")
  assert "Traceback" not in caplog.text   # orbax's own records keep one line each
  assert max(read_metrics(tmp_path)) < 6   # stopped before the next save, where it used to surface
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", original)
  assert workdir_lib.Checkpoints(tmp_path).restore(trainer.abstract_state())[0] == 2
  assert not (tmp_path / "lease.json").exists()


def test_m3_train_exits_4_when_a_checkpoint_cannot_be_written(tmp_path, monkeypatch, caplog):
  def full(*args, **kwargs):
    raise workdir_lib.SaveFailed(f"checkpoint step 4 could not be written to {tmp_path}/checkpoints/4: ...")
  monkeypatch.setattr(loop, "fit", full)
  with caplog.at_level(logging.ERROR, logger="m3.train"):
    assert cli.main(m3_train(tmp_path)) == 4
  assert [r.getMessage() for r in caplog.records if r.name == "m3.train"] == [
      f"checkpoint step 4 could not be written to {tmp_path}/checkpoints/4: ..."]
