"""Shared reading helpers for the benchmark readers (and the predictions reader): JSON / JSON lines / CSV / TSV /
parquet with errors that name the file and the line or record, the LLaVA instructions, and the multiple-choice
prompt layout."""
from __future__ import annotations

import contextlib
import contextvars
import csv
import io
import json
import os
import sys
from typing import Any, Iterator, Sequence

from etils import epath

from m3_jax.errors import BadFile, BadPath, read_text
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
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise TaskDataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _lines(path) -> Iterator[tuple[int, str]]:
  """(1-based line number, text) of a UTF-8 file; a line that is not UTF-8 is a BadFile naming the file and line."""
  with epath.Path(path).open("rb") as f:  # gs://... too (an eval --out on an object store)
    for n, raw in enumerate(f, 1):
      try:
        yield n, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise BadFile(f"{path}, line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                      "expected a UTF-8 file") from None


def iter_jsonl(path, error: type[Exception] | None = None, *, cut_tail: bool = False) -> Iterator[tuple[int, dict]]:
  """(1-based line number, object) for each non-blank line of a JSON-lines file; a line that is not a JSON
  object raises `error` (default TaskDataError) naming the file and line. With `cut_tail`, an unterminated last
  line that is not valid JSON is skipped: it is a write cut by a crash (every writer ends its lines with a newline)."""
  error = error or TaskDataError
  for n, line in _lines(path):
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
  with open(path, "rb") as f:
    head = f.read(1 << 16).lstrip()
  if head.startswith(b"["):
    data = load_json(path)
    if not all(isinstance(r, dict) for r in data):
      raise TaskDataError(f"{path}: expected a list of JSON objects")
    return data
  return load_jsonl(path)


def load_delimited(path: str, delimiter: str) -> list[dict]:
  """CSV/TSV with a header row; a row with the wrong number of fields names its line."""
  csv.field_size_limit(sys.maxsize)  # MMBench's base64 image column exceeds the default limit
  with io.StringIO(read_text(path), newline="") as f:
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


_OUTSIDE_IMAGES = contextvars.ContextVar("m3_allow_outside_images", default=False)


@contextlib.contextmanager
def outside_images(allowed: bool) -> Iterator[None]:
  """While active with `allowed`, `image_path` accepts record paths that leave the image folder (`m3 eval
  --allow-outside-images`: absolute paths, `..`, symlinks out)."""
  token = _OUTSIDE_IMAGES.set(bool(allowed))
  try:
    yield
  finally:
    _OUTSIDE_IMAGES.reset(token)


def image_path(folder: str, rel: Any, where: str) -> str:
  """A record's image (or video) path `rel` under the task's image `folder`. A path that leaves the folder (absolute,
  a `..` part, a symlink resolving outside it) is a BadPath naming the record, unless `outside_images(True)`."""
  from m3_jax.data.sources import outside_problem
  if not isinstance(rel, str) or not rel:
    raise TaskDataError(f"{where}: the image path must be a non-empty string, got {rel!r}")
  problem = None if _OUTSIDE_IMAGES.get() else outside_problem(folder, rel)
  if problem:
    raise BadPath(f"{where}: {problem}; pass --allow-outside-images to read it anyway")
  return os.path.join(folder, rel)


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
