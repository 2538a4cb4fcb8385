"""Checkpoint identity: one checksum per array, written when the array is saved and verified when it is restored,
and the identity string of a checkpoint (a hash of its model config and every array's checksum).

An array's checksum is `DTYPE:HHHHHHHHHHHHHHHH`, two 32-bit lanes of

    lane_j = sum_i fmix32(word_i ^ (i * 0x9E3779B9 + seed_j))   (mod 2**32)

over the array's bit pattern read as 32-bit words (16- and 8-bit values are widened) with `i` the word's flat
C-order index. fmix32 (MurmurHash3's finaliser) is a bijection, so a change to any one word, a single flipped bit
included, always changes both lanes; other corruption escapes with probability about 2**-64. Addition mod 2**32
does not depend on the order of the terms, so the value does not depend on the sharding: a jax.Array is reduced
on its devices (each device hashes its shards and only two scalars per array leave them), a host array with numpy
in chunks. Cost: one read of every array; for a 7B model's train state (~84 GB of params and Adam moments, all
float32) that is ~25 ms of HBM bandwidth on a v5e/H100-class device per save and per restore; a 7B host (numpy)
params tree takes on the order of a minute on one CPU core (done once, by `m3 convert`).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = "fmix32x2-sum-v1"
_GOLDEN = np.uint32(0x9E3779B9)
_SEEDS = (np.uint32(0x243F6A88), np.uint32(0x85A308D3))
_CHUNK = 1 << 22  # host words hashed at a time (bounds the temporaries to ~100 MB)


class ChecksumError(ValueError):
  """A restored array's bytes differ from the bytes that were saved; the message names every such array."""


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _lanes(words, index) -> list:
  """uint32 words and their uint32 flat indices (same shape) -> two uint32 sums."""
  xs = jnp if isinstance(words, jax.Array) else np
  base = index * _GOLDEN
  return [xs.sum(_fmix32(words ^ (base + seed)), dtype=xs.uint32) for seed in _SEEDS]


def _device_words(x: jax.Array) -> jax.Array:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size < 4:
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte values: [..., 2]


@jax.jit
def _device_checksums(leaves: list[jax.Array]) -> list:
  out = []
  for x in leaves:
    words = _device_words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the flat C-order index, built per axis so no shard moves
      index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride % (1 << 32))
      stride *= words.shape[axis]
    out.append(_lanes(words, index))
  return out


def _host_words(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x).reshape(-1)
  if x.dtype == np.bool_:
    return x.astype(np.uint32)
  size = x.dtype.itemsize
  if size < 4:
    return x.view({1: np.uint8, 2: np.uint16}[size]).astype(np.uint32)
  if size in (4, 8):
    return x.view(np.uint32)
  raise TypeError(f"cannot checksum an array of dtype {x.dtype}")


def _host_checksum(x: np.ndarray) -> list:
  words = _host_words(np.asarray(x))
  sums = [0, 0]
  for start in range(0, words.size, _CHUNK):
    chunk = words[start:start + _CHUNK]
    if chunk.dtype != np.uint32:
      chunk = chunk.astype(np.uint32)
    index = (np.arange(start, start + chunk.size, dtype=np.uint64) & 0xFFFFFFFF).astype(np.uint32)
    sums = [(a + int(b)) & 0xFFFFFFFF for a, b in zip(sums, _lanes(chunk, index))]
  return sums


def checksums(tree: Any) -> dict[str, str]:
  """The checksum of every array in `tree`, keyed by its tree path (`jax.tree_util.keystr`, e.g.
  "['llm']['embed']['embedding']"): {path: "float32:0123456789abcdef"}."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  keys = [jax.tree_util.keystr(p) for p, _ in flat]
  on_device = [i for i, (_, x) in enumerate(flat) if isinstance(x, jax.Array)]
  lanes: dict[int, list] = {}
  if on_device:
    for i, pair in zip(on_device, jax.device_get(_device_checksums([flat[i][1] for i in on_device]))):
      lanes[i] = pair
  for i, (_, x) in enumerate(flat):
    if i not in lanes:
      lanes[i] = _host_checksum(np.asarray(x))
  out = {}
  for i, (_, x) in enumerate(flat):
    dtype = str(x.dtype)
    out[keys[i]] = f"{dtype}:{int(lanes[i][0]):08x}{int(lanes[i][1]):08x}"
  return out


def verify(tree: Any, expected: dict[str, str], where: str, prefix: str = "") -> None:
  """Raises ChecksumError naming every array of `tree` whose checksum is not `expected[prefix + path]` (the
  checksums recorded at save time; `prefix` when `tree` is a subtree of what was saved, e.g. "['params']").
  An array restored in another dtype than it was saved in cannot be compared and is not checked."""
  bad = []
  for key, got in checksums(tree).items():
    want = expected.get(prefix + key)
    if want is None:
      bad.append(f"  {prefix + key}: no checksum was recorded for it")
    elif want.split(":")[0] == got.split(":")[0] and want != got:
      bad.append(f"  {prefix + key}: checksum {got.split(':')[1]}, saved {want.split(':')[1]}")
  if bad:
    raise ChecksumError(f"{where}: {len(bad)} arrays differ from what was saved (the stored bytes changed):\n"
                        + "\n".join(bad[:40]) + ("\n  ..." if len(bad) > 40 else ""))


def subtree(sums: dict[str, str], prefix: str) -> dict[str, str]:
  """The checksums under `prefix` (e.g. "['params']"), keyed relative to it."""
  return {k[len(prefix):]: v for k, v in sums.items() if k.startswith(prefix)}


def fingerprint(model: dict, sums: dict[str, str]) -> str:
  """The identity string of a checkpoint: sha256 (32 hex digits) of the model config dict and every param
  array's checksum. Equal strings mean the same architecture with bit-identical params."""
  text = json.dumps({"algorithm": ALGORITHM, "model": model, "arrays": sorted(sums.items())}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:32]
