"""Checkpoint I/O: m3 checkpoint params (save_params / load_params, also from a training workdir) and the grain
probe pipeline's iterator state through a training checkpoint (a resumed run sees the batches it would have)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax.train import checkpoint as ckpt_lib
from m3_jax import sharding as shd

from train_testlib import REPO


def test_params_round_trip_into_shards_and_from_a_workdir(tmp_path):
  mesh = shd.make_mesh((1, -1, 1))
  params = {"llm": {"w": jnp.arange(32.0).reshape(8, 4)}, "projector": {"b": jnp.ones(3)}}
  ckpt_lib.save_params(tmp_path / "m3", params)
  shardings = {"llm": {"w": jax.sharding.NamedSharding(mesh, shd.P("fsdp"))}, "projector": {"b": shd.replicated(mesh)}}
  loaded = ckpt_lib.load_params(tmp_path / "m3", target_shardings=shardings)
  np.testing.assert_array_equal(np.asarray(loaded["llm"]["w"]), np.arange(32.0).reshape(8, 4))
  assert loaded["llm"]["w"].addressable_shards[0].data.shape == (1, 4)   # read straight into 8 shards
  wrong = {"llm": {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)}, "vision": {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}}
  with pytest.raises(ValueError) as err:
    ckpt_lib.load_params(tmp_path / "m3", abstract=wrong)
  message = str(err.value)
  assert "['llm']['w']: shape (8, 4)" in message and "expects (4, 8)" in message
  assert "['vision']['x']: missing" in message and "['projector']['b']: in" in message

  ckpts = ckpt_lib.Checkpoints(tmp_path / "run")
  for step in (3, 5):
    ckpts.save(step, {"params": jax.tree_util.tree_map(lambda x: x * step, params), "opt_state": {"mu": jnp.zeros(3)},
                      "step": jnp.int32(step)})
  ckpts.close()
  np.testing.assert_array_equal(np.asarray(ckpt_lib.load_params(tmp_path / "run")["projector"]["b"]), [5, 5, 5])
  np.testing.assert_array_equal(np.asarray(ckpt_lib.load_params(tmp_path / "run", step=3)["projector"]["b"]), [3, 3, 3])
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 4"):
    ckpt_lib.load_params(tmp_path / "run", step=4)


def test_probe_pipeline_state_resumes_through_a_checkpoint(tmp_path):
  from m3_jax.configs import base as m3_config
  from m3_jax.data import pipeline
  config = m3_config.load(str(REPO / "configs/tiny.py"), ["train.batch_size=4"])
  config.data.path, config.data.probe_size = str(tmp_path / "probe"), 40
  it = pipeline.train_iterator(config, tmp_path / "work")
  next(it), next(it)
  ckpts = ckpt_lib.Checkpoints(tmp_path / "work")
  ckpts.save(2, {"step": jnp.int32(2)}, ckpt_lib.iterator_state(it))
  ckpts.wait()
  expected = [next(it) for _ in range(2)]
  fresh = pipeline.train_iterator(config, tmp_path / "work")
  step, _, data_state = ckpt_lib.Checkpoints(tmp_path / "work").restore({"step": jax.ShapeDtypeStruct((), jnp.int32)})
  assert step == 2
  ckpt_lib.set_iterator_state(fresh, data_state)
  for want in expected:
    got = next(fresh)
    for key in ("input_ids", "labels", "pixels"):
      np.testing.assert_array_equal(got[key], want[key])
