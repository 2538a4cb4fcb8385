"""Benchmark tasks: `get_task(name)` -> a `Task`; `task_names()` lists what is registered.

Task modules are imported on first use (not at package import), and a module listed here that is not present yet
is skipped, so the registry never drags in heavy dependencies and tolerates work in progress.
"""
from __future__ import annotations

import importlib
from typing import Any

from m3_jax.errors import BadValue
from m3_jax.eval.tasks.base import TASKS, Sample, Task, register

__all__ = ["TASKS", "Sample", "Task", "UnknownTaskError", "register", "get_task", "task_names"]


class UnknownTaskError(BadValue, KeyError):
  """No task of that name; the message lists the known ones."""

  def __str__(self) -> str:  # KeyError would print the message in quotes
    return str(self.args[0])

# Submodules whose import registers tasks. "generic" (probe, llava_jsonl) belongs to the eval engine.
_MODULES = ["vqa", "choice", "pope", "video", "generic"]
_loaded = False


def _load_all() -> None:
  global _loaded
  if _loaded:
    return
  for mod in _MODULES:
    full = f"{__name__}.{mod}"
    try:
      importlib.import_module(full)
    except ModuleNotFoundError as e:
      if e.name != full:  # the module exists but something it imports is missing: that is a real error
        raise
  _loaded = True


def task_names() -> list[str]:
  _load_all()
  return sorted(TASKS)


def get_task(name: str, **options: Any) -> Task:
  """The task registered as `name`, constructed with `options` (e.g. `image_folder=...`)."""
  _load_all()
  if name not in TASKS:
    raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS)) or '(none)'}")
  return TASKS[name](**options)
