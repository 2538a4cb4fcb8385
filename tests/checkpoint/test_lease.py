"""One writer per workdir: the lease refuses a second trainer naming the holder, expires when its holder stops beating
(timeout) or is gone (a dead pid on this host), is kept fresh by the heartbeat, and notices being taken over. The
resume config check lists every changed field and lets the run-number-free ones through."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from m3_jax.checkpoint import lease as lease_lib, workdir


def write_lease(directory, **fields):
  record = {"token": "other", "host": "elsewhere", "pid": 4242, "pid_namespace": "", "started": time.time(),
            "heartbeat": time.time(), "timeout_s": 30.0, **fields}
  directory.mkdir(parents=True, exist_ok=True)
  (directory / lease_lib.LEASE).write_text(json.dumps(record))


def test_a_held_lease_refuses_a_second_writer_naming_the_holder(tmp_path):
  first = lease_lib.Lease.acquire(tmp_path / "run", timeout_s=30, settle_s=0)
  record = json.loads((tmp_path / "run" / "lease.json").read_text())
  assert (record["host"], record["pid"], record["timeout_s"]) == (socket.gethostname(), os.getpid(), 30.0)
  with pytest.raises(lease_lib.LeaseHeld) as err:
    lease_lib.Lease.acquire(tmp_path / "run", timeout_s=30, settle_s=0)
  assert str(err.value).startswith(f"training workdir {tmp_path / 'run'} is in use by another trainer (host "
                                   f"{socket.gethostname()}, pid {os.getpid()}, last heartbeat 0.")
  assert "s ago, expiring after 30 s)" in str(err.value)
  first.release()
  assert not (tmp_path / "run" / "lease.json").exists()
  lease_lib.Lease.acquire(tmp_path / "run", timeout_s=30, settle_s=0).release()


def test_a_foreign_lease_is_held_until_its_heartbeat_times_out(tmp_path, caplog):
  write_lease(tmp_path, heartbeat=time.time() - 5.0, timeout_s=30.0)
  with pytest.raises(lease_lib.LeaseHeld, match=r"host elsewhere, pid 4242, last heartbeat 5\.\d s ago"):
    lease_lib.Lease.acquire(tmp_path, timeout_s=1, settle_s=0)
  write_lease(tmp_path, heartbeat=time.time() - 31.0, timeout_s=30.0)
  with caplog.at_level(logging.WARNING, logger="m3_jax.checkpoint.lease"):
    taken = lease_lib.Lease.acquire(tmp_path, timeout_s=1, settle_s=0)
  assert "taking over the stale lease" in caplog.text and "more than its timeout of 30 s" in caplog.text
  assert json.loads((tmp_path / "lease.json").read_text())["token"] == taken.token
  taken.release()


def test_a_dead_holder_on_this_host_releases_at_once(tmp_path):
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  write_lease(tmp_path, host=socket.gethostname(), pid=int(gone.stdout), pid_namespace=lease_lib._pid_namespace())
  assert "no longer runs on this host" in lease_lib.stale_reason(json.loads((tmp_path / "lease.json").read_text()))
  lease_lib.Lease.acquire(tmp_path, timeout_s=30, settle_s=0).release()
  # this process, under a token it no longer holds (an in-process run that failed): stale
  write_lease(tmp_path, host=socket.gethostname(), pid=os.getpid(), pid_namespace=lease_lib._pid_namespace())
  assert "no longer holds it" in lease_lib.stale_reason(json.loads((tmp_path / "lease.json").read_text()))
  # another live process on this host holds it
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    write_lease(tmp_path, host=socket.gethostname(), pid=sleeper.pid, pid_namespace=lease_lib._pid_namespace())
    with pytest.raises(lease_lib.LeaseHeld, match=f"pid {sleeper.pid}"):
      lease_lib.Lease.acquire(tmp_path, timeout_s=30, settle_s=0)
  finally:
    sleeper.kill()
    sleeper.wait()


def test_the_heartbeat_keeps_the_lease_and_notices_a_takeover(tmp_path):
  held = lease_lib.Lease.acquire(tmp_path, timeout_s=0.5, settle_s=0)
  try:
    time.sleep(1.2)   # more than the timeout: only the heartbeat keeps it
    record = json.loads((tmp_path / "lease.json").read_text())
    assert time.time() - record["heartbeat"] < 0.5
    with pytest.raises(lease_lib.LeaseHeld):
      lease_lib.Lease.acquire(tmp_path, timeout_s=0.5, settle_s=0)
    held.check()
    write_lease(tmp_path, token="thief", host="other-host", pid=7)
    deadline = time.time() + 5
    while not held.lost and time.time() < deadline:
      time.sleep(0.05)
    with pytest.raises(lease_lib.LeaseLost, match="taken by another trainer \\(host other-host, pid 7"):
      held.check()
  finally:
    held.release()
  assert json.loads((tmp_path / "lease.json").read_text())["token"] == "thief"   # not ours: left in place


def test_resume_config_check_lists_every_changed_field(tmp_path, caplog):
  old = {"train": {"lr": 0.001, "num_steps": 10, "eval_every": 0, "seed": 0}, "checkpoint": {"every": 5},
         "data": {"path": "a.json"}}
  workdir.write_config(tmp_path, json.dumps(old))
  free = json.loads(json.dumps(old))
  free["train"].update(num_steps=20, eval_every=5)
  free["checkpoint"]["every"] = 2
  with caplog.at_level(logging.INFO, logger="m3_jax.checkpoint.workdir"):
    changes = workdir.check_resume_config(tmp_path, json.dumps(free), step=10)
  assert changes == [("checkpoint.every", 5, 2), ("train.eval_every", 0, 5), ("train.num_steps", 10, 20)]
  assert "resuming" in caplog.text and "train.num_steps: 10 -> 20" in caplog.text
  bound = json.loads(json.dumps(free))
  bound["train"]["lr"] = 0.003
  bound["data"]["path"] = "b.json"
  bound["train"]["new_field"] = 1    # a field this config has and the saved one lacks, not at its default
  with pytest.raises(workdir.ConfigChanged) as err:
    workdir.check_resume_config(tmp_path, json.dumps(bound), step=10, defaults={"train": {"new_field": 0}})
  assert str(err.value) == (
      f"training workdir {tmp_path} resumes at step 10 with a different config: checkpoint.every: 5 -> 2; "
      'data.path: "a.json" -> "b.json"; train.eval_every: 0 -> 5; train.lr: 0.001 -> 0.003; train.new_field: '
      '"(absent)" -> 1; train.num_steps: 10 -> 20. Resuming with data.path, train.lr, train.new_field changed '
      "changes the run's numbers; pass --allow-config-change to resume anyway (the change is recorded in "
      "config_changes.jsonl), or use another --workdir")
  bound["train"]["new_field"] = 0    # at its default: a field added since the run started
  workdir.check_resume_config(tmp_path, json.dumps(bound), step=10, allow=True, defaults={"train": {"new_field": 0}})
  lines = [json.loads(l) for l in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
  assert [l["allowed_by"] for l in lines] == ["resume-free fields", "--allow-config-change"]
  assert lines[1]["step"] == 10 and {"key": "train.lr", "old": 0.001, "new": 0.003} in lines[1]["changes"]
  assert "train.new_field" not in {c["key"] for c in lines[1]["changes"]}
