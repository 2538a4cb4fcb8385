"""Lazy, tensor-by-tensor access to a checkpoint directory's weights (safetensors, or pickle when allowed).

Nothing is materialised up front: `safe_open` memory-maps each file and `get` reads one tensor. Sharded
checkpoints are found through `*.index.json`; a directory without an index but with several `*.safetensors`
files is read as their union.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from m3_jax.errors import BadFile


class ReaderError(BadFile):
  """A weights file that cannot be read; the message names the file and what to do."""


ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def weight_files(directory: pathlib.Path, allow_pickle: bool
                 ) -> tuple[str, list[pathlib.Path], dict[str, str] | None]:
  """("safetensors" | "pickle", files, the index's weight_map or None without an index). Pickle files are refused
  unless allow_pickle (they can run code)."""
  d = pathlib.Path(directory)
  if not d.is_dir():
    raise ReaderError(f"{d} is not a directory (expected a checkpoint directory with config.json and weights)")
  for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "pickle")):
    index = d / index_name
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise ReaderError(f"{index}: not a valid shard index ({e}); expected JSON with a 'weight_map'") from None
      outside = sorted({f for f in weight_map.values() if not isinstance(f, str) or pathlib.PurePath(f).is_absolute()
                        or ".." in pathlib.PurePath(f).parts})
      if outside:
        raise ReaderError(f"{index} names shard files outside {d}: {outside[:5]}; expected file names inside "
                          "the checkpoint directory")
      files = sorted({d / f for f in weight_map.values()})
      missing = [f.name for f in files if not f.exists()]
      if missing:
        raise ReaderError(f"{index} names shard files that are not in {d}: {missing}")
      break
  else:
    weight_map = None
    files = sorted(d.glob("*.safetensors"))
    kind = "safetensors"
    if not files:
      files, kind = sorted(d.glob("*.bin")) + sorted(d.glob("*.pt")) + sorted(d.glob("*.pth")), "pickle"
    if not files:
      raise ReaderError(f"no weights in {d}: expected model.safetensors, model-0000x-of-0000y.safetensors with "
                        "model.safetensors.index.json, or (with --allow-pickle) pytorch_model.bin")
  if kind == "pickle" and not allow_pickle:
    raise ReaderError(f"{d} holds PyTorch pickle weights ({', '.join(f.name for f in files)}); pickle files can run "
                      "arbitrary code when loaded, so they are refused. Re-save them as safetensors, or pass "
                      "--allow-pickle to load them with torch.load(weights_only=True)")
  return kind, files, weight_map


class TensorSource:
  """name -> tensor for one checkpoint directory. `keys()`, `shape(k)`, `dtype(k)`, `get(k)` (numpy)."""

  def __init__(self, directory, allow_pickle: bool = False):
    self.directory = pathlib.Path(directory)
    self.kind, self.files, weight_map = weight_files(self.directory, allow_pickle)
    self._where: dict[str, int] = {}
    self._handles = []
    self._flax_handles: dict[int, object] = {}
    if self.kind == "safetensors":
      from safetensors import safe_open
      for i, f in enumerate(self.files):
        try:
          h = safe_open(str(f), framework="np")
        except Exception as e:  # SafetensorError: truncated or corrupt header/data
          raise ReaderError(f"{f}: not a complete safetensors file ({e}; the file is {f.stat().st_size} bytes). "
                            "It is probably truncated (an interrupted download or copy): fetch or save it again") from None
        self._handles.append(h)
        for k in h.keys():
          if k in self._where and weight_map is not None:   # the index says which shard's copy is the tensor
            if weight_map.get(k) != f.name:
              continue
          elif k in self._where:   # (a stale single file beside shards, without an index: which copy is meant?)
            raise ReaderError(f"{self.directory}: tensor {k!r} is in both {self.files[self._where[k]].name} and "
                              f"{f.name}; remove the file that does not belong to the checkpoint, or add its "
                              "*.safetensors.index.json")
          self._where[k] = i
    else:
      self._load_pickles()

  def _load_pickles(self):
    try:
      import torch
    except ImportError:
      raise ReaderError(f"{self.directory}: reading pickle weights (--allow-pickle) needs PyTorch, which is not "
                        "installed; `pip install torch==2.13.0` (CPU) or convert the weights to safetensors") from None
    for i, f in enumerate(self.files):
      try:  # mmap keeps memory at one tensor at a time, as with safetensors
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
      except Exception as e:
        raise ReaderError(f"{f}: cannot be loaded with torch.load(weights_only=True): {e}") from None
      if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
      self._handles.append(sd)
      for k in sd:
        self._where[k] = i

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key):
    return key in self._where

  def shape(self, key) -> tuple[int, ...]:
    h = self._handle(self._where[key]) if self.kind == "safetensors" else self._handles[self._where[key]]
    if self.kind == "safetensors":
      return tuple(h.get_slice(key).get_shape())
    return tuple(h[key].shape)

  def dtype(self, key) -> str:
    h = self._handle(self._where[key]) if self.kind == "safetensors" else self._handles[self._where[key]]
    if self.kind == "safetensors":
      st = h.get_slice(key).get_dtype()
      return ST_DTYPES.get(st, st)
    return str(h[key].dtype).removeprefix("torch.")

  def file(self, key) -> pathlib.Path:
    return self.files[self._where[key]]

  def release(self, path) -> None:
    """Unmaps one safetensors file (its pages leave this process's RSS); a later `get` reopens it."""
    if self.kind != "safetensors":
      return
    i = self.files.index(pathlib.Path(path))
    self._handles[i] = None
    self._flax_handles.pop(i, None)

  def _handle(self, i: int):
    if self._handles[i] is None:
      from safetensors import safe_open
      self._handles[i] = safe_open(str(self.files[i]), framework="np")
    return self._handles[i]

  def get(self, key) -> np.ndarray:
    i = self._where[key]
    if self.kind == "pickle":
      t = self._handles[i][key]
      import torch
      if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        import ml_dtypes
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
      return t.numpy()
    if self.dtype(key) == "bfloat16":
      # safetensors' numpy backend has no bfloat16; its flax backend returns a (host) jax array.
      if i not in self._flax_handles:
        from safetensors import safe_open
        self._flax_handles[i] = safe_open(str(self.files[i]), framework="flax")
      return np.asarray(self._flax_handles[i].get_tensor(key))
    return self._handle(i).get_tensor(key)

  def close(self):
    self._handles.clear()
    self._flax_handles.clear()
