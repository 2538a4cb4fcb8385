"""`m3 eval`: a checkpoint on a task at several scales -> predictions.jsonl, summary.json, summary.csv.

Resumable: predictions already in `predictions.jsonl` (by question_id and scale) are not recomputed; the summary
is always rebuilt from the whole file (a later line for the same key wins).
"""
from __future__ import annotations

import csv
import json
import pathlib
import string
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from m3_jax.eval.pipeline import M3Model
from m3_jax.eval.tasks import Sample, Task


def sample_image(sample: Sample):
  """The image a sample shows the model: a file, embedded bytes, or a video's frame collage."""
  if sample.video is not None:
    from m3_jax.data.video import load_video
    return load_video(sample.video)
  if sample.image_bytes is not None:
    return sample.image_bytes
  return sample.image


def read_predictions(path: pathlib.Path) -> dict[tuple[str, int], dict]:
  done: dict[tuple[str, int], dict] = {}
  lines = path.read_text().splitlines() if path.exists() else []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      done[(str(rec["question_id"]), int(rec["scale"]))] = rec
    except (json.JSONDecodeError, KeyError, ValueError) as e:
      if lineno == len(lines):  # the last line, cut by a crash: redo that sample
        continue
      raise ValueError(f"{path}, line {lineno}: not a prediction record ({e})") from e
  return done


def choose_option(model: M3Model, samples: Sequence[Sample], scale: int, grid=None) -> list[str]:
  """Likelihood scoring: the option letter with the highest log p(letter | prompt, image) at `scale`.
  Each image is encoded once; its visual tokens serve every option of its sample."""
  images = [sample_image(s) for s in samples]
  with_image = [i for i, im in enumerate(images) if im is not None]
  visual = [None] * len(samples)
  if with_image:
    for i, v in zip(with_image, model.visual([images[i] for i in with_image], [scale] * len(with_image), grid)):
      visual[i] = v
  prompts, conts, vis, owners = [], [], [], []
  for i, s in enumerate(samples):
    ids = model.prompt_ids(s.prompt, images[i] is not None)
    for letter in string.ascii_uppercase[:len(s.options)]:
      prompts.append(ids)
      conts.append(np.asarray(model.tokenizer(letter, add_special_tokens=False)["input_ids"], np.int32))
      vis.append(visual[i])
      owners.append((i, letter))
  total, _ = model.engine.loglikelihood(prompts, conts, vis)
  best: dict[int, tuple[float, str]] = {}
  for (i, letter), logp in zip(owners, total):
    if i not in best or logp > best[i][0]:
      best[i] = (float(logp), letter)
  return [best[i][1] for i in range(len(samples))]


def evaluate(model: M3Model, task: Task, samples: Sequence[Sample], scales: Sequence[int], out: str | pathlib.Path,
             *, batch_size: int = 16, max_new_tokens: int = 16, likelihood: bool = False, progress: bool = True,
             grid: tuple[int, int] | None = None, extra_summary: dict | None = None) -> dict:
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  pred_file = out / "predictions.jsonl"
  done = read_predictions(pred_file)
  if pred_file.exists():  # drop a last line cut by a crash before appending after it
    text = pred_file.read_text()
    if text and not text.endswith("\n"):
      pred_file.write_text(text[:text.rfind("\n") + 1])
  timing = {}
  with open(pred_file, "a") as f:
    for scale in scales:
      model.config.check_scale(scale)
      todo = [s for s in samples if (s.question_id, scale) not in done]
      bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=f"scale {scale}", disable=not progress,
                 unit="sample")
      start = time.perf_counter()
      for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        if likelihood and all(s.options for s in chunk):
          preds = choose_option(model, chunk, scale, grid)
        else:
          out_ = model.generate([sample_image(s) for s in chunk], [s.prompt for s in chunk], scale=scale,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, grid=grid)
          preds = [o["text"] for o in out_]
        for s, p in zip(chunk, preds):
          rec = {"question_id": s.question_id, "scale": scale, "prediction": p, "score": task.score(s, p),
                 "category": s.category}
          done[(s.question_id, scale)] = rec
          f.write(json.dumps(rec) + "\n")
        f.flush()
        bar.update(len(chunk))
      bar.close()
      if todo:
        timing[scale] = len(todo) / (time.perf_counter() - start)
  summary = {"task": task.name, "num_samples": len(samples), "scales": {}, **(extra_summary or {})}
  for scale in scales:
    preds = {qid: rec["prediction"] for (qid, s), rec in done.items() if s == scale}
    metrics = task.summarize([s for s in samples if s.question_id in preds], preds)
    if scale in timing:
      metrics["samples_per_second"] = timing[scale]
    summary["scales"][str(scale)] = metrics
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  names = sorted({k for m in summary["scales"].values() for k in m})
  with open(out / "summary.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["scale", *names])
    for scale, m in summary["scales"].items():
      w.writerow([scale, *(m.get(k, "") for k in names)])
  return summary
