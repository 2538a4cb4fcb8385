"""Per-array checksums: the documented formula (recomputed here in plain Python), the same value from a sharded
device array and from a host array, any single flipped bit detected, and the identity string."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from m3_jax import sharding as shd
from m3_jax.checkpoint import identity

M = 0xFFFFFFFF


def fmix32(h: int) -> int:
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & M
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & M
  return h ^ (h >> 16)


def reference(words: list[int]) -> str:
  """identity's module docstring, written out: two lanes of sum_i fmix32(word_i ^ (i * 0x9E3779B9 + seed))."""
  lanes = [sum(fmix32(w ^ ((i * 0x9E3779B9 + seed) & M)) for i, w in enumerate(words)) & M
           for seed in (0x243F6A88, 0x85A308D3)]
  return f"{lanes[0]:08x}{lanes[1]:08x}"


def test_checksums_follow_the_formula_on_device_and_host(monkeypatch):
  # jax.Arrays above identity._BLOCK words (or on other hosts) are hashed where they live, one computation per
  # device set; numpy arrays are hashed in blocks on the default device.
  monkeypatch.setattr(identity, "_BLOCK", 1)
  f32 = np.array([[1.5, -2.0, 0.0], [3.25, 1e-3, -7.0]], np.float32)
  bf16 = np.array([1.0, -0.5, 3.0], ml_dtypes.bfloat16)
  tree = {"f": f32, "b": bf16, "i": np.array([-1, 7], np.int32), "z": np.array([True, False])}
  want = {"['f']": "float32:" + reference([int(w) for w in f32.view(np.uint32).ravel()]),
          "['b']": "bfloat16:" + reference([int(w) for w in bf16.view(np.uint16)]),
          "['i']": "int32:" + reference([0xFFFFFFFF, 7]),
          "['z']": "bool:" + reference([1, 0])}
  assert identity.checksums(tree) == want

  mesh = shd.make_mesh((1, -1, 1))
  sharded = jax.device_put(jnp.asarray(np.tile(f32, (4, 1))), jax.sharding.NamedSharding(mesh, shd.P("fsdp")))
  assert len(sharded.addressable_shards) == 8
  host = identity.checksums({"x": np.tile(f32, (4, 1))})
  assert identity.checksums({"x": sharded}) == host
  mixed = identity.checksums({"x": sharded, "y": jax.device_put(jnp.asarray(f32), jax.devices()[1])})
  assert mixed == {"['x']": host["['x']"], "['y']": want["['f']"]}
  assert identity.checksums(jax.tree.map(jnp.asarray, tree)) == want
  key = jax.random.key(3)                           # a typed PRNG key: the words of its key data
  assert identity.checksums({"k": key}) == {
      "['k']": "key<fry>:" + reference([int(w) for w in np.asarray(jax.random.key_data(key))])}


def test_every_single_flipped_bit_changes_the_checksum():
  x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
  base = identity.checksums({"x": x})["['x']"]
  seen = {base}
  for element in (0, 13, 31):
    for bit in range(32):
      y = x.copy()
      y.view(np.uint32).reshape(-1)[element] ^= np.uint32(1 << bit)
      seen.add(identity.checksums({"x": y})["['x']"])
  assert len(seen) == 1 + 3 * 32
  swapped = x.copy()
  swapped[0, :2] = x[0, 1::-1]     # the same values in another order
  assert identity.checksums({"x": swapped})["['x']"] != base


def test_verify_names_the_array_and_fingerprint_depends_on_model_and_params():
  tree = {"a": np.arange(4, dtype=np.float32), "b": np.ones(3, np.float32)}
  saved = identity.checksums(tree)
  identity.verify(tree, saved, "ckpt")
  tree["b"][1] = 2.0
  with pytest.raises(identity.ChecksumError, match=r"ckpt: 1 arrays differ .*\n  \['b'\]: checksum [0-9a-f]{16}, saved"):
    identity.verify(tree, saved, "ckpt")
  a = identity.fingerprint({"width": 8}, saved)
  assert len(a) == 32 and a == identity.fingerprint({"width": 8}, dict(reversed(saved.items())))
  assert identity.fingerprint({"width": 9}, saved) != a
  assert identity.fingerprint({"width": 8}, identity.checksums(tree)) != a


def test_a_host_array_hashed_in_several_blocks_matches_the_device(monkeypatch):
  monkeypatch.setattr(identity, "_BLOCK", 1 << 15)   # 100_003 words: three full blocks and a padded one
  assert 100_003 > identity._SMALL
  x = np.random.default_rng(1).normal(size=(7, 14_286)).astype(np.float32).reshape(-1)[:100_003]
  assert identity.checksums({"x": x}) == identity.checksums({"x": jnp.asarray(x)})
  half = x.astype(ml_dtypes.bfloat16)               # widened to 32-bit words one block at a time
  assert identity.checksums({"x": half}) == identity.checksums({"x": jnp.asarray(half)})
