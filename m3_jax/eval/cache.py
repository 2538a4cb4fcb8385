"""The eval cache key: what determines an answer of `m3 eval`, kept as `run.json` in its --out folder so that the
folder's predictions are reused only for the run that made them.

    run.json  {"format": FORMAT, "key": {field: value}, "ckpt": path, "step": N | null, "data": path,
               "image_folder": path | null, "allow_outside_images": bool}

Key fields (compared on every resume):
  ckpt_identity     `m3_jax.checkpoint.reader.identity`: the model config and every param array's checksum (for a
                    training workdir, the evaluated step's)
  task              the task name; task_options: its options ({"prompt": "llava", "image_folder": ...})
  data_fingerprint  sha256 (16 hex digits) of every sample the task reads from --data: id, prompt, reference
                    answers, options, category, media path relative to the data (embedded images by content)
  template, pool, grid                                   the resolved chat template, pooling method, NeXT crop grid
  max_new_tokens, temperature, top_p, seed, likelihood   generation settings
`ckpt`, `step`, `data`, `image_folder` and `allow_outside_images` are recorded but not compared: a checkpoint or
data set that moved is the same. `data` and `image_folder` are absolute (an object store's URL as given), so that
`m3 router fit`, which reads its calibration runs' samples from here (`key.ckpt_identity` too), finds them from any
directory, with the permission the run had to read images outside the data's folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Iterator

from etils import epath

from m3_jax.errors import Incompatible
from m3_jax.eval import predictions
from m3_jax.eval.tasks import Sample

FORMAT = "m3-eval-run/1"
KEY_FIELDS = ("ckpt_identity", "task", "task_options", "data_fingerprint", "template", "pool", "grid",
              "max_new_tokens", "temperature", "top_p", "seed", "likelihood")


class CacheMismatch(Incompatible):
  """An --out folder holds predictions of another run; the message names every differing key field."""


class Fingerprint:
  """The data fingerprint, accumulated while a task's samples stream past (so a --limit run reads, but does not
  keep, the rest): `for s in fp.feed(task.samples(data)): ...`, then `fp.hexdigest()`."""

  def __init__(self, data: str | os.PathLike):
    data = os.path.abspath(data)
    self._root = data if os.path.isdir(data) else os.path.dirname(data)
    self._hash = hashlib.sha256()

  def _media(self, path: str | None) -> str | None:
    return None if path is None else os.path.relpath(os.path.abspath(path), self._root)

  def feed(self, samples: Iterable[Sample]) -> Iterator[Sample]:
    for s in samples:
      row = [s.question_id, s.prompt, s.answers, s.options, s.category, self._media(s.image), self._media(s.video),
             None if s.image_bytes is None else hashlib.sha256(s.image_bytes).hexdigest()]
      self._hash.update(json.dumps(row, default=str).encode() + b"\n")
      yield s

  def hexdigest(self) -> str:
    return self._hash.hexdigest()[:16]


def absolute(path: str | os.PathLike | None) -> str | None:
  """A local path made absolute; an object store's URL (gs://...) as given."""
  return None if path is None else str(path) if "://" in str(path) else os.path.abspath(path)


def run_record(*, ckpt: str, step: int | None, data: str, image_folder: str | None = None,
               allow_outside_images: bool = False, **key: Any) -> dict:
  """run.json's content; `key` must hold exactly KEY_FIELDS."""
  if set(key) != set(KEY_FIELDS):
    raise TypeError(f"run key fields {sorted(key)}, expected {sorted(KEY_FIELDS)}")
  return {"format": FORMAT, "key": {k: key[k] for k in KEY_FIELDS}, "ckpt": str(ckpt), "step": step,
          "data": absolute(data), "image_folder": absolute(image_folder),
          "allow_outside_images": bool(allow_outside_images)}


def read(folder: str | os.PathLike) -> dict | None:
  """The folder's run.json, or None when there is none; one that is not a run record (cut, hand-edited) is a
  CacheMismatch naming it."""
  file = epath.Path(folder) / predictions.RUN
  if not file.exists():
    return None
  try:
    run = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    run = f"not valid JSON ({e.msg}, line {e.lineno})"
  if not isinstance(run, dict) or not isinstance(run.get("key"), dict):
    found = run if isinstance(run, str) else f"got {json.dumps(run)[:200]}"
    raise CacheMismatch(f"{file}: expected an eval run record {{\"format\", \"key\": {{...}}, ...}} (the cache key of "
                        f"the predictions beside it), {found}; pass --overwrite to start afresh")
  return run


def _write(file: epath.Path, run: dict) -> None:
  """run.json written whole or not at all: a local file through a temporary one and a rename (an object store's
  write is already whole)."""
  text = json.dumps(run, indent=2) + "\n"
  if "://" in str(file):
    file.write_text(text)
    return
  tmp = file.with_name(file.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, file)


def _differences(old: dict, new: dict) -> list[str]:
  """'field: folder X, this run Y' for every key field that differs (JSON round-trip, so tuples equal lists)."""
  a, b = json.loads(json.dumps(old.get("key", {}))), json.loads(json.dumps(new["key"]))
  return [f"{k}: folder {a.get(k)!r}, this run {b.get(k)!r}" for k in KEY_FIELDS if a.get(k) != b.get(k)]


def open_run(folder: str | os.PathLike, run: dict | None, overwrite: bool = False) -> None:
  """Prepares `folder` for `run` (run_record): with `overwrite` its eval files are deleted first; predictions made
  under another key, or under no recorded key, raise CacheMismatch naming the differences; then run.json is
  written. Predictions under the same key stay and are resumed. `run` None (an answerer without a checkpoint, e.g.
  a test's fake) checks nothing."""
  folder = epath.Path(folder)  # gs://... too
  folder.mkdir(parents=True, exist_ok=True)
  if overwrite:
    for name in (predictions.PREDICTIONS, predictions.SUMMARY, predictions.SUMMARY_CSV, predictions.RUN):
      (folder / name).unlink(missing_ok=True)
  if run is None:
    return
  if (folder / predictions.PREDICTIONS).exists():
    old = read(folder)
    if old is None:
      raise CacheMismatch(f"{folder} holds {predictions.PREDICTIONS} without {predictions.RUN}: they cannot be "
                          "checked against this run (checkpoint, task, data, settings); choose a new --out or "
                          "pass --overwrite to start afresh")
    diffs = _differences(old, run)
    if diffs:
      raise CacheMismatch(f"{folder} holds predictions of another run; reusing them would score answers of that "
                          "run as this one's:\n  " + "\n  ".join(diffs) +
                          "\nchoose a new --out, or pass --overwrite to delete them and start afresh")
  _write(folder / predictions.RUN, run)
