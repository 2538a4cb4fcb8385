"""Multi-process training: two gloo processes on loopback, one SIGKILLed mid-run (then the job torn down, as a
scheduler does) and one process's shards of the latest checkpoint damaged, both restarted: they fall back from that
step together (only one of them fails to read it), and the losses are those of an uninterrupted run of one process
on the same number of devices (the same global mesh and batches), step for step."""
from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from m3_jax import sharding as shd
from m3_jax.checkpoint import workdir as workdir_lib
from m3_jax.train import loop
from m3_jax.train.metrics import read_metrics
from m3_jax.train.state import TrainStep

from train_testlib import FAST_COMPILE, REPO, small_config, small_overrides, subprocess_env

STEPS = 10


def children(pid: int) -> dict[int, str]:
  """pid -> command line of the direct children of `pid` (from /proc)."""
  out = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      if ppid == pid:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          out[int(entry)] = f.read().replace(b"\0", b" ").decode()
    except (OSError, IndexError, ValueError):
      continue
  return out


def launch(tmp_path, workdir, env, overrides) -> subprocess.Popen:
  """`launch/local.py`: two processes of 2 devices each training configs/tiny.py with `overrides` in `workdir`;
  process 0's output in tmp_path/<workdir name>.log, process 1's in workdir/process_1.log."""
  log = open(tmp_path / f"{workdir.name}.log", "a")
  return subprocess.Popen(
      [sys.executable, "launch/local.py", "--num-processes", "2", "--devices-per-process", "2",
       "--xla-flags=--xla_backend_optimization_level=0", "--config", str(REPO / "configs/tiny.py"),
       "--workdir", str(workdir), *[f"--config.{o}" for o in overrides]],
      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def two_process_env(compile_cache) -> dict:
  env = subprocess_env(compile_cache, devices=2)
  env.pop("XLA_FLAGS")   # launch/local.py sets each process's device count
  return env


@pytest.mark.slow
def test_two_processes_sigkilled_and_restarted_match_an_uninterrupted_one_process_run(tmp_path, compile_cache, caplog):
  overrides = small_overrides(**{"train.num_steps": STEPS, "checkpoint.every": 2, "train.scales": "(1,)",
                                 "train.lr": 3e-3})
  env = two_process_env(compile_cache)

  def logs(workdir):
    return "".join(p.read_text()[-2000:] for p in [tmp_path / f"{workdir.name}.log", *workdir.glob("process_*.log")]
                   if p.exists())

  broken = tmp_path / "broken"
  job = launch(tmp_path, broken, env, overrides)   # compiles; the restart reads its programs from the compilation cache
  try:
    deadline = time.time() + 400
    while not (len(workdir_lib.steps(broken)) >= 2 and (broken / "metrics.jsonl").exists()
               and max(read_metrics(broken), default=0) >= 5):
      assert job.poll() is None, f"the two-process run exited early with {job.returncode}: {logs(broken)}"
      assert time.time() < deadline, logs(broken)
      time.sleep(0.05)
    second = next(pid for pid, cmd in children(job.pid).items() if "--process-id 1" in cmd)
    os.kill(second, signal.SIGKILL)   # one process dies mid-run
    time.sleep(0.5)
    assert job.poll() is None, "the run ended before the SIGKILL: nothing was interrupted"
  finally:
    os.killpg(job.pid, signal.SIGKILL)   # the scheduler tears the job down
    job.wait()
  killed_at = max(read_metrics(broken))
  assert killed_at < STEPS
  # A disk lost part of process 1's shards of the latest step: process 1 cannot read it, process 0 can (it reads
  # its own). Resuming there alone would leave the processes at different steps; both must fall back together.
  damaged = max(workdir_lib.steps(broken))
  shard = max((broken / "checkpoints" / str(damaged) / "state" / "ocdbt.process_1" / "d").iterdir(),
              key=lambda f: f.stat().st_size)
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  restarted = launch(tmp_path, broken, env, overrides)
  try:
    # Meanwhile, the uninterrupted reference: one process (this one) on 4 devices, the same global mesh and batches
    # as the two processes.
    config = small_config(**dict(o.split("=", 1) for o in overrides))
    trainer = TrainStep(config, mesh=shd.make_mesh((1, -1, 1), jax.devices()[:4]), compiler_options=FAST_COMPILE)
    with caplog.at_level(logging.INFO, logger="m3_jax.train.loop"):
      loop.fit(trainer, tmp_path / "one", progress=False)
    assert f"scale curriculum: steps 0-{STEPS - 1} train scales 1 (the loss averaged over them)" in caplog.text
    assert restarted.wait(timeout=400) == 0, logs(broken)
  finally:
    if restarted.poll() is None:
      os.killpg(restarted.pid, signal.SIGKILL)
      restarted.wait()
  one, two = read_metrics(tmp_path / "one"), read_metrics(broken)
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  for step in one:
    assert abs(two[step]["loss"] - one[step]["loss"]) <= 1e-5 * abs(one[step]["loss"]), (step, two[step], one[step])
  assert one[STEPS]["loss"] < 0.9 * one[1]["loss"]   # the steps moved the loss: a resume from scratch would differ
  # The steps between the last checkpoint and the SIGKILL ran twice, by the killed job and by the restart: the
  # same two processes, so the same losses to float32 rounding.
  losses = collections.defaultdict(list)
  for line in (broken / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      losses[record["step"]].append(record["loss"])
  redone = {step: v for step, v in losses.items() if len(v) > 1}
  assert redone or killed_at % 2 == 0, (killed_at, dict(losses))   # odd: past the checkpoint every 2 steps
  for step, v in redone.items():
    assert max(v) - min(v) <= 1e-6, (step, v)
  assert workdir_lib.steps(broken) == [6, 8, 10]
  assert [p.name for p in (broken / "corrupt_checkpoints").iterdir()] == [str(damaged)], logs(broken)
  first = (tmp_path / "broken.log").read_text()   # process 0's output; process 1's is broken/process_1.log
  assert f"OtherProcessFailed: checkpoint step {damaged} in {broken}/checkpoints: process 1 of 2 could not" in first
  assert f"checkpoint step {damaged} in {broken}/checkpoints is unreadable" in (broken / "process_1.log").read_text()


@pytest.mark.slow
def test_when_process_0_loses_the_lease_both_processes_stop(tmp_path, compile_cache):
  """Another trainer takes the workdir (lease.json rewritten with its token) while two processes train: process 0's
  heartbeat notices, the flag is agreed before the next step, and both processes exit with LeaseLost instead of
  process 1 waiting in a collective that process 0 never joins. The other trainer's lease stays."""
  overrides = small_overrides(**{"train.num_steps": 400, "checkpoint.every": 1000, "train.scales": "(1,)",
                                 "train.lr": 3e-3, "checkpoint.lease_timeout": 1.0})
  work = tmp_path / "taken"
  job = launch(tmp_path, work, two_process_env(compile_cache), overrides)
  try:
    deadline = time.time() + 300
    while not ((work / "metrics.jsonl").exists() and max(read_metrics(work), default=0) >= 2):
      assert job.poll() is None, (tmp_path / "taken.log").read_text()[-3000:]
      assert time.time() < deadline, (tmp_path / "taken.log").read_text()[-3000:]
      time.sleep(0.05)
    held = json.loads((work / "lease.json").read_text())
    (work / "lease.json").write_text(json.dumps({**held, "token": "thief"}))
    code = job.wait(timeout=120)
  finally:
    if job.poll() is None:
      os.killpg(job.pid, signal.SIGKILL)
      job.wait()
  first, second = (tmp_path / "taken.log").read_text(), (work / "process_1.log").read_text()
  assert code != 0, first[-3000:]
  assert f"m3 train: error: the lease of {work} was taken by another trainer" in first, first[-3000:]
  assert "process 0 lost this workdir's lease to another trainer: every process stops" in second, second[-3000:]
  assert json.loads((work / "lease.json").read_text())["token"] == "thief"
  assert max(read_metrics(work)) < 400
