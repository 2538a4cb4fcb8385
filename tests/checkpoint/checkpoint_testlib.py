"""Test helpers: arrays whose stored bytes can be found on disk, and flipping one bit of them there."""
from __future__ import annotations

import pathlib

import numpy as np


def random_bits(seed: int, n: int) -> np.ndarray:
  """float32[n] of uniformly random bit patterns: incompressible, so zstd stores them verbatim in the chunk file."""
  return np.random.default_rng(seed).integers(0, 2**32, size=(n,), dtype=np.uint32).view(np.float32)


def flip_bit_of(directory: pathlib.Path, array: np.ndarray, element: int = 100, bit: int = 3) -> pathlib.Path:
  """Flips one bit of `array[element]` in the orbax (OCDBT) data file under `directory` that holds its bytes."""
  needle = array[element:element + 4].tobytes()
  hits = [f for f in directory.rglob("*") if f.is_file() and needle in f.read_bytes()]
  assert len(hits) == 1, f"expected one data file holding the array's bytes under {directory}, found {hits}"
  data = bytearray(hits[0].read_bytes())
  data[data.index(needle)] ^= 1 << bit
  hits[0].write_bytes(bytes(data))
  return hits[0]
