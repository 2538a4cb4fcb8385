"""Random-access record sources: LLaVA JSON + image folder, TFDS array_record (no TensorFlow), the probe.

Every source is a sequence (`len`, `[i]`) of plain records, the grain `RandomAccessDataSource` protocol:
  {"id": str, "conversations": [{"from": "human"|"gpt", "value": str}, ...],
   "image": path str | bytes | uint8[H, W, 3] | None, ...extra keys (e.g. "family")}
Records are checked where they are used (`check_record`, the pipeline's preprocessing), so a bad record names its
id and problem instead of failing somewhere downstream.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from m3_jax.data import conversation as cv
from m3_jax.data.errors import BadRecord
from m3_jax.errors import BadFile, BadPath, read_text


class LlavaJson:
  """`llava_v1_5_mix665k.json`-style list of {id, image?, conversations} with images under `image_folder`."""

  def __init__(self, path: str | os.PathLike, image_folder: str | os.PathLike = "", *, follow_symlinks: bool = False):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise BadPath(f"LLaVA JSON {self.path} " + ("is a folder; expected the JSON file" if self.path.is_dir()
                                                   else "does not exist"))
    try:
      data = json.loads(read_text(self.path))
    except json.JSONDecodeError as e:
      raise BadFile(f"{self.path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
      raise BadFile(f"{self.path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
      raise BadFile(f"{self.path}: no records (an empty list); expected a JSON list of {{id, image?, conversations}}")
    self.records = data
    self.image_folder = pathlib.Path(image_folder) if image_folder else self.path.parent
    if not self.image_folder.is_dir():
      raise BadPath(f"image folder {self.image_folder} is not a folder")
    self.follow_symlinks = follow_symlinks

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict:
    rec = self.records[i]
    if not isinstance(rec, dict):
      return {"id": f"#{i}", "_problem": f"record is a {type(rec).__name__}, expected an object"}
    out = {"id": str(rec.get("id", f"#{i}")), "conversations": rec.get("conversations"), "image": None}
    if rec.get("image") is not None:
      try:
        out["image"] = str(resolve_image(self.image_folder, rec["image"], out["id"], self.follow_symlinks))
      except BadRecord as e:
        out["_problem"] = e.problem
    return out


def resolve_image(folder: pathlib.Path, rel: Any, record_id: str, follow_symlinks: bool = False) -> pathlib.Path:
  """`folder / rel`, refusing paths that leave the folder: an absolute path or a `..` part always, a symlink that
  resolves outside it unless `follow_symlinks` (`data.follow_symlinks`: the user's own links, such as
  `data/coco -> /mnt/coco`)."""
  problem = outside_problem(folder, rel, follow_symlinks, "set data.follow_symlinks=True to allow links you made")
  if problem:
    raise BadRecord(record_id, problem)
  return folder / rel if follow_symlinks else (folder / rel).resolve()


def outside_problem(folder: pathlib.Path | str, rel: Any, follow_symlinks: bool = False,
                    symlink_hint: str = "") -> str | None:
  """Why the record path `rel` leaves `folder` (None when it stays inside): not a relative path string, an absolute
  path, a `..` part, or (unless `follow_symlinks`) a symlink resolving outside the folder (`symlink_hint` then says
  how to allow it)."""
  if not isinstance(rel, str) or not rel:
    return f"'image' must be a relative path string, got {rel!r}"
  parts = pathlib.PurePath(rel).parts
  if pathlib.PurePath(rel).is_absolute() or ".." in parts:
    return f"image path {rel!r} escapes the image folder {folder} (an absolute path or a '..' part)"
  if not follow_symlinks:
    root = pathlib.Path(folder).resolve()
    if not (root / rel).resolve().is_relative_to(root):
      return (f"image path {rel!r} escapes the image folder {folder} through a symlink (to "
              f"{(root / rel).resolve()})" + (f"; {symlink_hint}" if symlink_hint else ""))
  return None


class Tfds:
  """A TFDS dataset read through `tfds.data_source` (array_record; no TensorFlow needed).

  Records need `image` (uint8 array or encoded bytes, optional) and either `conversations` (JSON text of the
  LLaVA list) or `question` + `answer` text; `id` is used when present.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds
    self.name, self.split = name, split
    self.source = tfds.data_source(name, split=split, data_dir=data_dir)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    return from_tfds_record(self.source[i], f"{self.name}/{self.split}#{i}")


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def from_tfds_record(rec: dict, default_id: str) -> dict:
  rid = _text(rec["id"]) if "id" in rec else default_id
  out = {"id": rid, "image": None}
  if "image" in rec:
    img = rec["image"]
    out["image"] = bytes(img) if isinstance(img, (bytes, np.bytes_)) else np.asarray(img)
  if "conversations" in rec:
    try:
      out["conversations"] = json.loads(_text(rec["conversations"]))
    except json.JSONDecodeError as e:
      out["_problem"] = f"'conversations' is not JSON ({e})"
  elif "question" in rec and "answer" in rec:
    q = _text(rec["question"])
    reply = _text(rec["reply"]) if "reply" in rec else _text(rec["answer"])  # the probe trains on `reply`
    out["conversations"] = [{"from": "human", "value": (cv.IMAGE + "\n" + q) if out["image"] is not None else q},
                            {"from": "gpt", "value": reply}]
    out["answer"] = _text(rec["answer"])
  else:
    out["_problem"] = "record has neither 'conversations' nor 'question' + 'answer'"
  for k in ("family", "scale"):
    if k in rec:
      out[k] = _text(rec[k]) if k == "family" else int(rec[k])
  return out


class Probe:
  """The granularity probe's split, built into `data_dir` with TFDS on first use (see m3_jax/data/probe.py)."""

  def __init__(self, data_dir: str | os.PathLike, split: str = "train", *, seed: int = 0,
               sizes: dict | None = None, family_set: str = "binding", aspects: str = "1:1"):
    from m3_jax.data import probe
    self.split = split
    # Only the data source is kept: it pickles, so grain workers can read it.
    self.source = probe.build(str(data_dir), seed=seed, sizes=sizes, family_set=family_set,
                              aspects=aspects).as_data_source(split)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    return from_tfds_record(self.source[i], f"probe/{self.split}#{i}")


def check_record(rec: dict, *, check_image: bool = True, max_pixels: int | None = None) -> list[str]:
  """Every problem with a source record (empty when usable): turns, <image> count, the image file."""
  problems = [rec["_problem"]] if rec.get("_problem") else []
  has_image = rec.get("image") is not None or any(
      p.startswith("image path") or p.startswith("'image'") for p in problems)
  problems += cv.check_conversations(rec.get("conversations"), has_image)
  img = rec.get("image")
  if check_image and isinstance(img, str):
    from m3_jax.data import image as image_lib
    if not os.path.isfile(img):
      problems.append(f"missing image: {img} does not exist")
    else:
      try:
        image_lib.load_image(img, **({} if max_pixels is None else {"max_pixels": max_pixels}))
      except image_lib.ImageError as e:
        problems.append(f"unreadable image: {e}")
  return problems
