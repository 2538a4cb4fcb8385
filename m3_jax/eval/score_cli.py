"""`m3 score TASK --data PATH --predictions JSONL`: score predictions from any model with a task's official metric.

Predictions are JSON lines with `question_id` and `prediction` (LLaVA answer files' `text` is accepted too); ids
are the task file's own (see each task's doc), compared as strings. Files written by `m3 eval` hold one line per
sample and scale: they are scored per scale (`--scale N` picks one).

Every id problem is an error (exit status 2), reported by id on stderr: predictions for ids the task does not
have, ids predicted twice (for the same scale), and task samples without a prediction. `--allow-missing` scores
only the samples that have predictions and reports how many were missing (`missing` in the summary); unknown and
duplicate ids stay errors. The summary is one JSON object, printed last on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys

from m3_jax.eval.tasks.common import iter_jsonl

_SHOW = 20  # ids listed per problem before "... and N more"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("task", help="task name (e.g. textvqa, mmbench, pope; an unknown name lists them all)")
  parser.add_argument("--data", required=True, help="the task's files as published (file or folder; see README)")
  parser.add_argument("--predictions", required=True, help="JSON lines {question_id, prediction}")
  parser.add_argument("--scale", type=int, default=None, help="score only lines with this `scale`")
  parser.add_argument("--allow-missing", action="store_true",
                      help="score the samples that have predictions; report the missing count instead of failing")
  parser.add_argument("--per-sample", default=None, metavar="JSONL",
                      help="also write {question_id, scale, prediction, score} per scored sample to this file")


class PredictionError(ValueError):
  pass


def _listing(kind: str, ids: list[str]) -> str:
  shown = ", ".join(ids[:_SHOW]) + (f" ... and {len(ids) - _SHOW} more" if len(ids) > _SHOW else "")
  return f"{len(ids)} {kind}: {shown}"


def read_predictions(path: str, scale: int | None = None) -> dict[object, list[tuple[str, str, int]]]:
  """{scale or None: [(question_id, prediction, line)]}; a bad line is an error naming it."""
  groups: dict[object, list[tuple[str, str, int]]] = {}
  for n, row in iter_jsonl(path, PredictionError):
    if "question_id" not in row:
      raise PredictionError(f"{path}, line {n}: expected an object with 'question_id' and 'prediction'")
    pred = row.get("prediction", row.get("text"))
    if not isinstance(pred, str):
      raise PredictionError(f"{path}, line {n}: 'prediction' must be a string, got {pred!r}")
    s = row.get("scale")
    if scale is not None and s != scale:
      continue
    groups.setdefault(s, []).append((str(row["question_id"]), pred, n))
  if not groups:
    raise PredictionError(f"{path}: no predictions" + (f" with scale {scale}" if scale is not None else ""))
  return groups


def match(samples, rows: list[tuple[str, str, int]], allow_missing: bool) -> tuple[list, dict[str, str], list]:
  """(scored samples, {id: prediction}, missing ids), or PredictionError listing unknown / duplicate / missing."""
  known = {s.question_id for s in samples}
  preds: dict[str, str] = {}
  duplicates, unknown = [], []
  for qid, pred, _ in rows:
    if qid not in known:
      unknown.append(qid)
    elif qid in preds:
      duplicates.append(qid)
    else:
      preds[qid] = pred
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


def score(task, samples, rows, allow_missing: bool) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
  scored, preds, missing = match(samples, rows, allow_missing)
  summary = task.summarize(scored, preds)
  if allow_missing:
    summary["missing"] = float(len(missing))
  per_sample = [(s.question_id, preds[s.question_id], task.score(s, preds[s.question_id])) for s in scored]
  return summary, per_sample


def run(args: argparse.Namespace) -> int:
  from m3_jax.eval.tasks import UnknownTaskError, get_task
  from m3_jax.eval.tasks.common import TaskDataError
  try:
    task = get_task(args.task)
    samples = list(task.samples(args.data))
    groups = read_predictions(args.predictions, args.scale)
    results, per_sample = {}, []
    for s in sorted(groups, key=lambda x: (x is None, x)):
      try:
        summary, rows = score(task, samples, groups[s], args.allow_missing)
      except PredictionError as e:
        raise PredictionError(f"{args.predictions}" + (f" (scale {s})" if s is not None else "") + f":\n{e}")
      results[s] = summary
      per_sample += [(qid, s, pred, sc) for qid, pred, sc in rows]
  except (UnknownTaskError, TaskDataError, PredictionError, ValueError, OSError) as e:
    print(f"m3 score: {e}", file=sys.stderr)
    return 2
  if args.per_sample:
    with open(args.per_sample, "w", encoding="utf-8") as f:
      for qid, s, pred, sc in per_sample:
        f.write(json.dumps({"question_id": qid, "scale": s, "prediction": pred, "score": sc}) + "\n")
  if list(results) == [None] or len(results) == 1:
    (s, summary), = results.items()
    out = {"task": args.task, **({"scale": s} if s is not None else {}), **summary}
  else:
    out = {"task": args.task, "scales": {str(s): summary for s, summary in results.items()}}
  print(json.dumps(out))
  return 0
