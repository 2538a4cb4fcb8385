"""The eval task interface: a `Sample` per benchmark question and a `Task` that reads a benchmark's files as its
publisher ships them, scores one prediction, and summarizes a run with the benchmark's official metrics.

Readers and metrics need no model and never import JAX.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import field
from typing import Any, Callable, Iterable, Iterator, Literal


@dataclasses.dataclass
class Sample:
  """One benchmark question, ready for the eval engine."""
  question_id: str            # ids as strings (the task file's own id, or the 0-based record position)
  prompt: str                 # question incl. the task's instruction, WITHOUT chat template; no <image>
  answers: Any                # gold: list[str] | str | option letter ...
  image: str | None = None    # path to an image file (or None)
  image_bytes: bytes | None = None   # embedded images (MMBench base64 TSV)
  video: str | None = None    # video file or frame folder -> collage (m3_jax.data.video)
  options: list[str] | None = None
  category: str | None = None  # question family / category, used by `m3 analyze`
  meta: dict = field(default_factory=dict)


class Task(abc.ABC):
  """A benchmark: `samples(path)` reads it, `score` grades one answer in [0, 1], `summarize` aggregates.

  Subclasses set `name` (the registry name) and `kind`: "generate" (free-form answer) or "choice" (an option
  letter is expected; the engine may still generate it). Constructor keyword options (e.g. `image_folder`) come
  through `get_task(name, **options)`.
  """
  name: str = ""
  kind: Literal["generate", "choice"] = "generate"

  def __init__(self, **options: Any):
    if options:
      raise TypeError(f"task {self.name!r} takes no options, got {sorted(options)}")

  @abc.abstractmethod
  def samples(self, path: str) -> Iterator[Sample]:
    """The benchmark's questions, read from `path` (a file or folder as the publisher ships it)."""

  @abc.abstractmethod
  def score(self, sample: Sample, prediction: str) -> float:
    """Per-sample score in [0, 1] (the oracle of `m3 analyze` thresholds it)."""

  metric: str = "accuracy"  # the name of the mean per-sample score in `summarize`

  def summarize(self, samples: Iterable[Sample], predictions: dict[str, str]) -> dict[str, float]:
    """Official aggregate metrics by name. Default: `metric` = the mean per-sample score in [0, 1], and
    `metric/<category>` for each category."""
    from m3_jax.eval import metrics
    samples = list(samples)
    scores = {s.question_id: self.score(s, predictions[s.question_id]) for s in samples}
    out = {self.metric: metrics.mean(scores.values()), "count": float(len(samples))}
    cats = metrics.by_category(scores, {s.question_id: s.category for s in samples})
    out.update({f"{self.metric}/{c}": v for c, v in cats.items()})
    return out


TASKS: dict[str, type[Task]] = {}


def register(name: str) -> Callable[[type[Task]], type[Task]]:
  """Class decorator: `@register("textvqa") class TextVQA(Task): ...`."""
  def wrap(cls: type[Task]) -> type[Task]:
    if name in TASKS and TASKS[name] is not cls:
      raise ValueError(f"task name {name!r} is registered twice ({TASKS[name].__qualname__} and {cls.__qualname__})")
    cls.name = name
    TASKS[name] = cls
    return cls
  return wrap
