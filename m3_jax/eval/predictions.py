"""The files of an eval output directory: `predictions.jsonl` (read and appended), `summary.json` and `summary.csv`
(and `run.json`, the cache key, which `m3_jax.eval.cache` reads and writes).

The only code that reads or writes them; `m3 eval` writes them, `m3 score` and `m3 analyze` read them.

predictions.jsonl: one JSON object per line, per sample and scale. `m3 eval` writes `question_id`, `scale`,
`prediction`, `score`, `category`, `prompt` (the task's question, without the chat template) and `answers` (the
task's reference answers: a list of strings, a string or an option letter); with `--scale auto` a line's `scale` is
"auto" and it adds `chosen_scale` (the router's choice), `visual_tokens` (the chosen scale's plus the routing
pass's), `routing_visual_tokens`, `routing_flops`, `router` (the router's identity) and `threshold` (its decision
threshold, set by --budget); `m3 score` needs only `question_id` and `prediction` (LLaVA answer files' `text` is
read as `prediction`), so any model's answers can be scored. Ids compare as strings. A later line for the same
(question_id, scale) replaces an earlier one (a resumed eval). Every line ends with a newline, so an unterminated
last line that is not valid JSON is a write cut by a crash: readers skip it and the appender drops it.

summary.json: `{"task", "num_samples", "scales": {scale: {metric: value}}, ...}` (`m3 eval` adds `ckpt`, `pool`,
`ckpt_identity`);
summary.csv: one row per scale, one column per metric.
"""
from __future__ import annotations

import csv
import io
import json
import tempfile
from typing import IO, Iterable, Sequence

from etils import epath

from m3_jax.errors import BadFile
from m3_jax.eval.tasks.common import iter_jsonl

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
SUMMARY_CSV = "summary.csv"
RUN = "run.json"

SCORE_FIELDS = ("question_id", "prediction")           # what `m3 score` needs of a line
EVAL_FIELDS = ("question_id", "scale", "prediction")   # what an eval resume needs
AUTO = "auto"  # the scale of a line answered at the scale router's choice


class PredictionError(BadFile):
  """Predictions that cannot be read or matched to a task; the message names the file, line or ids."""


def predictions_file(path: str | epath.PathLike) -> epath.Path:
  """An eval directory or a predictions file -> the predictions file (which may not exist yet)."""
  path = epath.Path(path)
  return path / PREDICTIONS if path.is_dir() else path


def read(path: str | epath.PathLike, require: Sequence[str] = SCORE_FIELDS, *, who: str = "") -> list[dict]:
  """The records of a predictions file in file order, normalised: `question_id` a str, `prediction` a str (from
  `text` where `prediction` is absent), `scale` an int, AUTO, or None when the line has none. A record lacking a field
  of `require` (`who` names the reader in the message) or with a wrongly typed field raises PredictionError
  naming the file and line."""
  records = []
  for n, row in iter_jsonl(path, PredictionError, cut_tail=True):
    rec = dict(row)
    if "prediction" not in rec and "text" in rec:
      rec["prediction"] = rec.pop("text")
    missing = [k for k in require if k not in rec]
    if missing:
      raise PredictionError(f"{path}, line {n}: record lacks {missing}; {who or 'a reader'} needs "
                            f"{', '.join(require)} per line (got keys {sorted(row)})")
    if "prediction" in rec and not isinstance(rec["prediction"], str):
      raise PredictionError(f"{path}, line {n}: 'prediction' must be a string, got {rec['prediction']!r}")
    if "question_id" in rec:
      rec["question_id"] = str(rec["question_id"])
    scale = rec.get("scale")
    try:
      rec["scale"] = None if scale is None else scale if scale == AUTO else int(scale)
    except (TypeError, ValueError):
      raise PredictionError(f"{path}, line {n}: 'scale' must be an integer or {AUTO!r}, got {scale!r}") from None
    records.append(rec)
  return records


def latest(records: Iterable[dict]) -> dict[tuple[str, int | str | None], dict]:
  """{(question_id, scale): record}; a later record for the same key wins (a resumed eval)."""
  return {(r["question_id"], r["scale"]): r for r in records}


def by_scale(records: Iterable[dict]) -> dict[int | None, list[dict]]:
  """{scale (None for lines without one): records in file order}."""
  groups: dict[int | None, list[dict]] = {}
  for r in records:
    groups.setdefault(r["scale"], []).append(r)
  return groups


def record(question_id: str, scale: int | None, prediction: str, score: float | None, **extra) -> dict:
  """One predictions line: the contract's fields first, then `extra` (e.g. `category`)."""
  return {"question_id": question_id, "scale": scale, "prediction": prediction, "score": score, **extra}


class Appender:
  """Appends records to a predictions file, one flushed line each. First, a last line cut by a crash is dropped, and
  one that is whole but lost its newline gets it back (readers keep it, so the answer it holds stays counted), so
  that the next record starts on a line of its own. An object-store file (gs://...), which cannot be appended to,
  is written in a local copy and uploaded whole after each batch of records."""

  def __init__(self, path: str | epath.PathLike):
    self.path = epath.Path(path)
    self._remote = "://" in str(self.path)
    self._staging = tempfile.TemporaryDirectory(prefix="m3_predictions_") if self._remote else None
    self._local = epath.Path(self._staging.name) / self.path.name if self._remote else self.path
    if self.path.exists():
      text = self.path.read_text(encoding="utf-8")
      if text and not text.endswith("\n"):
        try:
          json.loads(text[text.rfind("\n") + 1:])
          text += "\n"
        except json.JSONDecodeError:
          text = text[:text.rfind("\n") + 1]
        self.path.write_text(text, encoding="utf-8")
      if self._remote:
        self._local.write_text(text, encoding="utf-8")
    self._file: IO[str] | None = None

  def __enter__(self) -> "Appender":
    self._file = io.open(self._local, "a", encoding="utf-8")
    return self

  def __exit__(self, *exc) -> None:
    self._file.close()
    if self._remote:
      self._local.copy(self.path, overwrite=True)
      self._staging.cleanup()

  def write(self, records: Iterable[dict]) -> None:
    self._file.write("".join(json.dumps(r) + "\n" for r in records))
    self._file.flush()
    if self._remote:
      self._local.copy(self.path, overwrite=True)


def write(path: str | epath.PathLike, records: Iterable[dict]) -> None:
  """A new predictions-format file holding `records` (e.g. `m3 score --per-sample`)."""
  epath.Path(path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_summary(out: str | epath.PathLike, summary: dict) -> None:
  """summary.json and summary.csv (a row per scale of `summary["scales"]`, a column per metric) into `out`."""
  out = epath.Path(out)
  (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
  names = sorted({k for m in summary["scales"].values() for k in m})
  table = io.StringIO(newline="")
  w = csv.writer(table)
  w.writerow(["scale", *names])
  for scale, m in summary["scales"].items():
    w.writerow([scale, *(m.get(k, "") for k in names)])
  (out / SUMMARY_CSV).write_text(table.getvalue())


def read_summary(folder: str | epath.PathLike) -> dict:
  """The folder's summary.json, or {} when there is none."""
  file = epath.Path(folder) / SUMMARY
  return json.loads(file.read_text()) if file.exists() else {}
