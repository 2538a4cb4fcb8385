"""Shared reading helpers for the benchmark readers (and the predictions reader): JSON / JSON lines / CSV / TSV /
parquet with errors that name the file and the line or record, the LLaVA instructions, and the multiple-choice
prompt layout."""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any, Iterator, Sequence

from m3_jax.errors import BadFile
from m3_jax.eval.metrics import LETTERS

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


class TaskDataError(BadFile):
  """A benchmark file is missing or not in its publisher's format; the message names the file and record."""


def require_file(path: str, what: str) -> str:
  if not os.path.isfile(path):
    raise TaskDataError(f"{what}: no file at {path}")
  return path


def find_file(path: str, names: Sequence[str], what: str) -> str:
  """`path` itself when it is a file, else the first of `names` inside the directory `path`."""
  if os.path.isfile(path):
    return path
  if os.path.isdir(path):
    for name in names:
      candidate = os.path.join(path, name)
      if os.path.isfile(candidate):
        return candidate
    raise TaskDataError(f"{what}: none of {', '.join(names)} in directory {path}")
  raise TaskDataError(f"{what}: {path} does not exist")


def load_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise TaskDataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def iter_jsonl(path, error: type[Exception] | None = None, *, cut_tail: bool = False) -> Iterator[tuple[int, dict]]:
  """(1-based line number, object) for each non-blank line of a JSON-lines file; a line that is not a JSON
  object raises `error` (default TaskDataError) naming the file and line. With `cut_tail`, an unterminated last
  line that is not valid JSON is skipped: it is a write cut by a crash (every writer ends its lines with a newline)."""
  error = error or TaskDataError
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        if cut_tail and not line.endswith("\n"):
          return
        raise error(f"{path}, line {n}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise error(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
      yield n, row


def load_jsonl(path: str) -> list[dict]:
  """JSON lines (blank lines skipped); a bad line is an error naming its 1-based line number."""
  return [row for _, row in iter_jsonl(path)]


def load_json_or_jsonl(path: str) -> list[dict]:
  """A JSON list of records or JSON lines (POPE's coco_pope_*.json are JSON lines despite the suffix)."""
  with open(path, encoding="utf-8") as f:
    head = f.read(1 << 16).lstrip()
  if head.startswith("["):
    data = load_json(path)
    if not all(isinstance(r, dict) for r in data):
      raise TaskDataError(f"{path}: expected a list of JSON objects")
    return data
  return load_jsonl(path)


def load_delimited(path: str, delimiter: str) -> list[dict]:
  """CSV/TSV with a header row; a row with the wrong number of fields names its line."""
  csv.field_size_limit(sys.maxsize)  # MMBench's base64 image column exceeds the default limit
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter=delimiter)
    try:
      header = next(reader)
    except StopIteration:
      raise TaskDataError(f"{path}: empty file (expected a header row)") from None
    rows = []
    for fields in reader:
      if not fields:
        continue
      if len(fields) != len(header):
        raise TaskDataError(f"{path}, line {reader.line_num}: {len(fields)} fields, header has {len(header)} "
                            f"({', '.join(header)})")
      rows.append(dict(zip(header, fields)))
  return rows


def load_parquet(path: str) -> list[dict]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise TaskDataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
  return pq.read_table(path).to_pylist()


def field(record: dict, key: str, where: str) -> Any:
  """record[key], or an error naming the record and the keys it does have."""
  if key not in record:
    raise TaskDataError(f"{where}: missing field {key!r} (has {', '.join(map(str, record))})")
  return record[key]


def choice_prompt(question: str, options: Sequence[str], instruction: str | None = OPTION_LETTER) -> str:
  """LLaVA's multiple-choice layout: question, then "A. option" lines, then the instruction."""
  lines = [question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
  if instruction:
    lines.append(instruction)
  return "\n".join(lines)


def is_missing(value: Any) -> bool:
  """LLaVA's is_none for table cells: None, NaN, "nan", "none" and empty cells count as absent."""
  if value is None:
    return True
  if isinstance(value, float) and value != value:
    return True
  return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def iter_numbered(records: Sequence[dict], path: str) -> Iterator[tuple[int, dict, str]]:
  """(position, record, "file, record N") for error messages that name the record."""
  for i, r in enumerate(records):
    if not isinstance(r, dict):
      raise TaskDataError(f"{path}, record {i}: expected a JSON object, got {type(r).__name__}")
    yield i, r, f"{path}, record {i}"
