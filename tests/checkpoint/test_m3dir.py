"""The m3 checkpoint directory: params into shards with key/shape checks, checksums beside params/, a flipped bit
named on load, a directory from before checksums still loading, and one identity for the same model in an m3
directory and a workdir step."""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax import sharding as shd
from m3_jax.checkpoint import identity, m3dir, reader, workdir
from m3_jax.models.config import ModelConfig

from checkpoint_testlib import flip_bit_of, random_bits


def test_params_round_trip_into_shards_with_key_and_shape_checks(tmp_path):
  mesh = shd.make_mesh((1, -1, 1))
  params = {"llm": {"w": jnp.arange(32.0).reshape(8, 4)}, "projector": {"b": jnp.ones(3)}}
  sums = m3dir.save_params(tmp_path / "m3", params)
  stored = json.loads((tmp_path / "m3" / "params.checksums.json").read_text())
  assert stored == {"algorithm": identity.ALGORITHM, "arrays": sums}
  assert sorted(sums) == ["['llm']['w']", "['projector']['b']"] and sums["['llm']['w']"].startswith("float32:")
  shardings = {"llm": {"w": jax.sharding.NamedSharding(mesh, shd.P("fsdp"))}, "projector": {"b": shd.replicated(mesh)}}
  loaded = m3dir.load_params(tmp_path / "m3", target_shardings=shardings)
  np.testing.assert_array_equal(np.asarray(loaded["llm"]["w"]), np.arange(32.0).reshape(8, 4))
  assert loaded["llm"]["w"].addressable_shards[0].data.shape == (1, 4)   # read straight into 8 shards
  wrong = {"llm": {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)}, "vision": {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}}
  with pytest.raises(ValueError) as err:
    m3dir.load_params(tmp_path / "m3", abstract=wrong)
  message = str(err.value)
  assert "['llm']['w']: shape (8, 4)" in message and "expects (4, 8)" in message
  assert "['vision']['x']: missing" in message and "['projector']['b']: in" in message
  # Stored bfloat16, asked for float32: read and verified as stored, then cast.
  m3dir.save_params(tmp_path / "bf16", {"w": jnp.array([1.5, -2.0], jnp.bfloat16)})
  got = m3dir.load_params(tmp_path / "bf16", abstract={"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
  assert got["w"].dtype == jnp.float32 and np.asarray(got["w"]).tolist() == [1.5, -2.0]


def test_a_flipped_bit_is_named_and_an_old_directory_loads_unverified(tmp_path, caplog):
  w = random_bits(0, 256)
  m3dir.save_params(tmp_path, {"vision": {"w": w}, "llm": {"b": np.zeros(3, np.float32)}})
  flip_bit_of(tmp_path / "params", w)
  with pytest.raises(identity.ChecksumError) as err:
    m3dir.load_params(tmp_path)
  assert "1 arrays differ" in str(err.value) and "['vision']['w']: checksum" in str(err.value)
  assert "['llm']['b']" not in str(err.value)
  (tmp_path / "params.checksums.json").unlink()   # as written before checksums existed
  with caplog.at_level(logging.WARNING):
    loaded = m3dir.load_params(tmp_path)
  assert "not verified" in caplog.text
  assert int(np.sum(np.asarray(loaded["vision"]["w"]).view(np.uint32) != w.view(np.uint32))) == 1


def test_the_same_model_has_one_identity_in_an_m3_directory_and_a_workdir(tmp_path):
  cfg = ModelConfig()
  params = {"llm": {"w": jnp.asarray(random_bits(1, 64))}, "projector": {"b": jnp.ones(3)}}
  m3dir.save(tmp_path / "m3", cfg, params, preprocessor_cfg={"size": 1})
  meta = json.loads((tmp_path / "m3" / "m3_config.json").read_text())
  assert {"format", "format_version", "model", "template", "param_dtype"} <= set(meta)
  run = {"model": cfg.to_dict(), "data": {"template": "vicuna_v1"}}
  workdir.write_config(tmp_path / "run", json.dumps(run))
  ckpts = workdir.Checkpoints(tmp_path / "run")
  ckpts.save(7, {"params": params, "step": jnp.int32(7)})
  ckpts.save(8, {"params": {**params, "projector": {"b": jnp.zeros(3)}}, "step": jnp.int32(8)})
  ckpts.close()
  a = reader.identity(tmp_path / "m3")
  assert a == reader.identity(tmp_path / "run", step=7)
  assert reader.identity(tmp_path / "run") != a                     # the latest step: other params
  assert a == identity.fingerprint(cfg.to_dict(), identity.checksums(params))
  (tmp_path / "m3" / "params.checksums.json").unlink()              # older directory: checksummed on the fly
  assert reader.identity(tmp_path / "m3") == a
  with pytest.raises(FileNotFoundError, match="neither an m3 checkpoint directory"):
    reader.identity(tmp_path)
