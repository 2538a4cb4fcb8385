"""A fitted scale router on disk and in memory: a `router/` folder holding

  router.json   {"format", "features", "routing_scale", "routing_tokens", "scales" (ascending), "ckpt_identity"
                 (the checkpoint it was fitted for), "threshold" (the default), "label" (how scores became
                 targets), "calibration": {"runs", "num_samples", "fixed" {scale: accuracy}, "oracle", "default",
                 "default_target" (the accuracy the default threshold reaches: the best fixed scale's 95% CI low end),
                 "table" [{"threshold", "accuracy", "mean_tokens"}] (out-of-fold), "folds"}, "predictor" sizes,
                 "selection" {kind: its out-of-fold default row and "gain" over the frontier F(t)} (every kind
                 `m3 router fit --features auto` tried; the kept one is "features")}
  params.npz    the predictor's arrays (mean, std, w, b); read without pickle

in a checkpoint's folder (an m3 directory, or a training workdir's step folder: `reader.home`) or anywhere
(`--out`, `--router PATH`). A router is used only with the checkpoint (identity) and scales it was fitted for.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Sequence

import numpy as np

from m3_jax.errors import Incompatible
from m3_jax.eval.router import features as features_lib, policy, predictor

FORMAT = "m3-router/1"
META = "router.json"
PARAMS = "params.npz"
FOLDER = "router"


class RouterMismatch(Incompatible):
  """A router used with a checkpoint or scales it was not fitted for; the message names both."""


@dataclasses.dataclass
class Router:
  meta: dict
  params: dict[str, np.ndarray]
  path: str | None = None

  @property
  def scales(self) -> tuple[int, ...]:
    return tuple(int(s) for s in self.meta["scales"])

  @property
  def kind(self) -> str:
    return self.meta["features"]

  @property
  def routing_scale(self) -> int:
    return int(self.meta["routing_scale"])

  @property
  def routing_tokens(self) -> int:
    return int(self.meta["routing_tokens"])

  @property
  def identity(self) -> str:
    """sha256 (16 hex digits) of the metadata and the weights: what auto predictions record."""
    h = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode())
    for k in sorted(self.params):
      h.update(k.encode() + np.ascontiguousarray(self.params[k]).tobytes())
    return h.hexdigest()[:16]

  def threshold(self, budget: float | None = None) -> float:
    """The default threshold, or the calibration table's best within `budget` mean visual tokens."""
    if budget is None:
      return float(self.meta["threshold"])
    return policy.budget_threshold(self.meta["calibration"]["table"], budget)["threshold"]

  def probabilities(self, model, pixels: np.ndarray, ids: Sequence[np.ndarray]) -> np.ndarray:
    """-> float[B, S]: P(each of `scales` answers) per sample."""
    x = features_lib.features(model, self.kind, self.routing_scale, pixels, ids)
    return predictor.predict(self.params, x)

  def choose(self, model, pixels: np.ndarray, ids: Sequence[np.ndarray], caps: Sequence[int | None] | None = None,
             threshold: float | None = None) -> list[int]:
    """The chosen scale per sample (the serve hook's signature): float32[B, H, W, 3] preprocessed images, prompt
    ids with one image placeholder each, optional caps (max_visual_tokens)."""
    t = self.threshold() if threshold is None else threshold
    return [int(s) for s in policy.choose(self.probabilities(model, pixels, ids), self.scales, t, caps)]

  def check(self, ckpt_identity: str, scales: Sequence[int], ckpt_name: str) -> None:
    """RouterMismatch unless this router was fitted for checkpoint `ckpt_identity` and its scales are `scales`'."""
    where = self.path or "the router"
    if self.meta["ckpt_identity"] != ckpt_identity:
      raise RouterMismatch(f"{where} was fitted for checkpoint {self.meta['ckpt_identity']}, not {ckpt_name} "
                           f"({ckpt_identity}); fit one for it with `m3 router fit --ckpt {ckpt_name} --runs ...`")
    missing = sorted(set(self.scales) - {int(s) for s in scales}, reverse=True)
    if missing:
      raise RouterMismatch(f"{where} chooses among scales {list(self.scales)[::-1]}, but {ckpt_name} has "
                           f"{sorted(scales, reverse=True)} (no {missing})")


def save(router: Router, folder: str | pathlib.Path) -> pathlib.Path:
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  np.savez(folder / PARAMS, **router.params)
  (folder / META).write_text(json.dumps(router.meta, indent=2) + "\n")
  router.path = str(folder)
  return folder


def load(folder: str | pathlib.Path) -> Router:
  folder = pathlib.Path(folder)
  if not (folder / META).is_file() or not (folder / PARAMS).is_file():
    raise FileNotFoundError(f"{folder}: not a scale router (expected {META} and {PARAMS}, written by "
                            "`m3 router fit`)")
  meta = json.loads((folder / META).read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{folder / META}: format {meta.get('format')!r}, this m3-jax reads {FORMAT!r}")
  with np.load(folder / PARAMS, allow_pickle=False) as f:
    params = {k: f[k] for k in f.files}
  return Router(meta, params, str(folder))
