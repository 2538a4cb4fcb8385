"""POPE (object hallucination) on COCO: adversarial / popular / random, scored as LLaVA's eval_pope."""
from __future__ import annotations

import glob
import os
from typing import Iterator

from m3_jax.eval import metrics
from m3_jax.eval.tasks.base import Sample, Task, register
from m3_jax.eval.tasks.common import (SHORT_ANSWER, TaskDataError, field, image_path, iter_numbered,
                                      load_json_or_jsonl, load_jsonl)

_PREFIX = "coco_pope_"


@register("pope")
class POPE(Task):
  """POPE. --data: one coco_pope_<category>.json (JSON lines with question_id, image, text, label; ids: its
  `question_id`), or the folder holding several (directly or in coco/; ids "<category>/<question_id>", because
  every file counts from 1). When LLaVA's llava_pope_test.jsonl is in that folder its ids are used instead,
  paired per category by position as LLaVA's eval_pope does. Images: COCO val2014 (val2014/ in the folder, or
  --image-folder).

  Summary: accuracy, precision, recall, f1, yes_ratio per category ("f1/adversarial", ...) and, at the top level,
  their mean over the categories present (the POPE number papers report is the mean F1 over the three).
  """
  kind = "generate"

  def __init__(self, image_folder: str | None = None):
    self.image_folder = image_folder

  def samples(self, path: str) -> Iterator[Sample]:
    llava_ids: dict[str, list[str]] = {}
    if os.path.isdir(path):
      files = sorted(glob.glob(os.path.join(path, f"{_PREFIX}*.json")) or
                     glob.glob(os.path.join(path, "coco", f"{_PREFIX}*.json")))
      if not files:
        raise TaskDataError(f"POPE: no {_PREFIX}<category>.json files in {path} or {path}/coco")
      base, prefix = path, True
      llava_file = os.path.join(path, "llava_pope_test.jsonl")
      if os.path.isfile(llava_file):
        # LLaVA numbers all categories in one file and pairs its n-th question of a category with the n-th line
        # of coco_pope_<category>.json (eval_pope.py zips them); its ids are then the ones predictions carry.
        for n, row in enumerate(load_jsonl(llava_file), 1):
          where = f"{llava_file}, record {n}"
          llava_ids.setdefault(field(row, "category", where), []).append(str(field(row, "question_id", where)))
    elif os.path.isfile(path):
      files, base, prefix = [path], os.path.dirname(os.path.abspath(path)), False
    else:
      raise TaskDataError(f"POPE: {path} does not exist")
    images = self.image_folder or os.path.join(base, "val2014")
    for f in files:
      name = os.path.basename(f).removesuffix(".json")
      category = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
      records = load_json_or_jsonl(f)
      if llava_ids and len(llava_ids.get(category, [])) != len(records):
        raise TaskDataError(f"POPE: llava_pope_test.jsonl has {len(llava_ids.get(category, []))} '{category}' "
                            f"questions, {f} has {len(records)}")
      for i, r, where in iter_numbered(records, f):
        label = field(r, "label", where)
        if label not in ("yes", "no"):
          raise TaskDataError(f"{where}: label {label!r} is not 'yes' or 'no'")
        qid = str(field(r, "question_id", where))
        if llava_ids:
          qid = llava_ids[category][i]
        elif prefix:
          qid = f"{category}/{qid}"
        yield Sample(question_id=qid,
                     prompt=f"{field(r, 'text', where)}\n{SHORT_ANSWER}", answers=label,
                     image=image_path(images, field(r, "image", where), where), category=category)

  def score(self, sample: Sample, prediction: str) -> float:
    return float(metrics.pope_answer(prediction) == sample.answers)

  def summarize(self, samples, predictions):
    by_cat: dict[str, tuple[list, list]] = {}
    for s in samples:
      preds, labels = by_cat.setdefault(s.category or "all", ([], []))
      preds.append(predictions[s.question_id])
      labels.append(s.answers)
    out: dict[str, float] = {}
    per = {c: metrics.pope_metrics(p, l) for c, (p, l) in sorted(by_cat.items())}
    for name in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
      out[name] = metrics.mean(m[name] for m in per.values())
      out.update({f"{name}/{c}": m[name] for c, m in per.items()})
    out["count"] = float(sum(len(l) for _, l in by_cat.values()))
    return out
