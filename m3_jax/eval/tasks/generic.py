"""Tasks of the eval engine itself: the granularity probe and LLaVA's generic question JSONL."""
from __future__ import annotations

import io
import pathlib
from typing import Iterator

from m3_jax.eval import metrics
from m3_jax.eval.tasks.base import Sample, Task, register
from m3_jax.eval.tasks.common import TaskDataError, image_path, iter_jsonl


@register("probe")
class ProbeTask(Task):
  """The granularity probe (`m3 data probe --out DIR`): --data is that DIR, read as built (its seed and sizes; a DIR
  without a probe is an error, nothing is generated); its `split` (default `test`) is evaluated. `config` names the
  probe when DIR holds several (`m3 data probe` names them family_set_sSEED_TRAIN_VALIDATION_TEST).

  The model is trained to restate the key and then name its value ("black green"); a prediction is correct when
  its last word is the answer. Each sample's category is its question family.
  """
  kind = "generate"

  def __init__(self, split: str = "test", config: str | None = None, **options):
    super().__init__(**options)
    from m3_jax.data.probe import SPLITS
    if split not in SPLITS:
      raise ValueError(f"probe split {split!r} is not one of {', '.join(SPLITS)}")
    self.split, self.config = split, config

  def samples(self, path: str) -> Iterator[Sample]:
    from PIL import Image
    from m3_jax.data import probe, sources
    try:
      source = probe.open_built(path, self.config).as_data_source(self.split)
    except (FileNotFoundError, ValueError) as e:
      raise TaskDataError(str(e)) from None
    # In example order (index % 4 is the family), so that --limit keeps the families balanced.
    records = sorted((sources.from_tfds_record(source[i], f"probe/{self.split}#{i}") for i in range(len(source))),
                     key=lambda r: int(r["id"].rsplit("-", 1)[-1]))
    for rec in records:
      buf = io.BytesIO()
      Image.fromarray(rec["image"]).save(buf, format="PNG")
      question = rec["conversations"][0]["value"].replace("<image>", "").strip()
      yield Sample(question_id=rec["id"], prompt=question, answers=rec["answer"], image_bytes=buf.getvalue(),
                   category=rec.get("family"), meta={"needed_scale": rec.get("scale")})

  def score(self, sample: Sample, prediction: str) -> float:
    words = prediction.lower().replace(".", " ").split()
    return float(bool(words) and words[-1] == sample.answers)


@register("llava_jsonl")
class LlavaJsonl(Task):
  """LLaVA's generic question file: one JSON object per line with `question_id`, `image`, `text` (the prompt,
  instruction included) and optionally `answer` / `answers` / `category`. Answers may instead come from an
  `answers.jsonl` beside the file (`question_id` + `answer`/`answers`/`text`). Images are resolved against
  `image_folder` (default: the file's folder). Score: VQA soft accuracy with EvalAI normalisation when there are
  several reference answers, normalised exact match for one."""
  kind = "generate"

  def __init__(self, image_folder: str | None = None, **options):
    super().__init__(**options)
    self.image_folder = image_folder

  def samples(self, path: str) -> Iterator[Sample]:
    file = pathlib.Path(path)
    folder = pathlib.Path(self.image_folder) if self.image_folder else file.parent
    gold = _read_answers(file.with_name("answers.jsonl")) if file.with_name("answers.jsonl").exists() else {}
    for lineno, rec in iter_jsonl(file):
      if "question_id" not in rec or "text" not in rec:
        raise TaskDataError(f"{file}, line {lineno}: expected a JSON object with question_id, image, text (got "
                            f"keys {sorted(rec)})")
      qid = str(rec["question_id"])
      answers = rec.get("answers", rec.get("answer", gold.get(qid)))
      if answers is None:
        raise TaskDataError(f"{file}, line {lineno}: question {qid!r} has no answer (give `answer` in the line or "
                            f"an answers.jsonl beside {file.name})")
      image = image_path(str(folder), rec["image"], f"{file}, line {lineno}") if rec.get("image") else None
      yield Sample(question_id=qid, prompt=rec["text"].replace("<image>", "").strip(), answers=answers, image=image,
                   category=rec.get("category"))

  def score(self, sample: Sample, prediction: str) -> float:
    answers = sample.answers if isinstance(sample.answers, list) else [sample.answers]
    if len(answers) > 1:
      return metrics.vqa_soft_accuracy(prediction, [str(a) for a in answers])
    return float(metrics.evalai_normalize(prediction) == metrics.evalai_normalize(str(answers[0])))


def _read_answers(path: pathlib.Path) -> dict:
  out = {}
  for lineno, rec in iter_jsonl(path):
    if "question_id" not in rec:
      raise TaskDataError(f"{path}, line {lineno}: no question_id")
    out[str(rec["question_id"])] = rec.get("answers", rec.get("answer", rec.get("text")))
  return out
