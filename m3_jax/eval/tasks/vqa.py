"""Open-answer image benchmarks: TextVQA (with and without OCR tokens), VizWiz, GQA, DocVQA, ChartQA."""
from __future__ import annotations

import os
from typing import Iterable, Iterator

from m3_jax.eval import metrics
from m3_jax.eval.tasks.base import Sample, Task, register
from m3_jax.eval.tasks.common import (SHORT_ANSWER, TaskDataError, field, find_file, image_path, iter_numbered,
                                      load_json, load_jsonl)


def _image_dir(anchor_file: str, candidates: Iterable[str], override: str | None) -> str:
  """The image folder: `override`, else the first existing of `candidates` (relative to the anchor file's
  folder), else the first candidate (images are only opened by the eval engine, never by scoring)."""
  if override:
    return override
  base = os.path.dirname(os.path.abspath(anchor_file))
  paths = [os.path.normpath(os.path.join(base, c)) for c in candidates]
  return next((p for p in paths if os.path.isdir(p)), paths[0])


class _ImageTask(Task):
  def __init__(self, image_folder: str | None = None):
    self.image_folder = image_folder


def _answers_list(record: dict, where: str) -> list[str]:
  answers = field(record, "answers", where)
  if not isinstance(answers, list) or not answers:
    raise TaskDataError(f"{where}: 'answers' must be a non-empty list, got {answers!r}")
  return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


class _VQAAccuracy(_ImageTask):
  """Scores with VQA soft accuracy; summary `accuracy` (mean) plus per-category means."""

  def score(self, sample: Sample, prediction: str) -> float:
    return metrics.vqa_soft_accuracy(prediction, sample.answers)



# ---------------------------------------------------------------------------------------------------------------
# TextVQA
# ---------------------------------------------------------------------------------------------------------------
_TEXTVQA_ANN = "TextVQA_0.5.1_val.json"
_TEXTVQA_LLAVA = "llava_textvqa_val_v051_ocr.jsonl"
_TEXTVQA_OCR = "TextVQA_Rosetta_OCR_v0.2_val.json"


def _textvqa_records(path: str) -> tuple[str, list[dict]]:
  ann = find_file(path if not path.endswith(".jsonl") else os.path.dirname(path) or ".", [_TEXTVQA_ANN],
                  "TextVQA annotations")
  data = load_json(ann)
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise TaskDataError(f"{ann}: expected the official TextVQA layout {{'data': [...]}}")
  return ann, data["data"]


@register("textvqa")
class TextVQA(_VQAAccuracy):
  """TextVQA val without OCR tokens. --data: TextVQA_0.5.1_val.json or its folder (images in train_images/).
  Ids: the official `question_id`."""
  kind = "generate"
  ocr = False

  def samples(self, path: str) -> Iterator[Sample]:
    ann, records = _textvqa_records(path)
    llava = ocr_tokens = None
    if self.ocr:
      llava = self._llava_prompts(path, ann, records)
      ocr_tokens = None if llava is not None else self._ocr_tokens(ann, records)
    images = _image_dir(ann, ["train_images", "train_val_images/train_images", "images"], self.image_folder)
    for i, r, where in iter_numbered(records, ann):
      qid = str(field(r, "question_id", where))
      question, image_id = field(r, "question", where), field(r, "image_id", where)
      if not self.ocr:
        prompt = f"{question}\n{SHORT_ANSWER}"
      elif llava is not None:
        if qid not in llava:
          continue  # the LLaVA question file defines the evaluated set
        prompt = llava[qid]
      else:
        tokens = r.get("ocr_tokens", ocr_tokens.get(image_id) if ocr_tokens is not None else None)
        if tokens is None:
          raise TaskDataError(f"{where}: no OCR tokens for image {image_id} (need 'ocr_tokens' in the record, "
                              f"{_TEXTVQA_OCR} or {_TEXTVQA_LLAVA} beside {ann})")
        prompt = f"{question}\nReference OCR token: {', '.join(tokens)}\n{SHORT_ANSWER}"
      yield Sample(question_id=qid, prompt=prompt, answers=_answers_list(r, where),
                   image=image_path(images, f"{image_id}.jpg", where), category=None,
                   meta={"image_id": image_id})

  def _llava_prompts(self, path: str, ann: str, records: list[dict]) -> dict[str, str] | None:
    """{official question_id: LLaVA's prompt} from llava_textvqa_val_v051_ocr.jsonl, whose own `question_id` is
    the image id (not unique); records are matched as LLaVA's eval_textvqa does: (image_id, question.lower())."""
    if path.endswith(".jsonl"):
      jsonl = path
    else:
      jsonl = os.path.join(os.path.dirname(ann), _TEXTVQA_LLAVA)
      if not os.path.isfile(jsonl):
        return None
    by_key = {}
    for i, r, where in iter_numbered(records, ann):
      by_key.setdefault((str(field(r, "image_id", where)), field(r, "question", where).lower()),
                        str(field(r, "question_id", where)))
    prompts = {}
    for n, row in enumerate(load_jsonl(jsonl), 1):
      text = field(row, "text", f"{jsonl}, record {n}")
      key = (str(field(row, "question_id", f"{jsonl}, record {n}")), text.split("\n")[0].lower())
      if key not in by_key:
        raise TaskDataError(f"{jsonl}, record {n}: no annotation in {ann} for image {key[0]!r} and question "
                            f"{key[1]!r}")
      prompts[by_key[key]] = text
    return prompts

  def _ocr_tokens(self, ann: str, records: list[dict]) -> dict | None:
    if records and all("ocr_tokens" in r for r in records):
      return None
    rosetta = os.path.join(os.path.dirname(ann), _TEXTVQA_OCR)
    if not os.path.isfile(rosetta):
      return None
    data = load_json(rosetta)
    rows = data["data"] if isinstance(data, dict) else data
    return {r["image_id"]: r["ocr_tokens"] for r in rows}


@register("textvqa_ocr")
class TextVQAOCR(TextVQA):
  """TextVQA val with LLaVA-1.5's OCR-token prompt ("Reference OCR token: ..."). --data: the TextVQA folder with
  TextVQA_0.5.1_val.json and llava_textvqa_val_v051_ocr.jsonl (or the Rosetta OCR file, or records carrying
  `ocr_tokens`). Ids: the official `question_id`."""
  ocr = True


# ---------------------------------------------------------------------------------------------------------------
# VizWiz
# ---------------------------------------------------------------------------------------------------------------
_VIZWIZ_INSTRUCTION = "When the provided information is insufficient, respond with 'Unanswerable'."


@register("vizwiz")
class VizWiz(_VQAAccuracy):
  """VizWiz-VQA val. --data: Annotations/val.json or the folder holding it (images in val/). Ids: the 0-based
  record position (VizWiz questions carry no id). Category: `answer_type`."""
  kind = "generate"

  def samples(self, path: str) -> Iterator[Sample]:
    ann = find_file(path, ["val.json", "Annotations/val.json"], "VizWiz annotations")
    records = load_json(ann)
    if not isinstance(records, list):
      raise TaskDataError(f"{ann}: expected a list of questions (VizWiz val.json)")
    images = _image_dir(ann, ["val", "../val", "images"], self.image_folder)
    for i, r, where in iter_numbered(records, ann):
      question = field(r, "question", where)
      yield Sample(question_id=str(i), prompt=f"{question}\n{_VIZWIZ_INSTRUCTION}\n{SHORT_ANSWER}",
                   answers=_answers_list(r, where), image=image_path(images, field(r, "image", where), where),
                   category=r.get("answer_type"), meta={"answerable": r.get("answerable")})


# ---------------------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------------------


@register("gqa")
class GQA(_ImageTask):
  """GQA testdev balanced. --data: testdev_balanced_questions.json or its folder (images in images/). Ids: the
  question ids (the JSON object's keys). Exact match after stripping trailing periods and lower-casing.
  Category: `types.structural` (query / verify / logical / choose / compare)."""
  kind = "generate"

  def samples(self, path: str) -> Iterator[Sample]:
    ann = find_file(path, ["testdev_balanced_questions.json", "questions1.2/testdev_balanced_questions.json"],
                    "GQA questions")
    questions = load_json(ann)
    if not isinstance(questions, dict):
      raise TaskDataError(f"{ann}: expected a JSON object {{question_id: question}} (GQA questions file)")
    images = _image_dir(ann, ["images", "../images"], self.image_folder)
    for qid, q in questions.items():
      where = f"{ann}, question {qid}"
      if not isinstance(q, dict):
        raise TaskDataError(f"{where}: expected a JSON object")
      types = q.get("types") or {}
      yield Sample(question_id=str(qid), prompt=f"{field(q, 'question', where)}\n{SHORT_ANSWER}",
                   answers=field(q, "answer", where),
                   image=image_path(images, f"{field(q, 'imageId', where)}.jpg", where),
                   category=types.get("structural"), meta={"semantic": types.get("semantic")})

  def score(self, sample: Sample, prediction: str) -> float:
    return float(metrics.gqa_match(prediction, sample.answers))



# ---------------------------------------------------------------------------------------------------------------
# DocVQA
# ---------------------------------------------------------------------------------------------------------------


@register("docvqa")
class DocVQA(_ImageTask):
  """DocVQA val. --data: val_v1.0.json or its folder (images at the records' `image` paths, relative to it).
  Ids: `questionId`. Metric: ANLS. Category: the first of `question_types`."""
  kind = "generate"

  def samples(self, path: str) -> Iterator[Sample]:
    ann = find_file(path, ["val_v1.0.json", "val_v1.0_withQT.json"], "DocVQA annotations")
    data = load_json(ann)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
      raise TaskDataError(f"{ann}: expected the DocVQA layout {{'data': [...]}}")
    images = _image_dir(ann, ["."], self.image_folder)
    for i, r, where in iter_numbered(data["data"], ann):
      types = r.get("question_types") or [None]
      yield Sample(question_id=str(field(r, "questionId", where)),
                   prompt=f"{field(r, 'question', where)}\n{SHORT_ANSWER}", answers=_answers_list(r, where),
                   image=image_path(images, field(r, "image", where), where), category=types[0],
                   meta={"docId": r.get("docId")})

  def score(self, sample: Sample, prediction: str) -> float:
    return metrics.anls(prediction, sample.answers)

  metric = "anls"


# ---------------------------------------------------------------------------------------------------------------
# ChartQA
# ---------------------------------------------------------------------------------------------------------------
_CHARTQA_INSTRUCTION = "Answer the question with a single word."  # lmms-eval's ChartQA post-prompt


@register("chartqa")
class ChartQA(_ImageTask):
  """ChartQA test. --data: test_human.json or test_augmented.json (ids: 0-based record position), or the test/
  folder holding both (ids "human/N", "augmented/N"); images in png/. Metric: relaxed accuracy."""
  kind = "generate"

  def samples(self, path: str) -> Iterator[Sample]:
    if os.path.isdir(path):
      files = [(s, os.path.join(path, f"test_{s}.json")) for s in ("human", "augmented")]
      files = [(s, f) for s, f in files if os.path.isfile(f)]
      if not files:
        raise TaskDataError(f"ChartQA: neither test_human.json nor test_augmented.json in {path}")
      prefix = True
    else:
      find_file(path, [], "ChartQA questions")
      split = os.path.basename(path).removesuffix(".json").removeprefix("test_")
      files, prefix = [(split, path)], False
    for split, f in files:
      records = load_json(f)
      if not isinstance(records, list):
        raise TaskDataError(f"{f}: expected a list of {{'imgname', 'query', 'label'}} records")
      images = _image_dir(f, ["png"], self.image_folder)
      for i, r, where in iter_numbered(records, f):
        yield Sample(question_id=f"{split}/{i}" if prefix else str(i),
                     prompt=f"{field(r, 'query', where)}\n{_CHARTQA_INSTRUCTION}",
                     answers=str(field(r, "label", where)),
                     image=image_path(images, field(r, "imgname", where), where), category=split)

  def score(self, sample: Sample, prediction: str) -> float:
    return float(metrics.relaxed_correctness(prediction, sample.answers))

  metric = "relaxed_accuracy"
