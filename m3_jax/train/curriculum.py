"""The scale curriculum: which scales each step trains, and the learning-rate schedule that follows it.

Two settings decide it:
- `train.scale_sampling`: "all" trains every scale each step (the M3 objective, paper Eq. 3.2); "random" draws
  one scale per step (the same objective in expectation at 1/M of the decoder cost); "random_per_sample" (paper
  Table 8) gives each sample one scale, exactly B/M samples per scale (`groups`; objective.per_sample_ce).
- `train.finest_first_steps` (with "all"): the finest scale alone for the first N steps, then every scale. A lookup
  that coarse scales cannot support is learned at the finest scale first, and the M3 objective then keeps it
  where the pooled tokens still hold it (benchmarks/probe_learnability.py). N >= 1 is a step count; 0 < N < 1 is a
  fraction of `train.num_steps` (2/3 of 900 is 600). The finest phase gets its own warmup + cosine to 0 at N, then
  the full schedule resumes at step N (a warm restart): the curriculum as measured on the probe.

`phases` says which steps train which scales; the loop logs it at start (`describe`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

SAMPLINGS = ("all", "random", "random_per_sample")


def finest_first_steps(train: ml_collections.ConfigDict) -> int:
  """`train.finest_first_steps` as a step count: N >= 1 as given, 0 < N < 1 a fraction of `train.num_steps`."""
  value = float(train.get("finest_first_steps", 0) or 0)
  if value < 0 or (value >= 1 and value != int(value)):
    raise ValueError(f"train.finest_first_steps={value!r}: expected 0 (off), a step count >= 1, or a fraction of "
                     "train.num_steps below 1 (e.g. 2/3)")
  return int(round(value * int(train.num_steps))) if value < 1 else int(value)


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Which of `scales` a step trains. `finest_first` is a step count (0 with random sampling: no phases)."""
  scales: tuple[int, ...]
  sampling: str = "all"
  finest_first: int = 0
  ignored_finest_first: int = 0  # train.finest_first_steps set with a random sampling: said in `describe`

  @classmethod
  def of(cls, train: ml_collections.ConfigDict, scales) -> Curriculum:
    sampling = str(train.get("scale_sampling", "all"))
    if sampling not in SAMPLINGS:
      raise ValueError(f"train.scale_sampling={sampling!r}: expected one of {', '.join(SAMPLINGS)}")
    first = finest_first_steps(train)
    if sampling != "all":
      return cls(tuple(int(s) for s in scales), sampling, 0, first)
    return cls(tuple(int(s) for s in scales), sampling, first)

  @property
  def finest(self) -> int:
    """Index of the finest (largest) scale in `scales`."""
    return self.scales.index(max(self.scales))

  def phases(self, num_steps: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """[(first step, end step (exclusive), scales trained)], covering steps 0..num_steps. Under random sampling
    each step of the one phase trains one of the scales listed."""
    first = min(self.finest_first, num_steps)
    out = [(0, first, (max(self.scales),))] if first > 0 else []
    if first < num_steps:
      out.append((first, num_steps, self.scales))
    return out

  def describe(self, num_steps: int) -> str:
    """One line for the log, e.g. 'steps 0-599 train scale 144 only; steps 600-899 train scales 144, 36, 9, 1'."""
    parts = []
    for start, end, scales in self.phases(num_steps):
      if len(scales) == 1 and len(self.scales) > 1:
        what = f"scale {scales[0]} only (train.finest_first_steps)"
      elif self.sampling == "random":
        what = f"one scale drawn per step from {', '.join(map(str, scales))}"
      elif self.sampling == "random_per_sample":
        what = f"one scale per sample, an equal share of each batch for each of {', '.join(map(str, scales))}"
      else:
        what = f"scales {', '.join(map(str, scales))} (the loss averaged over them)"
      parts.append(f"steps {start}-{end - 1} train {what}")
    if 0 < num_steps <= self.finest_first and len(self.scales) > 1:
      parts.append(f"every scale is never trained (train.finest_first_steps={self.finest_first} >= "
                   f"train.num_steps={num_steps})")
    if self.ignored_finest_first:
      parts.append(f"no finest-first phase (train.finest_first_steps={self.ignored_finest_first} applies to "
                   f"train.scale_sampling='all' only, not {self.sampling!r})")
    return "; ".join(parts) or f"no steps to train (train.num_steps={num_steps})"

  def trained(self, step, rng) -> tuple[jax.Array | None, jax.Array | None, jax.Array]:
    """For a step (traced int32[] or None: every scale) -> (index: int32[] of the one scale drawn, or None;
    finest_only: bool[] true in the finest-first phase, or None; trained: float32[M] 1 where a scale's loss counts).
    """
    m = len(self.scales)
    if self.sampling == "random_per_sample":
      return None, None, jnp.ones((m,), jnp.float32)
    if self.sampling == "random":
      index = jax.random.randint(jax.random.PRNGKey(0) if rng is None else rng, (), 0, m)
      return index, None, jax.nn.one_hot(index, m, dtype=jnp.float32)
    trained = jnp.ones((m,), jnp.float32)
    if not self.finest_first or step is None:
      return None, None, trained
    finest_only = step < self.finest_first
    return None, finest_only, jnp.where(finest_only, jax.nn.one_hot(self.finest, m, dtype=jnp.float32), trained)


def check_groups(sampling: str, rows: int, num_scales: int, what: str = "train.batch_size / train.grad_accum"):
  """random_per_sample splits every (micro-)batch into equal groups, one per scale."""
  if sampling == "random_per_sample" and rows % num_scales:
    raise ValueError(f"train.scale_sampling='random_per_sample' splits each batch into {num_scales} equal groups "
                     f"(one per scale), but {what} = {rows} rows is not a multiple of {num_scales}")


def groups(rng, rows: int, num_scales: int) -> jax.Array:
  """int32[M, rows / M]: a uniformly random partition of a batch's rows into M equal groups; group i trains scale
  i. Each row's scale is uniform over the M scales."""
  check_groups("random_per_sample", rows, num_scales, "the batch")
  return jax.random.permutation(rng, rows).astype(jnp.int32).reshape(num_scales, rows // num_scales)


def schedule(peak: float, train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_ratio * num_steps`, then cosine to 0 at `num_steps` (LLaVA's schedule);
  with a finest-first phase of N steps, that phase's own warmup + cosine to 0 at N, then the full schedule from its
  start (a warm restart at step N)."""
  steps = max(int(train.num_steps), 1)
  full = _warmup_cosine(peak, steps, float(train.warmup_ratio))
  first = finest_first_steps(train) if train.get("scale_sampling", "all") == "all" else 0
  if not 0 < first < steps:
    return full
  return optax.join_schedules([_warmup_cosine(peak, first, float(train.warmup_ratio)), lambda s: full(s + first)],
                              boundaries=[first])


def _warmup_cosine(peak: float, steps: int, warmup_ratio: float) -> optax.Schedule:
  warmup = int(round(warmup_ratio * steps))
  if warmup >= steps:
    return optax.linear_schedule(0.0, peak, steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps=warmup, decay_steps=steps, end_value=0.0)
