"""Cheap argument checks the subcommands run before any expensive work (a checkpoint's params, a dataset, a
compile): each raises an m3_jax.errors type whose message names the flag, the value and what was expected."""
from __future__ import annotations

import os

from m3_jax.errors import BadPath, BadValue


def existing(path: str | None, flag: str, kind: str = "any") -> None:
  """`path` (when given) exists; kind "file" / "dir" also checks which it is."""
  if path is None:
    return
  if not os.path.exists(path):
    raise BadPath(f"{flag} {path}: no such file or folder")
  if kind == "file" and not os.path.isfile(path):
    raise BadPath(f"{flag} {path} is a folder; expected a file")
  if kind == "dir" and not os.path.isdir(path):
    raise BadPath(f"{flag} {path} is a file; expected a folder")


def output_dir(path: str, flag: str) -> None:
  """An output folder: it may exist as a folder or not yet exist, but not be a file (nor be under one)."""
  parent = path
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent.rstrip(os.sep))
  if parent and not os.path.isdir(parent):
    raise BadPath(f"{flag} {path}: {parent} is a file; expected a folder (or a path that does not exist yet)")


def checkpoint(path: str, flag: str = "--ckpt") -> None:
  """An m3 checkpoint directory or a training workdir, told apart by their config files (no params are read)."""
  from m3_jax.checkpoint import m3dir, workdir
  existing(path, flag, "dir")
  if not (m3dir.is_m3dir(path) or workdir.is_workdir(path)):
    raise BadPath(f"{flag} {path} is neither an m3 checkpoint directory ({m3dir.CONFIG}) nor a training workdir "
                  f"({workdir.CONFIG} + {workdir.CHECKPOINTS}/)")


def at_least(value: int | float | None, flag: str, low: int | float) -> None:
  if value is not None and value < low:
    raise BadValue(f"{flag} {value}: expected a number >= {low}")


def scales(config, wanted) -> None:
  """Every fixed scale of `wanted` (ints; "auto" and None pass) is in the checkpoint's chain, read from its config
  file (`checkpoint.reader.model_config`) before its params load."""
  for s in wanted or ():
    if s not in ("auto", None) and s not in config.m3.scales:
      chain = ", ".join(str(x) for x in sorted(config.m3.scales))
      raise BadValue(f"--scale {s} is not one of this checkpoint's scales ({chain}: model.m3.scales)")
