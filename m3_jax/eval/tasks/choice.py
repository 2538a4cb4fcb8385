"""Multiple-choice image benchmarks: MMBench (CircularEval), ScienceQA-IMG, SEED-Bench (image), AI2D, MMMU."""
from __future__ import annotations

import ast
import base64
import binascii
import glob
import os
import random
import zlib
from typing import Any, Iterator

from m3_jax.eval import metrics
from m3_jax.eval.metrics import LETTERS
from m3_jax.eval.tasks.base import Sample, Task, register
from m3_jax.eval.tasks.common import (OPTION_LETTER, SHORT_ANSWER, TaskDataError, choice_prompt, field, find_file,
                                      image_path, is_missing, iter_numbered, load_delimited, load_json,
                                      load_json_or_jsonl, load_parquet)


class _ChoiceTask(Task):
  kind = "choice"

  def __init__(self, image_folder: str | None = None):
    self.image_folder = image_folder

  def score(self, sample: Sample, prediction: str) -> float:
    return float(metrics.infer_option(prediction, sample.options) == sample.answers)



def _image_field(value: Any, base: str, where: str) -> tuple[str | None, bytes | None]:
  """(path, bytes) from a HF image cell: {"bytes", "path"} struct, raw bytes, or a path string."""
  if isinstance(value, dict):
    if value.get("bytes"):
      return None, value["bytes"]
    if value.get("path"):
      return image_path(base, value["path"], where), None
  elif isinstance(value, (bytes, bytearray)):
    return None, bytes(value)
  elif isinstance(value, str) and value:
    return image_path(base, value, where), None
  raise TaskDataError(f"{where}: no usable image (expected {{'bytes': ...}} or a path), got {type(value).__name__}")


def _options(r: dict, where: str) -> list:
  """A record's `options`: a list, or its Python literal as a string (the HF exports of AI2D and MMMU)."""
  options = field(r, "options", where)
  if isinstance(options, str):
    try:
      options = ast.literal_eval(options)
    except (ValueError, SyntaxError):
      raise TaskDataError(f"{where}: options {options!r} is not a list literal") from None
  if not isinstance(options, (list, tuple)):
    raise TaskDataError(f"{where}: options {options!r} is not a list")
  return options


def _records(path: str, what: str) -> list[dict]:
  """parquet files (a file, or every *.parquet under a folder), or a JSON / JSON-lines export."""
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not files:
      raise TaskDataError(f"{what}: no *.parquet files under {path}")
    return [r for f in files for r in load_parquet(f)]
  find_file(path, [], what)
  if path.endswith(".parquet"):
    return load_parquet(path)
  return load_json_or_jsonl(path)


# ---------------------------------------------------------------------------------------------------------------
# MMBench
# ---------------------------------------------------------------------------------------------------------------
_CIRCULAR = 1_000_000


@register("mmbench")
class MMBench(_ChoiceTask):
  """MMBench (dev) TSV with base64 images, scored with CircularEval.

  --data: e.g. mmbench_dev_20230712.tsv (LLaVA) or MMBench_DEV_EN.tsv (VLMEvalKit). A file of original questions
  only (every index < 1e6) is expanded into all rotations of its options as LLaVA's `--all-rounds` does: round r
  shows options[r:] + options[:r] under the letters A, B, ... and gets id index + r * 1e6. A file that already
  holds rotated rows (index >= 1e6, images given as the index of the row holding them) is read row by row.
  Ids: `index` (+ r * 1e6). `accuracy` is the circular accuracy (all rotations right); `single_pass_accuracy`
  counts only round 0.
  """

  def samples(self, path: str) -> Iterator[Sample]:
    tsv = find_file(path, ["mmbench_dev_20230712.tsv", "MMBench_DEV_EN.tsv", "mmbench_dev_en_20231003.tsv"],
                    "MMBench TSV")
    rows = load_delimited(tsv, "\t")
    images: dict[int, str] = {}
    parsed = []
    for n, row in enumerate(rows, 2):  # line 1 is the header
      where = f"{tsv}, line {n}"
      try:
        index = int(float(field(row, "index", where)))
      except ValueError:
        raise TaskDataError(f"{where}: index {row['index']!r} is not an integer") from None
      image = field(row, "image", where)
      if len(image) > 64:
        images[index] = image
      parsed.append((index, row, where, image))
    expand = all(index < _CIRCULAR for index, *_ in parsed)
    for index, row, where, image in parsed:
      if len(image) <= 64:  # VLMEvalKit stores a rotated row's image as the index of the row that holds it
        try:
          image = images[int(float(image))]
        except (ValueError, KeyError):
          raise TaskDataError(f"{where}: image {image!r} is neither base64 nor the index of a row with one") from None
      try:
        image_bytes = base64.b64decode(image, validate=False)
      except (binascii.Error, ValueError) as e:
        raise TaskDataError(f"{where}: image is not valid base64 ({e})") from None
      options = []
      for letter in "ABCDEFGH":
        if letter not in row or is_missing(row[letter]):
          break
        options.append(row[letter])
      if len(options) < 2:
        raise TaskDataError(f"{where}: fewer than two options in columns A, B, ...")
      answer = None if is_missing(row.get("answer")) else row["answer"].strip()
      if answer is not None and answer not in LETTERS[: len(options)]:
        raise TaskDataError(f"{where}: answer {answer!r} is not one of {', '.join(LETTERS[:len(options)])}")
      question = row["question"] if is_missing(row.get("hint")) else f"{row['hint']}\n{row['question']}"
      for r in range(len(options) if expand else 1):
        shown = options[r:] + options[:r]
        gold = None if answer is None else LETTERS[(LETTERS.index(answer) - r) % len(options)]
        yield Sample(question_id=str(index + r * _CIRCULAR), prompt=choice_prompt(question, shown),
                     answers=gold, image_bytes=image_bytes, options=shown, category=row.get("category"),
                     meta={"round": r if expand else index // _CIRCULAR, "l2_category": row.get("l2-category")})

  def summarize(self, samples, predictions):
    samples = list(samples)
    if any(s.answers is None for s in samples):
      raise TaskDataError("MMBench: this file has no 'answer' column (test split): submit predictions to the "
                          "MMBench server instead")
    rows = [(int(s.question_id), self.score(s, predictions[s.question_id])) for s in samples]
    out = {"accuracy": metrics.circular_accuracy(rows),
           "single_pass_accuracy": metrics.mean(c for i, c in rows if i < _CIRCULAR),
           "count": float(len({i % _CIRCULAR for i, _ in rows}))}
    cats: dict[str, list] = {}
    for s, row in zip(samples, rows):
      if s.category:
        cats.setdefault(s.category, []).append(row)
    out.update({f"accuracy/{c}": metrics.circular_accuracy(v) for c, v in sorted(cats.items())})
    return out


# ---------------------------------------------------------------------------------------------------------------
# ScienceQA-IMG
# ---------------------------------------------------------------------------------------------------------------


@register("scienceqa_img")
class ScienceQAImg(_ChoiceTask):
  """ScienceQA test questions that have an image (ScienceQA-IMG). --data: the folder with problems.json and
  pid_splits.json (images at images/test/<pid>/image.png); LLaVA's llava_test_CQM-A.json there, when present,
  supplies the prompts (else they are built in its layout: "Context: <hint>" line when there is a hint, question,
  "A. choice" lines). Ids: the problem id. Answer parsing: LLaVA's
  eval_science_qa (a bare letter, "B. text", or "The answer is B."). Category: `subject`."""

  def __init__(self, image_folder: str | None = None, split: str = "test"):
    super().__init__(image_folder)
    self.split = split

  def samples(self, path: str) -> Iterator[Sample]:
    if not os.path.isdir(path):
      raise TaskDataError(f"ScienceQA: --data must be the folder holding problems.json and pid_splits.json, "
                          f"got {path}")
    problems_file = find_file(path, ["problems.json"], "ScienceQA problems")
    splits_file = find_file(path, ["pid_splits.json"], "ScienceQA splits")
    problems, splits = load_json(problems_file), load_json(splits_file)
    if self.split not in splits:
      raise TaskDataError(f"{splits_file}: no split {self.split!r} (has {', '.join(splits)})")
    images = self.image_folder or os.path.join(path, "images", self.split)
    llava = self._llava_prompts(path)
    for pid in splits[self.split]:
      where = f"{problems_file}, problem {pid}"
      if pid not in problems:
        raise TaskDataError(f"{splits_file}: problem {pid} of split {self.split!r} is not in {problems_file}")
      p = problems[pid]
      if not p.get("image"):
        continue  # ScienceQA-IMG: only questions with an image context
      choices = field(p, "choices", where)
      answer = field(p, "answer", where)
      if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise TaskDataError(f"{where}: answer {answer!r} is not an index into its {len(choices)} choices")
      if pid in llava:
        prompt = f"{llava[pid]}\n{OPTION_LETTER}"
      else:
        hint = (p.get("hint") or "").strip()
        question = f"Context: {hint}\n{p['question']}" if hint else field(p, "question", where)
        prompt = choice_prompt(question, choices)
      yield Sample(question_id=str(pid), prompt=prompt, answers=LETTERS[answer],
                   image=image_path(images, f"{pid}/{p['image']}", where), options=list(choices),
                   category=p.get("subject"), meta={"grade": p.get("grade")})

  def _llava_prompts(self, path: str) -> dict[str, str]:
    """{problem id: question text} from LLaVA's llava_<split>_CQM-A.json when it is in the folder: the prompts
    LLaVA-1.5 / M3 were evaluated with (first human turn, "<image>" removed, stripped)."""
    f = os.path.join(path, f"llava_{self.split}_CQM-A.json")
    if not os.path.isfile(f):
      return {}
    out = {}
    for i, r, where in iter_numbered(load_json(f), f):
      turns = field(r, "conversations", where)
      if not turns or "value" not in turns[0]:
        raise TaskDataError(f"{where}: expected 'conversations' starting with a human turn {{'value': ...}}")
      out[str(field(r, "id", where))] = turns[0]["value"].replace("<image>", "").strip()
    return out

  def score(self, sample: Sample, prediction: str) -> float:
    return float(metrics.scienceqa_answer(prediction, len(sample.options)) == sample.answers)


# ---------------------------------------------------------------------------------------------------------------
# SEED-Bench (image)
# ---------------------------------------------------------------------------------------------------------------


@register("seed_image")
class SEEDBenchImage(_ChoiceTask):
  """SEED-Bench, image questions. --data: SEED-Bench.json or its folder (images in SEED-Bench-image/). Ids:
  `question_id`. Scored as LLaVA's convert_seed_for_submission: the (stripped) answer must be exactly the letter.
  Category: the question type name."""

  def samples(self, path: str) -> Iterator[Sample]:
    ann = find_file(path, ["SEED-Bench.json"], "SEED-Bench questions")
    data = load_json(ann)
    if not isinstance(data, dict) or "questions" not in data:
      raise TaskDataError(f"{ann}: expected {{'questions': [...], 'question_type': {{...}}}}")
    type_names = {v: k for k, v in (data.get("question_type") or {}).items()}
    base = os.path.dirname(os.path.abspath(ann))
    images = self.image_folder or os.path.join(base, "SEED-Bench-image")
    for i, q, where in iter_numbered(data["questions"], ann):
      if q.get("data_type", "image") != "image":
        continue
      options = [field(q, f"choice_{c}", where) for c in "abcd"]
      answer = field(q, "answer", where)
      if not isinstance(answer, str) or len(answer) != 1 or answer not in "ABCD":
        raise TaskDataError(f"{where}: answer {answer!r} is not one of A, B, C, D")
      qtype = q.get("question_type_id")
      yield Sample(question_id=str(field(q, "question_id", where)), prompt=choice_prompt(q["question"], options),
                   answers=answer, image=image_path(images, field(q, "data_id", where), where), options=options,
                   category=type_names.get(qtype, None if qtype is None else str(qtype)))

  def score(self, sample: Sample, prediction: str) -> float:
    return float(prediction.strip() == sample.answers)


# ---------------------------------------------------------------------------------------------------------------
# AI2D
# ---------------------------------------------------------------------------------------------------------------


@register("ai2d")
class AI2D(_ChoiceTask):
  """AI2D test as lmms-eval / LLaVA-NeXT evaluate it (lmms-lab/ai2d). --data: its parquet file(s) or folder, or a
  JSON / JSON-lines export with `question`, `options` (list), `answer` (index) and `image` (bytes struct or a
  path relative to the file). Ids: `question_id`/`id` when present, else the 0-based record position."""

  def samples(self, path: str) -> Iterator[Sample]:
    records = _records(path, "AI2D")
    base = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path
    base = self.image_folder or base
    for i, r, where in iter_numbered(records, path):
      options = _options(r, where)
      try:
        answer = int(field(r, "answer", where))
        gold = LETTERS[answer]
      except (ValueError, TypeError, IndexError):
        raise TaskDataError(f"{where}: answer {r['answer']!r} is not an option index") from None
      if not 0 <= answer < len(options):
        raise TaskDataError(f"{where}: answer {answer} is out of range for {len(options)} options")
      image, image_bytes = _image_field(field(r, "image", where), base, where)
      qid = r.get("question_id", r.get("id", i))
      yield Sample(question_id=str(qid), prompt=choice_prompt(field(r, "question", where), options), answers=gold,
                   image=image, image_bytes=image_bytes, options=list(options))


# ---------------------------------------------------------------------------------------------------------------
# MMMU
# ---------------------------------------------------------------------------------------------------------------


@register("mmmu")
class MMMU(_ChoiceTask):
  """MMMU validation (MMMU/MMMU on the HF hub). --data: the dataset folder (every *.parquet under it, e.g.
  <Subject>/validation-*.parquet), one parquet file, or a JSON / JSON-lines export with the same columns.
  Ids: `id` ("validation_Art_1"). Prompts as lmms-eval; answers parsed with MMMU's own rules. Only `image_1` is
  given to the model (LLaVA is single-image). Category: the subject taken from the id."""
  kind = "generate"  # mixed multiple-choice and open questions

  def samples(self, path: str) -> Iterator[Sample]:
    records = _records(path, "MMMU")
    base = self.image_folder or (os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path)
    for i, r, where in iter_numbered(records, path):
      qid = str(field(r, "id", where))
      qtype = field(r, "question_type", where)
      question, answer = field(r, "question", where), field(r, "answer", where)
      if qtype == "multiple-choice":
        options = _options(r, where)
        prompt = f"{choice_prompt(question, options, None)}\n\n{OPTION_LETTER}"
      else:
        options = None
        prompt = f"{question}\n\n{SHORT_ANSWER}"
        if isinstance(answer, str) and answer.startswith("["):
          try:
            answer = list(ast.literal_eval(answer))
          except (ValueError, SyntaxError):
            pass
      image = image_bytes = None
      if r.get("image_1") is not None:
        image, image_bytes = _image_field(r["image_1"], base, where)
      parts = qid.split("_")
      subject = "_".join(parts[1:-1]) if len(parts) > 2 else None
      yield Sample(question_id=qid, prompt=prompt, answers=answer, image=image, image_bytes=image_bytes,
                   options=options, category=subject, meta={"question_type": qtype})

  def score(self, sample: Sample, prediction: str) -> float:
    if sample.options is not None:
      # The reference falls back to a random letter from a global RNG seeded 42, so its result depends on order;
      # a per-question seed keeps this score reproducible for any order and any subset.
      rng = random.Random(zlib.crc32(sample.question_id.encode()))
      return float(metrics.mmmu_parse_multi_choice(prediction, sample.options, rng) == sample.answers)
    return float(metrics.mmmu_eval_open(sample.answers, metrics.mmmu_parse_open(prediction)))
