"""Evaluating answer functions on a task at several scales -> predictions.jsonl, summary.json, summary.csv.

The model enters as functions of (samples, scale), so any answerer (a loaded checkpoint via `model_functions`,
a server, a fake in a test) is evaluated the same way:

    generate(samples, scale) -> one answer text per sample
    choose(samples, scale)   -> one option letter per sample (likelihood mode for multiple choice; optional)

Resumable: predictions already in `predictions.jsonl` (by question_id and scale) are not recomputed when the
folder's `run.json` holds this run's cache key (`m3_jax.eval.cache`: checkpoint identity, task, data, template,
pooling, grid, generation settings); the summary is always rebuilt from the whole file (a later line for the same
(question_id, scale) wins). The file formats are `m3_jax.eval.predictions`.
"""
from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Callable, Sequence

from etils import epath
from tqdm import tqdm

from m3_jax.eval import cache, predictions
from m3_jax.eval.generate import MAX_NEW_TOKENS
from m3_jax.eval.tasks import Sample, Task

if TYPE_CHECKING:
  from m3_jax.eval.loader import M3Model

AnswerFn = Callable[[Sequence[Sample], int], list[str]]
# The scale router (`--scale auto`): per sample {"chosen_scale", "visual_tokens" (chosen + routing pass),
# "routing_visual_tokens", "routing_flops"}; `router_id` says which router made them (m3_jax.eval.router.route).
RouteFn = Callable[[Sequence[Sample]], list[dict]]


def sample_image(sample: Sample):
  """The image a sample shows the model: a file, embedded bytes, or a video's frame collage (None: text only)."""
  if sample.video is not None:
    from m3_jax.data.video import load_video
    return load_video(sample.video, sample.meta.get("collage", "igvlm"))
  if sample.image_bytes is not None:
    return sample.image_bytes
  return sample.image


def model_functions(model: M3Model, *, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16,
                    grid: tuple[int, int] | None = None, likelihood: bool = False,
                    scales: Sequence[int] | None = None) -> tuple[AnswerFn, AnswerFn | None]:
  """(generate, choose) answering with a loaded checkpoint; choose is None unless `likelihood`. `grid` overrides
  LLaVA-NeXT's anyres crop grid.

  The image of a sample is encoded once for all of `scales` (default: the checkpoint's): the first call that needs
  a sample's tokens pools every one of those scales from one encoder pass and keeps them while the following calls
  ask for the same samples (`evaluate` answers a chunk of samples at every scale before the next chunk)."""
  scales = [int(s) for s in (model.scales if scales is None else scales)]
  kept: dict[str, dict[int, object]] = {}   # question_id -> {scale: float[n, D]} of the current chunk

  def visual(samples: Sequence[Sample], scale: int):
    """Each sample's tokens at `scale` (None: text only), or None when `scale` is not one encoded together."""
    if scale not in scales:
      return None
    missing = [s for s in samples if s.question_id not in kept]
    fresh = dict(zip([s.question_id for s in missing],
                     _encode(model, [sample_image(s) for s in missing], scales, grid, batch_size)))
    if len(kept) + len(fresh) > batch_size:  # a new chunk: only this call's samples stay (memory: one chunk)
      wanted = {s.question_id for s in samples}
      for qid in [q for q in kept if q not in wanted]:
        del kept[qid]
    kept.update(fresh)
    return [kept[s.question_id].get(scale) for s in samples]

  def generate(samples: Sequence[Sample], scale: int) -> list[str]:
    out = model.generate([sample_image(s) for s in samples], [s.prompt for s in samples], scale=scale,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, grid=grid,
                         visual=visual(samples, scale))
    return [o["text"] for o in out]

  def choose(samples: Sequence[Sample], scale: int) -> list[str]:
    return model.choose([sample_image(s) for s in samples], [s.prompt for s in samples],
                        [len(s.options) for s in samples], scale, grid, visual=visual(samples, scale))

  return generate, (choose if likelihood else None)


def _encode(model: M3Model, images: list, scales: Sequence[int], grid, batch_size: int) -> list[dict[int, object]]:
  """Per image {scale: tokens} from one encoder pass ({} for a text-only sample)."""
  rows = [i for i, im in enumerate(images) if im is not None]
  out: list[dict[int, object]] = [{} for _ in images]
  if rows:
    for i, tokens in zip(rows, model.visual_scales([images[i] for i in rows], scales, grid, batch_size)):
      out[i] = tokens
  return out


def evaluate(generate: AnswerFn, task: Task, samples: Sequence[Sample], scales: Sequence[int],
             out: str | epath.PathLike, *, choose: AnswerFn | None = None, batch_size: int = 16, progress: bool = True,
             extra_summary: dict | None = None, run: dict | None = None, overwrite: bool = False,
             route: RouteFn | None = None, router_id: str | None = None,
             router_threshold: float | None = None) -> dict:
  """Answers every sample at every scale (a batch of `batch_size` samples per call; with `choose`, each sample with
  options is answered by it, the others by `generate`, whatever else its batch holds), appends each answer to
  `out`/predictions.jsonl with its per-sample score, category, prompt and reference answers, and writes the summary:
  `{"task", "num_samples", "scales": {scale: task metrics (+ samples_per_second when this call answered some)},
  **extra_summary}`, which it returns.

  `run` (`cache.run_record`) is the cache key: predictions in `out` made under another key are refused
  (cache.CacheMismatch) unless `overwrite` deletes them first; without `run` the folder's predictions are trusted.

  The scale `predictions.AUTO` answers each sample at `route`'s choice (so its answer is the one a fixed run at that
  scale gives); its lines record the router (`router_id`) and its threshold (`router_threshold`, set by --budget),
  and only lines of this router at this threshold are resumed. Its summary adds, over this call's samples, mean
  visual tokens (routing included), the routing pass's FLOPs and seconds per sample, and the chosen scales'
  histogram."""
  out = epath.Path(out)  # gs://... too
  out.mkdir(parents=True, exist_ok=True)
  cache.open_run(out, run, overwrite)
  pred_file = out / predictions.PREDICTIONS
  done = predictions.latest(predictions.read(pred_file, predictions.EVAL_FIELDS, who="an eval resume")
                            if pred_file.exists() else [])
  routing_seconds, routed = 0.0, 0
  if predictions.AUTO in scales and route is None:
    raise ValueError('scale "auto" needs a scale router (route=...)')
  def stale(rec: dict) -> bool:  # an auto line of another router, or of this one at another --budget
    return rec.get("router") != router_id or rec.get("threshold") != router_threshold

  todo = {scale: [s for s in samples if (s.question_id, scale) not in done or
                  (scale == predictions.AUTO and stale(done[s.question_id, scale]))]
          for scale in scales}
  pending = {scale: {s.question_id for s in todo[scale]} for scale in scales}
  seconds = dict.fromkeys(scales, 0.0)
  bar = tqdm(total=len(samples) * len(scales), initial=sum(len(samples) - len(t) for t in todo.values()),
             desc=f"scales {','.join(map(str, scales))}", disable=not progress, unit="answer")
  # A chunk of samples is answered at every scale before the next chunk, so each image is encoded once for all
  # scales (model_functions keeps one chunk's tokens); a chunk is the samples that still need some scale.
  needed = [s for s in samples if any(s.question_id in pending[scale] for scale in scales)]
  answer = lambda chunk, scale: _answer(generate, choose, chunk, scale)  # noqa: E731
  with predictions.Appender(pred_file) as appender:
    for i in range(0, len(needed), batch_size):
      for scale in scales:
        chunk = [s for s in needed[i:i + batch_size] if s.question_id in pending[scale]]
        if not chunk:
          continue
        start = time.perf_counter()
        if scale == predictions.AUTO:
          clock = time.perf_counter()
          routing = route(chunk)
          routing_seconds += time.perf_counter() - clock
          routed += len(chunk)
          texts = _answer_routed(answer, chunk, [r["chosen_scale"] for r in routing])
          recs = [predictions.record(s.question_id, scale, p, task.score(s, p), category=s.category,
                                     prompt=s.prompt, answers=s.answers, **r, router=router_id,
                                     threshold=router_threshold)
                  for s, p, r in zip(chunk, texts, routing)]
        else:
          recs = [predictions.record(s.question_id, scale, p, task.score(s, p), category=s.category,
                                     prompt=s.prompt, answers=s.answers)
                  for s, p in zip(chunk, answer(chunk, scale))]
        seconds[scale] += time.perf_counter() - start
        done.update(predictions.latest(recs))
        appender.write(recs)
        bar.update(len(chunk))
  bar.close()
  # A scale's rate counts the calls that answered it; the chunk's one encoder pass falls in its first scale's call.
  timing = {scale: len(todo[scale]) / seconds[scale] for scale in scales if todo[scale]}
  summary = {"task": task.name, "num_samples": len(samples), "scales": {}, **(extra_summary or {})}
  ids = {s.question_id for s in samples}
  for scale in scales:
    preds = {qid: rec["prediction"] for (qid, s), rec in done.items() if s == scale}
    metrics = task.summarize([s for s in samples if s.question_id in preds], preds)
    if scale in timing:
      metrics["samples_per_second"] = timing[scale]
    if scale == predictions.AUTO:
      metrics.update(_auto_summary([rec for (qid, s), rec in done.items() if s == scale and qid in ids],
                                   router_id))
      if routed:
        metrics["routing_seconds_per_sample"] = routing_seconds / routed
    summary["scales"][str(scale)] = metrics
  predictions.write_summary(out, summary)
  return summary


def _answer(generate: AnswerFn, choose: AnswerFn | None, chunk: Sequence[Sample], scale) -> list[str]:
  """Each sample's answer, in chunk order: by `choose` when given and the sample has options, else by `generate`
  (so a sample's answer never depends on the samples batched with it)."""
  if choose is None:
    return generate(chunk, scale)
  texts: list[str] = [""] * len(chunk)
  for fn, rows in ((choose, [j for j, s in enumerate(chunk) if s.options]),
                   (generate, [j for j, s in enumerate(chunk) if not s.options])):
    if rows:
      for j, text in zip(rows, fn([chunk[j] for j in rows], scale)):
        texts[j] = text
  return texts


def _answer_routed(answer: AnswerFn, chunk: Sequence[Sample], chosen: Sequence[int]) -> list[str]:
  """Answers each sample at its own chosen scale (one call per scale present), in chunk order."""
  texts: list[str] = [""] * len(chunk)
  for scale in sorted(set(chosen)):
    rows = [j for j, c in enumerate(chosen) if c == scale]
    for j, text in zip(rows, answer([chunk[j] for j in rows], scale)):
      texts[j] = text
  return texts


def _auto_summary(records: list[dict], router_id: str | None) -> dict:
  """An auto run's cost: mean visual tokens (routing included), mean routing FLOPs, the chosen scales."""
  if not records:
    return {}
  chosen = collections.Counter(int(r["chosen_scale"]) for r in records)
  return {"mean_visual_tokens": sum(r["visual_tokens"] for r in records) / len(records),
          "routing_visual_tokens": sum(r["routing_visual_tokens"] for r in records) / len(records),
          "routing_flops": sum(r["routing_flops"] for r in records) / len(records),
          "chosen_scales": {str(k): chosen[k] for k in sorted(chosen, reverse=True)}, "router": router_id}
