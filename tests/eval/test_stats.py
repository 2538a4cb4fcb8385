"""The bootstrap interval of a mean, on hand-worked data."""
from __future__ import annotations

import math

import numpy as np
import pytest

from m3_jax.eval.stats import bootstrap_ci


def test_a_constant_array_has_a_zero_width_interval():
  assert bootstrap_ci([0.7] * 50) == pytest.approx((0.7, 0.7))
  assert bootstrap_ci([1.0]) == (1.0, 1.0)


def test_a_binomial_mean_matches_the_normal_interval():
  # 120 right of 400: p = 0.3, standard error sqrt(0.3 * 0.7 / 400) = 0.02291; 95%: 0.3 -+ 1.96 * 0.02291.
  values = [1.0] * 120 + [0.0] * 280
  lo, hi = bootstrap_ci(values, n=2000)
  half = 1.96 * math.sqrt(0.3 * 0.7 / 400)
  assert lo == pytest.approx(0.3 - half, abs=0.006)
  assert hi == pytest.approx(0.3 + half, abs=0.006)


def test_seeded_and_order_of_chunks_free():
  values = np.random.default_rng(1).random(37)
  assert bootstrap_ci(values, seed=3) == bootstrap_ci(list(values), seed=3)
  assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
  # drawing 1000 resamples in chunks of 100 or 7 draws the same stream of indices
  assert bootstrap_ci(values, chunk=7) == pytest.approx(bootstrap_ci(values, chunk=100))


def test_empty_and_bad_level():
  assert all(math.isnan(x) for x in bootstrap_ci([]))
  with pytest.raises(ValueError, match="level 95"):
    bootstrap_ci([1.0], level=95)
