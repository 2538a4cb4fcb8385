"""`m3 router fit`: a scale router from `m3 eval` runs of one checkpoint at every scale on a calibration split.

Labels: per sample and scale, the run's per-sample score as the target (an exact-match score is already 0 / 1, so
this is "score >= 0.5"; a soft metric's score, VQA accuracy or ANLS, is the target itself). Features: `features`
(one prefill at the smallest scale). The calibration table is made out of fold (each sample's probabilities come
from a predictor that did not see it), so the default threshold is not fitted to the predictor's own training
samples; the saved predictor is then fitted on every sample.

Features "auto" (the default) fits every kind and keeps the one whose out-of-fold routing, at its default threshold,
gains most over the calibration split's fixed-scale frontier F(t): what the router is for, judged without the test
split. Why a choice and not always "joint": features that vary but carry nothing about the scale a sample needs are
noise the predictor fits. On the probe every question shares one template and the tiny decoder's last-token state
barely moves with the image (0.04 against a spread of 0.8 across questions), so the state's 128 dimensions only add
noise: "joint" has the better out-of-fold log-loss (it predicts which samples are hard at every scale) but routes
worse than "image" (+1.8 against +3.6 points over F(t) on 2000 calibration questions); on benchmarks whose question
decides the detail needed, "joint" or "text" wins the same comparison.
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from m3_jax.errors import BadFile
from m3_jax.eval import cache, predictions
from m3_jax.eval.analysis import frontier
from m3_jax.eval.router import features as features_lib, policy, predictor
from m3_jax.eval.router.store import FORMAT, Router
from m3_jax.eval.stats import bootstrap_ci

FOLDS = 5


class CalibrationError(BadFile):
  """Calibration runs that cannot fit a router; the message names the run, the scale or the ids."""


def _ids(ids: Sequence[str], n: int = 8) -> str:
  ids = sorted(ids)
  return ", ".join(ids[:n]) + (f" ... and {len(ids) - n} more" if len(ids) > n else "")


def read_calibration(run_dir: str | pathlib.Path, scales: Sequence[int], ckpt_identity: str, ckpt_name: str
                     ) -> tuple[dict, dict[str, dict[int, float]]]:
  """(run.json, {question_id: {scale: score}}) of one eval folder, checked: made by this checkpoint, every scale
  present, the same sample ids at every scale."""
  run = cache.read(run_dir)
  if run is None:
    raise CalibrationError(f"{run_dir}: no {predictions.RUN} (the --out folder of `m3 eval`): the checkpoint and "
                           "data it evaluated are unknown")
  got = run["key"]["ckpt_identity"]
  if got != ckpt_identity:
    raise CalibrationError(f"{run_dir} evaluated checkpoint {got}, not {ckpt_name} ({ckpt_identity}); calibrate "
                           "with runs of the checkpoint the router is for")
  records = predictions.read(predictions.predictions_file(run_dir), ("question_id", "scale", "score"),
                             who="`m3 router fit`")
  per_scale: dict[int, dict[str, float]] = {}
  for (qid, scale), rec in predictions.latest(records).items():
    if isinstance(scale, int):  # auto lines are a router's, not calibration
      per_scale.setdefault(scale, {})[qid] = rec["score"]
  missing = [s for s in scales if s not in per_scale]
  if missing:
    raise CalibrationError(f"{run_dir} lacks scale(s) {missing} (it has {sorted(per_scale, reverse=True)}); "
                           f"evaluate every scale: m3 eval ... --scale {','.join(map(str, scales))}")
  ref = set(per_scale[scales[0]])
  for s in scales[1:]:
    ids = set(per_scale[s])
    if ids != ref:
      raise CalibrationError(f"{run_dir}: scales {scales[0]} and {s} have different sample ids ({len(ref - ids)} "
                             f"only at {scales[0]}: {_ids(ref - ids)}; {len(ids - ref)} only at {s}: "
                             f"{_ids(ids - ref)}); evaluate the same samples at every scale")
  null = [q for s in scales for q, v in per_scale[s].items() if v is None]
  if null:
    raise CalibrationError(f"{run_dir}: {len(null)} prediction(s) without a per-sample score ({_ids(null)}): the "
                           "task gives no per-sample score to learn from")
  return run, {q: {s: float(per_scale[s][q]) for s in scales} for q in sorted(ref)}


def calibration_samples(run_dir, run: dict, qids: set[str]) -> list:
  """The task samples of a calibration run (its task, options and data from run.json), checked against the
  run's data fingerprint, in task order, restricted to `qids`."""
  from m3_jax.eval.tasks import get_task
  from m3_jax.eval.tasks.common import outside_images
  key = run["key"]
  options = dict(key["task_options"])
  if run.get("image_folder"):  # (the absolute path; the key keeps it as typed)
    options["image_folder"] = run["image_folder"]
  task = get_task(key["task"], **options)
  fp = cache.Fingerprint(run["data"])
  with outside_images(bool(run.get("allow_outside_images"))):
    samples = [s for s in fp.feed(task.samples(run["data"])) if s.question_id in qids]
  if fp.hexdigest() != key["data_fingerprint"]:
    raise CalibrationError(f"{run_dir}: its data {run['data']} changed since it was evaluated (fingerprint "
                           f"{fp.hexdigest()}, the run's {key['data_fingerprint']}); evaluate it again")
  found = {s.question_id for s in samples}
  if found != qids:
    raise CalibrationError(f"{run_dir}: {len(qids - found)} predicted id(s) not in {run['data']}: "
                           f"{_ids(qids - found)}")
  return samples


def out_of_fold(x: np.ndarray, y: np.ndarray, folds: int = FOLDS) -> np.ndarray:
  """P(scale answers) float[N, S] for every sample from a predictor fitted without its fold."""
  order = np.random.default_rng(0).permutation(len(x))
  probs = np.zeros(y.shape, np.float64)
  for k in range(folds):
    held = order[k::folds]
    rest = np.setdiff1d(order, held)
    probs[held] = predictor.predict(predictor.fit(x[rest], y[rest]), x[held])
  return probs


def assess(x: np.ndarray, y: np.ndarray, scales: Sequence[int], routing: int, folds: int, fixed: dict[int, float],
           target: float) -> dict:
  """Out-of-fold calibration of features x float[N, F] against scores y float[N, S] (`fixed`: each scale's mean
  score; `target`: the accuracy the default threshold must reach): {"table" (per threshold), "default" (its row),
  "gain" (the default row's accuracy minus the calibration frontier F(t) at its mean tokens)}."""
  rows = policy.table(out_of_fold(x, y, folds), y, scales, routing)
  default = policy.default_threshold(rows, target)
  return {"table": rows, "default": default, "gain": default["accuracy"] - frontier(fixed, default["mean_tokens"])}


def fit(model, ckpt_identity: str, runs: Sequence[str], kind: str = "auto") -> Router:
  """A router for `model` (an M3Model of checkpoint `ckpt_identity`) from eval folders `runs`, with features `kind`
  (one of features.KINDS, or "auto": the kind whose out-of-fold routing gains most over F(t))."""
  from m3_jax.eval.evaluator import sample_image
  scales = sorted(int(s) for s in model.scales)
  name = str(getattr(model, "name", "the checkpoint"))
  samples, score_rows = [], []
  for run_dir in runs:
    run, scores = read_calibration(run_dir, scales, ckpt_identity, name)
    for s in calibration_samples(run_dir, run, set(scores)):
      samples.append(s)
      score_rows.append([scores[s.question_id][sc] for sc in scales])
  if len(samples) < 2:
    raise CalibrationError(f"{len(samples)} calibration sample(s) in {list(runs)}: at least 2 are needed")
  folds = min(FOLDS, len(samples))
  y = np.asarray(score_rows, np.float64)
  binary = bool(np.isin(y, (0.0, 1.0)).all())
  images = [sample_image(s) for s in samples]
  if any(im is None for im in images):
    raise CalibrationError("calibration samples without an image: the router chooses an image's scale")
  ids = [model.prompt_ids(s.prompt, True) for s in samples]
  kinds = features_lib.KINDS if kind == "auto" else (features_lib.check(kind),)
  pixels = model.pixels(images)
  fixed = {int(s): float(y[:, j].mean()) for j, s in enumerate(scales)}
  # "Matches the best fixed scale": an exact match of a noisy out-of-fold estimate degenerates into always the
  # largest scale, so the target is the lower end of the best fixed scale's 95% bootstrap interval.
  target = bootstrap_ci(y[:, int(np.argmax([fixed[s] for s in scales]))])[0]
  xs = {k: features_lib.features(model, k, scales[0], pixels, ids) for k in kinds}
  assessed = {k: assess(xs[k], y, scales, features_lib.routing_tokens(k, scales[0]), folds, fixed, target)
              for k in kinds}
  kind = max(kinds, key=lambda k: assessed[k]["gain"])  # ties: the first of KINDS
  x, chosen = xs[kind], assessed[kind]
  best = y.max(axis=1)
  meta = {
      "format": FORMAT, "features": kind, "routing_scale": scales[0],
      "routing_tokens": features_lib.routing_tokens(kind, scales[0]),
      "scales": scales, "ckpt_identity": ckpt_identity, "threshold": chosen["default"]["threshold"],
      "label": "score >= 0.5 (exact match)" if binary else "score (soft metric)",
      "predictor": {"model": "logistic", "l2": predictor.L2, "steps": predictor.STEPS, "features": int(x.shape[1])},
      # every kind tried, out of fold: the default row and its gain over the calibration frontier F(t)
      "selection": {k: {"gain": a["gain"], **a["default"]} for k, a in assessed.items()},
      "calibration": {"runs": [str(r) for r in runs], "num_samples": len(samples), "folds": folds,
                      "fixed": {str(s): a for s, a in fixed.items()},
                      "default_target": target,
                      "oracle": {"score": float(best.mean()),
                                 "mean_tokens": float(np.mean([scales[int(np.argmax(r >= r.max()))] for r in y]))},
                      "default": chosen["default"], "table": chosen["table"]},
  }
  return Router(meta, predictor.fit(x, y))
