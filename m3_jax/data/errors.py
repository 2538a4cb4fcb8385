"""The one error type for a bad training/eval record, so `on_bad_record` and `m3 data check` can catch it."""
from __future__ import annotations

from m3_jax.errors import BadFile


class BadRecord(BadFile):
  """A record that cannot be used. `record_id` names it; `problem` says what is wrong and what was expected."""

  def __init__(self, record_id: str, problem: str):
    super().__init__(f"record {record_id}: {problem}")
    self.record_id = str(record_id)
    self.problem = problem
