"""Training metrics: `<workdir>/metrics.jsonl` (one JSON object per logged step) and TensorBoard events in
`<workdir>/tb/` (tensorboardX: no TensorFlow needed). Only process 0 writes.

After a resume the file is appended to, so a step may appear twice; the later line is the one that counts
(DESIGN.md). `read_metrics` applies that rule.
"""
from __future__ import annotations

import json
import math
import pathlib

from m3_jax.checkpoint import workdir as workdir_lib


class MetricsWriter:
  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = workdir_lib.metrics_path(workdir)
    self._tb = None
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = self.path.open("a")
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(workdir_lib.tensorboard_dir(workdir)))

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

  def close(self):
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _jsonable(v):
  v = float(v) if not isinstance(v, (int, str, bool)) else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf; "nan" / "inf" keeps the line parseable
  return v


def read_metrics(workdir: str | pathlib.Path) -> dict[int, dict]:
  """step -> the last record written for that step."""
  out = {}
  path = workdir_lib.metrics_path(workdir)
  for line in path.read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      out[int(record["step"])] = record
  return out
