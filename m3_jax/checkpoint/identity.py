"""Checkpoint identity: one checksum per array, written when the array is saved and verified when it is restored,
and the identity string of a checkpoint (a hash of its model config and every array's checksum).

An array's checksum is `DTYPE:HHHHHHHHHHHHHHHH`, two 32-bit lanes of

    lane_j = sum_i fmix32(word_i ^ (i * 0x9E3779B9 + seed_j))   (mod 2**32)

over the array's bit pattern read as 32-bit words (16- and 8-bit values are widened) with `i` the word's flat
C-order index. fmix32 (MurmurHash3's finaliser) is a bijection, so a change to any one word, a single flipped bit
included, always changes both lanes; other corruption escapes with probability about 2**-64. Addition mod 2**32
does not depend on the order of the terms, so the value does not depend on the sharding: a jax.Array is reduced
on its devices (each device hashes its shards and only two scalars per array leave them); a host (numpy) array, or
a small one-host jax.Array, is hashed by XLA on the default device in fixed-size blocks. Cost: one read of every array and ~25 integer ops per word. A 7B
train state (~84 GB: float32 params and two Adam moments) sharded over 8 H100-class devices is ~2.6e9 words per
device: milliseconds per save and per restore, next to seconds for the write itself. A 7B numpy params tree
(`m3 convert`, once) is 7e9 words: ~10-20 s of XLA:CPU.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m3_jax.errors import BadFile

ALGORITHM = "fmix32x2-sum-v1"
_GOLDEN = np.uint32(0x9E3779B9)
_SEEDS = (np.uint32(0x243F6A88), np.uint32(0x85A308D3))
_BLOCK = 1 << 22   # host words hashed per XLA call (a 16 MB buffer); larger one-host jax.Arrays stay on device
_SMALL = 1 << 16   # host arrays up to this many words are hashed by numpy


class ChecksumError(BadFile):
  """A restored array's bytes differ from the bytes that were saved; the message names every such array."""


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _lanes(words, index, valid=None, xs=jnp) -> list:
  """uint32 words and their uint32 flat indices (same shape) -> the two uint32 sums (over `valid` words only);
  `xs` is jax.numpy or numpy."""
  base = index * _GOLDEN
  terms = [_fmix32(words ^ (base + seed)) for seed in _SEEDS]
  if valid is not None:
    terms = [xs.where(valid, t, np.uint32(0)) for t in terms]
  return [xs.sum(t, dtype=xs.uint32) for t in terms]


def _device_words(x: jax.Array) -> jax.Array:
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
  """The array's words in flat C order as a view (uint8, uint16 or uint32: no copy of a contiguous array; the
  caller widens them a block at a time, so a large bfloat16 leaf never exists twice)."""
  x = np.ascontiguousarray(x).reshape(-1)
  size = x.dtype.itemsize
  if x.dtype == np.bool_ or size < 4:
    return x.view({1: np.uint8, 2: np.uint16}[size])
  if size in (4, 8):
    return x.view(np.uint32)
  raise TypeError(f"cannot checksum an array of dtype {x.dtype}")


@jax.jit
def _block_lanes(block: jax.Array, start: jax.Array, n: jax.Array) -> list:
  """The lanes of block[:n] (uint32 words whose flat indices start at `start`); the padding beyond n adds 0."""
  position = jax.lax.iota(jnp.uint32, block.size)
  return _lanes(block, start + position, position < n)


def _host_checksum(x: np.ndarray) -> list:
  """A host array's lanes: numpy for a small array (no dispatch), else XLA on the default device in blocks of a
  fixed size (one compilation serves every array; numpy would take ~20x longer)."""
  words = _host_words(np.asarray(x))
  if words.size <= _SMALL:
    return [int(v) for v in _lanes(words.astype(np.uint32), np.arange(words.size, dtype=np.uint32), xs=np)]
  sums = [0, 0]
  for start in range(0, words.size, _BLOCK):
    n = min(_BLOCK, words.size - start)
    block = np.zeros(_BLOCK, np.uint32)
    block[:n] = words[start:start + n]
    lanes = _block_lanes(block, np.uint32(start & 0xFFFFFFFF), np.uint32(n))
    sums = [(a + int(b)) & 0xFFFFFFFF for a, b in zip(sums, jax.device_get(lanes))]
  return sums


def checksums(tree: Any) -> dict[str, str]:
  """The checksum of every array in `tree`, keyed by its tree path (`jax.tree_util.keystr`, e.g.
  "['llm']['embed']['embedding']"): {path: "float32:0123456789abcdef"}."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  keys = [jax.tree_util.keystr(p) for p, _ in flat]
  dtypes = [str(x.dtype) for _, x in flat]
  flat = [(p, jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x) for p, x in flat]
  # Large or multi-host arrays are hashed where they live, in one computation per set of devices (a jitted
  # computation takes arrays of one device set); the rest are fetched and hashed in blocks, which compiles once
  # per process rather than once per tree.
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, (_, x) in enumerate(flat):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable and x.size <= _BLOCK):
      groups.setdefault(tuple(sorted(d.id for d in x.sharding.device_set)), []).append(i)
  lanes: dict[int, list] = {}
  for members in groups.values():
    for i, pair in zip(members, jax.device_get(_device_checksums([flat[i][1] for i in members]))):
      lanes[i] = pair
  for i, (_, x) in enumerate(flat):
    if i not in lanes:
      lanes[i] = _host_checksum(np.asarray(x))
  return {key: f"{dtype}:{int(lanes[i][0]):08x}{int(lanes[i][1]):08x}"
          for i, (key, dtype) in enumerate(zip(keys, dtypes))}


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
