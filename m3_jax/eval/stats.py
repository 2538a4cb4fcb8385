"""Confidence intervals of a mean score over questions: the one bootstrap of m3-jax (`m3 analyze`'s bands, the scale
router's and the findings' intervals all come from here). Numpy only."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0, level: float = 0.95,
                 chunk: int = 100) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` (float[Q], one per question): the mean of Q questions
  drawn with replacement, `n` times with `np.random.default_rng(seed)`; -> the (1 - level) / 2 and (1 + level) / 2
  quantiles of those means. Deterministic for a given seed; a constant array gives a zero-width interval; an empty
  one gives (nan, nan). `chunk` resamples are drawn at a time (memory chunk * Q)."""
  x = np.asarray(values, np.float64).reshape(-1)
  if x.size == 0:
    return float("nan"), float("nan")
  if not 0 < level < 1:
    raise ValueError(f"level {level}: expected a probability in (0, 1), e.g. 0.95")
  rng = np.random.default_rng(seed)
  means = np.concatenate([x[rng.integers(0, x.size, (min(chunk, n - i), x.size))].mean(axis=1)
                          for i in range(0, n, chunk)])
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)
