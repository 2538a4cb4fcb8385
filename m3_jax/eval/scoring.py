"""Scoring a predictions file against a task's samples with the task's official metric (the work of `m3 score`).

Predictions are matched to samples by id (as strings). Every id problem is an error listing the ids: predictions
for ids the task does not have, ids predicted twice (for the same scale), and task samples without a prediction.
`allow_missing` scores only the samples that have predictions and reports how many were missing (`missing` in the
summary); unknown and duplicate ids stay errors. A file written by `m3 eval` (one line per sample and scale) is
scored per scale.
"""
from __future__ import annotations

from typing import Sequence

from m3_jax.eval import predictions as predictions_lib
from m3_jax.eval.predictions import PredictionError
from m3_jax.eval.tasks import Sample, Task

_SHOW = 20  # ids listed per problem before "... and N more"


def _listing(kind: str, ids: list[str]) -> str:
  shown = ", ".join(ids[:_SHOW]) + (f" ... and {len(ids) - _SHOW} more" if len(ids) > _SHOW else "")
  return f"{len(ids)} {kind}: {shown}"


def match(samples: Sequence[Sample], records: Sequence[dict], allow_missing: bool
          ) -> tuple[list[Sample], dict[str, str], list[str]]:
  """(scored samples, {id: prediction}, missing ids), or PredictionError listing unknown / duplicate / missing."""
  known = {s.question_id for s in samples}
  preds: dict[str, str] = {}
  duplicates, unknown = [], []
  for r in records:
    qid = r["question_id"]
    if qid not in known:
      unknown.append(qid)
    elif qid in preds:
      duplicates.append(qid)
    else:
      preds[qid] = r["prediction"]
  missing = [s.question_id for s in samples if s.question_id not in preds]
  problems = []
  if unknown:
    problems.append(_listing("ids not in the task file", unknown))
  if duplicates:
    problems.append(_listing("ids predicted more than once", duplicates))
  if missing and not allow_missing:
    problems.append(_listing("task ids without a prediction (--allow-missing scores the rest)", missing))
  if problems:
    raise PredictionError("\n".join(problems))
  scored = [s for s in samples if s.question_id in preds]
  if not scored:
    raise PredictionError("no task sample has a prediction")
  return scored, preds, missing


def score(task: Task, samples: Sequence[Sample], records: Sequence[dict], allow_missing: bool = False
          ) -> tuple[dict[str, float], list[dict]]:
  """(the task's summary metrics, one predictions record with its `score`, `prompt` and reference `answers` per
  scored sample) for records of one scale; with `allow_missing` the summary adds `missing`, the count of samples
  without a prediction."""
  scored, preds, missing = match(samples, records, allow_missing)
  summary = task.summarize(scored, preds)
  if allow_missing:
    summary["missing"] = float(len(missing))
  scale = records[0]["scale"]
  per_sample = [predictions_lib.record(s.question_id, scale, preds[s.question_id],
                                       task.score(s, preds[s.question_id]), prompt=s.prompt, answers=s.answers)
                for s in scored]
  return summary, per_sample


def score_file(task: Task, samples: Sequence[Sample], path: str, *, scale: int | Sequence[int | str] | None = None,
               allow_missing: bool = False) -> tuple[dict, list[dict]]:
  """Scores the predictions file `path` (only its lines with `scale`, when given).

  Returns (result, per-sample records). result is `{"task", "scale"?, metric: value, ...}` when the file holds
  one scale (or none), else `{"task", "scales": {scale: {metric: value}}}`.
  """
  records = predictions_lib.read(path, predictions_lib.SCORE_FIELDS, who="m3 score")
  # An `m3 eval` file: a later line for the same (question_id, scale) replaces an earlier one (a resumed or re-routed
  # run). A file without scales (another model's answers) must name each id once.
  records = ([r for r in records if r["scale"] is None]
             + list(predictions_lib.latest([r for r in records if r["scale"] is not None]).values()))
  if scale is not None:
    wanted = {scale} if isinstance(scale, (int, str)) else set(scale)
    records = [r for r in records if r["scale"] in wanted]
    scale = ",".join(str(s) for s in sorted(wanted, key=str)) if len(wanted) > 1 else next(iter(wanted))
  if not records:
    raise PredictionError(f"{path}: no predictions" + (f" with scale {scale}" if scale is not None else ""))
  groups = predictions_lib.by_scale(records)
  results, per_sample = {}, []
  for s in sorted(groups, key=lambda x: (x is None, isinstance(x, str), x if isinstance(x, int) else 0)):
    try:
      results[s], rows = score(task, samples, groups[s], allow_missing)
    except PredictionError as e:
      raise PredictionError(f"{path}" + (f" (scale {s})" if s is not None else "") + f":\n{e}") from None
    per_sample += rows
  if len(results) == 1:
    (s, summary), = results.items()
    return {"task": task.name, **({"scale": s} if s is not None else {}), **summary}, per_sample
  return {"task": task.name, "scales": {str(s): summary for s, summary in results.items()}}, per_sample
