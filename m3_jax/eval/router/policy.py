"""The routing policy: per sample, the smallest scale whose predicted probability of answering clears a threshold
(the largest scale when none does), and the calibration table that picks the threshold (numpy only).

Shapes: N samples, S scales (ascending), M thresholds.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Thresholds tried on the calibration split; above 1 no probability clears it (every sample gets the largest scale).
THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(101)) + (1.01,)


def choose(probs: np.ndarray, scales: Sequence[int], threshold: float,
           caps: Sequence[int | None] | None = None) -> np.ndarray:
  """probs float[N, S] (P(scale answers) for ascending `scales`) -> int[N] chosen scales: the smallest scale with
  p >= threshold, else the largest. `caps` (one per sample, None = no cap) limits the choice to scales <= cap (the
  smallest scale when the cap is below every scale)."""
  probs, scales = np.asarray(probs), np.asarray(scales)
  out = np.empty(len(probs), np.int64)
  for i, p in enumerate(probs):
    cap = None if caps is None else caps[i]
    allowed = np.flatnonzero(scales <= cap) if cap is not None else np.arange(len(scales))
    allowed = allowed if allowed.size else np.array([0])
    clear = [j for j in allowed if p[j] >= threshold]
    out[i] = scales[clear[0] if clear else allowed[-1]]
  return out


def table(probs: np.ndarray, scores: np.ndarray, scales: Sequence[int], routing_tokens: int,
          thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
  """The calibration table: per threshold, {"threshold", "accuracy" (mean score at the chosen scales),
  "mean_tokens" (chosen scale + the routing pass's `routing_tokens`)}. scores float[N, S] per sample and scale."""
  index = {s: j for j, s in enumerate(scales)}
  rows = []
  for t in thresholds:
    chosen = choose(probs, scales, t)
    acc = float(np.mean([scores[i, index[int(s)]] for i, s in enumerate(chosen)]))
    rows.append({"threshold": float(t), "accuracy": acc, "mean_tokens": float(chosen.mean() + routing_tokens)})
  return rows


def default_threshold(rows: list[dict], target: float) -> dict:
  """The row with the fewest mean tokens whose accuracy reaches `target` (the fit passes the lower end of the best
  fixed scale's 95% bootstrap interval: accuracy that calibration cannot tell from the best fixed scale's); when
  no threshold reaches it, the most accurate row (ties: fewer tokens)."""
  good = [r for r in rows if r["accuracy"] >= target - 1e-9]
  if good:
    return min(good, key=lambda r: (r["mean_tokens"], -r["accuracy"]))
  return max(rows, key=lambda r: (r["accuracy"], -r["mean_tokens"]))


def budget_threshold(rows: list[dict], budget: float) -> dict:
  """The most accurate row whose mean tokens (routing included) are <= `budget` (ties: fewer tokens);
  ValueError naming the cheapest achievable when none is."""
  within = [r for r in rows if r["mean_tokens"] <= budget + 1e-9]
  if not within:
    cheapest = min(r["mean_tokens"] for r in rows)
    raise ValueError(f"--budget {budget:g}: no threshold keeps the mean visual tokens within it on the calibration "
                     f"split; the fewest is {cheapest:.2f} (the smallest scale plus the routing pass)")
  return max(within, key=lambda r: (r["accuracy"], -r["mean_tokens"]))
