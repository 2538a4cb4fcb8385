"""One writer per training workdir: `<workdir>/lease.json`, held by the running trainer's primary process.

  lease.json   {"token", "host", "pid", "pid_namespace", "started", "heartbeat", "timeout_s"} (times: Unix seconds)

`hold(workdir, timeout_s)` (a run's processes: process 0 holds it) / `Lease.acquire(workdir, timeout_s)` takes the lease or raises `LeaseHeld` naming the holder (host, pid, the age of
its last heartbeat). A background thread rewrites the heartbeat every `timeout_s / 10` seconds; a lease whose
heartbeat is older than its holder's `timeout_s`, or whose holder ran on this host (and pid namespace) as a pid that
no longer exists (a SIGKILLed trainer), or that this very process took and no longer holds (an in-process
run that failed), is stale and taken over (logged, naming the old holder).

The file goes through etils.epath, so a workdir on an object store (gs://...) works too. A fresh local lease is
created atomically (O_EXCL); everywhere the taker re-reads the file after `settle_s` and holds the lease only if its
own token is there (write-then-check, for stores without an atomic create), and every heartbeat checks the token
again: a trainer that finds another token has lost the lease and `check()` raises LeaseLost before its next step.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from etils import epath

from m3_jax.errors import Incompatible

log = logging.getLogger(__name__)

LEASE = "lease.json"
_HELD: set[str] = set()   # tokens of the leases this process holds now


class LeaseHeld(Incompatible):
  """Another trainer holds the workdir's lease."""


class LeaseLost(Incompatible):
  """Another trainer took this trainer's lease (its heartbeat found another token in lease.json)."""


def _pid_namespace() -> str:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return ""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # exists, owned by another user
    return True
  try:   # a killed process whose parent died too may stay a zombie when nothing reaps it
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def read(workdir: str | epath.PathLike) -> dict | None:
  """The lease record of `workdir`, or None when nobody holds one."""
  path = epath.Path(workdir) / LEASE
  for _ in range(3):   # a remote rewrite may be caught half-way; a local one is an atomic rename
    try:
      return json.loads(path.read_text())
    except FileNotFoundError:
      return None
    except ValueError:
      time.sleep(0.1)
  raise LeaseHeld(f"{path} is not a lease record (JSON); if no trainer runs on this workdir, delete it")


def describe(record: dict, now: float | None = None) -> str:
  age = (time.time() if now is None else now) - float(record.get("heartbeat", 0))
  return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, last heartbeat {age:.1f} s ago, "
          f"expiring after {float(record.get('timeout_s', 0)):g} s")


def stale_reason(record: dict, now: float | None = None) -> str:
  """Why `record` no longer holds its workdir ("" while it does)."""
  now = time.time() if now is None else now
  age = now - float(record.get("heartbeat", 0))
  if age > float(record.get("timeout_s", 0)):
    return f"its last heartbeat is {age:.1f} s old, more than its timeout of {float(record['timeout_s']):g} s"
  if record.get("host") == socket.gethostname() and record.get("pid_namespace", "") == _pid_namespace():
    pid = int(record.get("pid", -1))
    if not _pid_alive(pid):
      return f"its process {pid} no longer runs on this host"
    if pid == os.getpid() and record.get("token") not in _HELD:
      return "this process took it and no longer holds it (a run in it that failed before its end)"
  return ""


def hold(workdir: str | epath.PathLike, timeout_s: float) -> Lease | None:
  """The lease of a (possibly multi-process) run: process 0 takes it; every process raises LeaseHeld when it could
  not, so none of them starts. Returns the Lease on process 0, None on the others."""
  import jax
  lease, error = None, None
  if jax.process_index() == 0:
    try:
      lease = Lease.acquire(workdir, timeout_s)
    except LeaseHeld as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))) and error is None:
      error = LeaseHeld(f"process 0 could not take the lease of training workdir {workdir} (its log names the "
                        "trainer holding it)")
  if error is not None:
    raise error
  return lease


class Lease:
  """The held lease of one workdir: a heartbeat thread while held; `release()` removes the file."""

  def __init__(self, workdir: str | epath.PathLike, timeout_s: float, settle_s: float):
    self.path = epath.Path(workdir) / LEASE
    self.timeout_s = float(timeout_s)
    self.settle_s = float(settle_s)
    self.token = uuid.uuid4().hex
    self.record = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                   "pid_namespace": _pid_namespace(), "started": time.time(), "heartbeat": time.time(),
                   "timeout_s": self.timeout_s}
    self.lost = ""
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  @classmethod
  def acquire(cls, workdir: str | epath.PathLike, timeout_s: float = 300.0, settle_s: float = 0.2) -> "Lease":
    """Takes `workdir`'s lease (creating the workdir) or raises LeaseHeld naming the holder."""
    lease = cls(workdir, timeout_s, settle_s)
    lease.path.parent.mkdir(parents=True, exist_ok=True)
    held = read(lease.path.parent)
    if held is not None:
      reason = stale_reason(held)
      if not reason:
        raise LeaseHeld(f"training workdir {lease.path.parent} is in use by another trainer ({describe(held)}); "
                        f"one trainer writes a workdir: wait for it to finish, stop it, or use another --workdir "
                        f"(a crashed trainer's lease expires by itself)")
      log.warning("taking over the stale lease of %s (%s): %s", lease.path.parent, describe(held), reason)
      lease._write()
    elif not lease._create():
      return cls.acquire(workdir, timeout_s, settle_s)   # another trainer created it first: judge its lease
    time.sleep(lease.settle_s)   # write-then-check: the last writer of a race holds the lease
    now = read(lease.path.parent)
    if now is None or now.get("token") != lease.token:
      raise LeaseHeld(f"training workdir {lease.path.parent} was taken by another trainer at the same time "
                      f"({describe(now) if now else 'its lease was removed'})")
    _HELD.add(lease.token)
    lease._thread = threading.Thread(target=lease._beat, name="m3-lease-heartbeat", daemon=True)
    lease._thread.start()
    return lease

  def _create(self) -> bool:
    """Creates lease.json if absent: atomically on a local filesystem; False when it already exists."""
    if not _is_local(self.path):
      self._write()
      return True
    try:
      fd = os.open(os.fspath(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(self.record, sort_keys=True) + "\n")
    return True

  def _write(self):
    text = json.dumps(self.record, sort_keys=True) + "\n"
    if _is_local(self.path):   # readers never see half a file
      tmp = self.path.parent / f".{LEASE}.{self.token}.tmp"
      tmp.write_text(text)
      os.replace(os.fspath(tmp), os.fspath(self.path))
    else:                      # an object write is atomic
      self.path.write_text(text)

  def _beat(self):
    interval = max(self.timeout_s / 10, 0.05)
    while not self._stop.wait(interval):
      try:
        now = read(self.path.parent)
        if now is None or now.get("token") != self.token:
          self.lost = (f"the lease of {self.path.parent} was taken by another trainer "
                       f"({describe(now) if now else 'lease.json was removed'})")
          log.error("%s; this trainer stops before its next step", self.lost)
          return
        self.record["heartbeat"] = time.time()
        self._write()
      except Exception as e:  # noqa: BLE001 -- a failed heartbeat is retried; the lease expires if they all fail
        log.warning("lease heartbeat of %s failed (%s: %s); retrying", self.path, type(e).__name__, e)

  def check(self):
    """Raises LeaseLost when another trainer took this lease (checked by the heartbeat)."""
    if self.lost:
      raise LeaseLost(self.lost)

  def release(self):
    """Stops the heartbeat and removes lease.json if it still holds this lease's token."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    _HELD.discard(self.token)
    try:
      now = read(self.path.parent)
    except LeaseHeld:
      now = None
    if now is not None and now.get("token") == self.token:
      self.path.unlink()
