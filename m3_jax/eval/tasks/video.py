"""Video multiple-choice benchmarks: NExT-QA, IntentQA, EgoSchema, asked as the M3 paper asks them (IG-VLM).

`Sample.video` is the video file; the eval engine turns it into one image, the frame collage named by
`Sample.meta["collage"]` (m3_jax.data.video.load_video). The official M3 repository runs these benchmarks with its
copy of IG-VLM (github.com/imagegridworth/IG-VLM, vendored as mu-cai/matryoshka-mm/IG-VLM), LLaVA-NeXT 7B setting:
`eval_llava_multiplechoice.py` `get_llava_and_prompt("7b")` gives the prompt, `evaluation/direct_answer_eval.py`
`map_prediction_to_answer_v2` reads the answer (`metrics.igvlm_option`).

Task options (`get_task(name, prompt=..., collage=...)`):
  prompt   "igvlm" (default): IG-VLM's question text as the user turn of the checkpoint's chat template;
           "igvlm_verbatim": IG-VLM's whole prompt string as it tokenizes it (its own system line, `USER: <image>`,
           `ASSISTANT:\nAnswer:`), the official run exactly, for `--template none`;
           "llava": LLaVA's option layout ("A. ..." lines + "Answer with the option's letter ..."), scored with
           VLMEvalKit's `can_infer` (`metrics.infer_option`) instead of IG-VLM's reading.
  collage  "igvlm" (default): 6 frames at k * floor(n / 6), 3 rows x 2 columns; "linspace_2x3": 6 frames at
           round(linspace(0, n - 1)), 2 rows x 3 columns (m3-jax's earlier layout).
"""
from __future__ import annotations

import os
from typing import Iterator

from m3_jax.data.video import COLLAGES
from m3_jax.eval import metrics
from m3_jax.eval.metrics import LETTERS
from m3_jax.eval.tasks.base import Sample, Task, register
from m3_jax.eval.tasks.common import (TaskDataError, choice_prompt, field, find_file, iter_numbered,
                                      load_delimited, load_json)

# IG-VLM eval_llava_multiplechoice.py, get_llava_and_prompt("7b"), filled with (question, a0, ..., a4).
IGVLM_PROMPT = ("Select correct option to answer the question. USER: <image>\nThe provided image arranges keyframes "
                "from a video in a grid view. Question: %s A:%s. B:%s. C:%s. D:%s. E:%s. \nSelect the correct answer "
                "from the options. \nASSISTANT:\nAnswer:")
_USER_TURN = slice(len("Select correct option to answer the question. USER: <image>\n"), -len(" \nASSISTANT:\nAnswer:"))
PROMPTS = ("igvlm", "igvlm_verbatim", "llava")


def video_prompt(style: str, question: str, options: list[str]) -> str:
  """The prompt of `style` (see the module docstring) for a question and its five options."""
  if style == "llava":
    return choice_prompt(question, options)
  if len(options) != 5:
    raise TaskDataError(f"IG-VLM's prompt takes five options, got {len(options)}: {options!r}")
  full = IGVLM_PROMPT % (question, *options)
  return full if style == "igvlm_verbatim" else full[_USER_TURN]


class _VideoChoice(Task):
  kind = "choice"

  def __init__(self, video_folder: str | None = None, split: str | None = None, image_folder: str | None = None,
               prompt: str = "igvlm", collage: str = "igvlm"):
    if prompt not in PROMPTS:
      raise ValueError(f"{self.name}: prompt={prompt!r}, expected one of {', '.join(PROMPTS)}")
    if collage not in COLLAGES:
      raise ValueError(f"{self.name}: collage={collage!r}, expected one of {', '.join(COLLAGES)}")
    self.video_folder = video_folder or image_folder  # engines pass one media-folder option to every task
    self.split = split or self.default_split
    self.prompt, self.collage = prompt, collage

  default_split = "val"

  def score(self, sample: Sample, prediction: str) -> float:
    if self.prompt == "llava":
      return float(metrics.infer_option(prediction, sample.options) == sample.answers)
    # IG-VLM compares the option texts (predicted vs gold), not the letters
    letter = metrics.igvlm_option(prediction, sample.options)
    gold = sample.options[LETTERS.index(sample.answers)]
    return float(letter is not None and sample.options[LETTERS.index(letter)] == gold)

  def _sample(self, question_id: str, question: str, options: list[str], answer: int, video: str,
              category: str | None = None) -> Sample:
    return Sample(question_id=question_id, prompt=video_prompt(self.prompt, question, options),
                  answers=LETTERS[answer], video=video, options=options, category=category,
                  meta={"collage": self.collage})

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
      yield self._sample(f"{video}_{field(r, 'qid', where)}", field(r, "question", where), options, answer,
                         video_path(video), r.get("type"))


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
      yield self._sample(uid, field(q, "question", where), options, answer, os.path.join(folder, f"{uid}.mp4"))
