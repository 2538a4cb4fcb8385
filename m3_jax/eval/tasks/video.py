"""Video multiple-choice benchmarks: NExT-QA, IntentQA, EgoSchema. `Sample.video` is the video file; the eval
engine turns it into the frame collage the paper evaluates (m3_jax.data.video)."""
from __future__ import annotations

import os
from typing import Iterator

from m3_jax.eval import metrics
from m3_jax.eval.metrics import LETTERS
from m3_jax.eval.tasks.base import Sample, Task, register
from m3_jax.eval.tasks.common import (TaskDataError, choice_prompt, field, find_file, iter_numbered,
                                      load_delimited, load_json)


class _VideoChoice(Task):
  kind = "choice"

  def __init__(self, video_folder: str | None = None, split: str | None = None, image_folder: str | None = None):
    self.video_folder = video_folder or image_folder  # engines pass one media-folder option to every task
    self.split = split or self.default_split

  default_split = "val"

  def score(self, sample: Sample, prediction: str) -> float:
    return float(metrics.infer_option(prediction, sample.options) == sample.answers)


  def _csv_samples(self, csv_path: str, video_key: str, video_path) -> Iterator[Sample]:
    """NExT-QA-style CSV: <video_key>, question, answer (index), qid, type, a0..a4. Ids: "<video>_<qid>"."""
    for n, r in enumerate(load_delimited(csv_path, ","), 2):
      where = f"{csv_path}, line {n}"
      options = [field(r, f"a{k}", where) for k in range(5)]
      try:
        answer = int(field(r, "answer", where))
        if not 0 <= answer < len(options):
          raise ValueError
      except ValueError:
        raise TaskDataError(f"{where}: answer {r['answer']!r} is not an index 0-4") from None
      video = field(r, video_key, where)
      yield Sample(question_id=f"{video}_{field(r, 'qid', where)}", prompt=choice_prompt(r["question"], options),
                   answers=LETTERS[answer], video=video_path(video), options=options, category=r.get("type"))


@register("nextqa")
class NExTQA(_VideoChoice):
  """NExT-QA multiple choice. --data: the folder with <split>.csv (val by default) or the CSV itself; videos at
  NExTVideo/<map_vid_vidorID.json[video]>.mp4 when that map is present, else videos/<video>.mp4. Ids:
  "<video>_<qid>". Category: the question type (CW, CH, TN, TC, DC, DL, DO)."""

  def samples(self, path: str) -> Iterator[Sample]:
    csv_path = find_file(path, [f"{self.split}.csv", f"nextqa/{self.split}.csv"], "NExT-QA questions")
    base = os.path.dirname(os.path.abspath(csv_path)) if os.path.isfile(path) else path
    map_file = os.path.join(base, "map_vid_vidorID.json")
    vid_map = load_json(map_file) if os.path.isfile(map_file) else None
    folder = self.video_folder or os.path.join(base, "NExTVideo" if vid_map else "videos")

    def video_path(video: str) -> str:
      if vid_map is not None:
        if video not in vid_map:
          raise TaskDataError(f"{map_file}: no entry for video {video}")
        return os.path.join(folder, f"{vid_map[video]}.mp4")
      return os.path.join(folder, f"{video}.mp4")

    yield from self._csv_samples(csv_path, "video", video_path)


@register("intentqa")
class IntentQA(_VideoChoice):
  """IntentQA multiple choice. --data: the folder with <split>.csv (test by default) or the CSV; videos at
  videos/<video_id>.mp4. Ids: "<video_id>_<qid>". Category: the question type."""
  default_split = "test"

  def samples(self, path: str) -> Iterator[Sample]:
    csv_path = find_file(path, [f"{self.split}.csv"], "IntentQA questions")
    base = os.path.dirname(os.path.abspath(csv_path))
    folder = self.video_folder or os.path.join(base, "videos")
    yield from self._csv_samples(csv_path, "video_id", lambda v: os.path.join(folder, f"{v}.mp4"))


@register("egoschema")
class EgoSchema(_VideoChoice):
  """EgoSchema subset (the 500 questions whose answers are public). --data: the folder with questions.json and
  subset_answers.json; videos at videos/<q_uid>.mp4. Ids: `q_uid`."""

  def samples(self, path: str) -> Iterator[Sample]:
    if not os.path.isdir(path):
      raise TaskDataError(f"EgoSchema: --data must be the folder holding questions.json and subset_answers.json, "
                          f"got {path}")
    qfile = find_file(path, ["questions.json"], "EgoSchema questions")
    afile = find_file(path, ["subset_answers.json"], "EgoSchema answers")
    questions, answers = load_json(qfile), load_json(afile)
    if not isinstance(questions, list) or not isinstance(answers, dict):
      raise TaskDataError(f"EgoSchema: expected a list in {qfile} and a {{q_uid: index}} object in {afile}")
    folder = self.video_folder or os.path.join(path, "videos")
    for i, q, where in iter_numbered(questions, qfile):
      uid = str(field(q, "q_uid", where))
      if uid not in answers:
        continue  # answer not public (full set is scored by the EgoSchema server)
      options = [field(q, f"option {k}", where) for k in range(5)]
      answer = answers[uid]
      if not isinstance(answer, int) or not 0 <= answer < 5:
        raise TaskDataError(f"{afile}, {uid}: answer {answer!r} is not an index 0-4")
      yield Sample(question_id=uid, prompt=choice_prompt(field(q, "question", where), options),
                   answers=LETTERS[answer], video=os.path.join(folder, f"{uid}.mp4"), options=options)
