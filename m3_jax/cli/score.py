"""`m3 score TASK --data PATH --predictions JSONL`: score predictions from any model with a task's official metric.

Predictions are JSON lines with `question_id` and `prediction` (LLaVA answer files' `text` is accepted too); ids
are the task file's own (see each task's doc), compared as strings. Files written by `m3 eval` hold one line per
sample and scale: they are scored per scale (`--scale N[,N...]` picks some). The scoring itself (id matching, missing and
duplicate ids) is `m3_jax.eval.scoring`.

Every id problem is an error (exit status 2), reported by id on stderr: predictions for ids the task does not
have, ids predicted twice (for the same scale), and task samples without a prediction. `--allow-missing` scores
only the samples that have predictions and reports how many were missing (`missing` in the summary); unknown and
duplicate ids stay errors. The summary is one JSON object, printed last on stdout.
"""
from __future__ import annotations

import argparse
import json
import os

from m3_jax.cli import scale_list


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("task", help="task name (e.g. textvqa, mmbench, pope; an unknown name lists them all)")
  parser.add_argument("--data", required=True, help="the task's files as published (file or folder; see README)")
  parser.add_argument("--predictions", required=True, help="JSON lines {question_id, prediction}")
  parser.add_argument("--scale", type=scale_list, default=None, metavar="N[,N...]",
                      help="score only lines with these scales (one or a comma list; default: every scale in the file)")
  parser.add_argument("--allow-missing", action="store_true",
                      help="score the samples that have predictions; report the missing count instead of failing")
  parser.add_argument("--task-option", action="append", default=[], type=task_option, metavar="KEY=VALUE",
                      help="a task option, repeatable (video tasks: prompt=igvlm|igvlm_verbatim|llava)")
  parser.add_argument("--per-sample", default=None, metavar="JSONL",
                      help="also write {question_id, scale, prediction, score, prompt, answers} per scored sample to "
                           "this file")
  parser.epilog = "example:\n  m3 score textvqa --data textvqa/ --predictions runs/eval/predictions.jsonl --scale 36"


def task_option(text: str) -> tuple[str, str]:
  """`--task-option KEY=VALUE` -> (KEY, VALUE)."""
  key, eq, value = text.partition("=")
  if not eq or not key:
    raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. prompt=llava)")
  return key, value


def make_task(name: str, options: dict[str, str]):
  """The task `name` with `options` (--task-option pairs, --image-folder); ValueError naming the options when the
  task rejects one."""
  from m3_jax.eval.tasks import get_task
  try:
    return get_task(name, **options)
  except TypeError as e:  # an option the task's constructor does not take
    raise ValueError(f"task {name!r} rejects the options {sorted(options)}: {e}") from None


def run(args: argparse.Namespace) -> int:
  from m3_jax.cli import checks
  from m3_jax.eval import predictions, scoring
  from m3_jax.eval.tasks.common import outside_images
  task = make_task(args.task, dict(args.task_option))
  checks.existing(args.data, "--data")
  checks.existing(args.predictions, "--predictions", "file")
  if args.per_sample:
    checks.output_dir(os.path.dirname(args.per_sample) or ".", "--per-sample")
  with outside_images(True):  # scoring never opens an image, so where one lies does not matter
    samples = list(task.samples(args.data))
  result, per_sample = scoring.score_file(task, samples, args.predictions, scale=args.scale,
                                          allow_missing=args.allow_missing)
  if args.per_sample:
    predictions.write(args.per_sample, per_sample)
  print(json.dumps(result))
  return 0
