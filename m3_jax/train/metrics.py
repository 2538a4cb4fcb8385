"""Training metrics: `<workdir>/metrics.jsonl` (one JSON object per logged step) and TensorBoard events in
`<workdir>/tb/` (tensorboardX: no TensorFlow needed). Only process 0 writes.

After a resume the file is appended to, so a step may appear twice; the later line's values are the ones that count
(docs/design.md). An evaluation during training writes its scores (eval/<task>/scale_<N>) as a line of its own for the
same step. `read_metrics` applies both: a step's lines merge, a later value replacing an earlier one.

A workdir on an object store (gs://..., through etils.epath) cannot be appended to, and tensorboardX writes only
local files: both files are then written in a local staging folder and copied to the workdir whole, at most every
`sync_every` seconds and on close (metrics.jsonl is first copied down, so a resume appends to it).
"""
from __future__ import annotations

import json
import math
import tempfile
import time

from etils import epath

from m3_jax.checkpoint import workdir as workdir_lib


def is_local(path: str | epath.PathLike) -> bool:
  """False for an object-store path (gs://, s3://, ...), which the OS cannot open."""
  return "://" not in str(path)


class MetricsWriter:
  def __init__(self, workdir: str | epath.PathLike, enabled: bool = True, tensorboard: bool = True,
               sync_every: float = 60.0):
    self.enabled = enabled
    self.path = workdir_lib.metrics_path(workdir)
    self._tb_dir = workdir_lib.tensorboard_dir(workdir)
    self._tb = None
    self._staging = None
    self._sync_every, self._synced = float(sync_every), time.monotonic()
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    local_metrics, local_tb = self.path, self._tb_dir
    if not is_local(workdir):
      self._staging = tempfile.TemporaryDirectory(prefix="m3_metrics_")
      root = epath.Path(self._staging.name)
      local_metrics, local_tb = root / self.path.name, root / self._tb_dir.name
      if self.path.exists():
        self.path.copy(local_metrics)
    self._file = local_metrics.open("a")
    self._local_metrics, self._local_tb = local_metrics, local_tb
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(local_tb))

  def write(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _jsonable(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, int(step))
      self._tb.flush()
    if time.monotonic() - self._synced >= self._sync_every:
      self._sync()

  def text(self, tag: str, text: str, step: int = 0):
    """A text summary in TensorBoard (the run config, as markdown)."""
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, int(step))
      self._tb.flush()

  def _sync(self):
    """Copies the staged files to an object-store workdir (nothing to do for a local one)."""
    self._synced = time.monotonic()
    if self._staging is None:
      return
    self._local_metrics.copy(self.path, overwrite=True)
    if self._local_tb.exists():
      self._tb_dir.mkdir(parents=True, exist_ok=True)
      for f in self._local_tb.iterdir():
        f.copy(self._tb_dir / f.name, overwrite=True)

  def close(self):
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()
      self._sync()
      if self._staging is not None:
        self._staging.cleanup()


def _jsonable(v):
  v = float(v) if not isinstance(v, (int, str, bool)) else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf; "nan" / "inf" keeps the line parseable
  return v


def read_metrics(workdir: str | epath.PathLike) -> dict[int, dict]:
  """step -> the step's records merged in file order (a later line's value for a key wins)."""
  out = {}
  path = workdir_lib.metrics_path(workdir)
  for line in path.read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      out.setdefault(int(record["step"]), {}).update(record)
  return out
