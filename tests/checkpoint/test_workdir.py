"""The training workdir: params of a step read into shards, the grain probe pipeline's iterator state through a
training checkpoint (a resumed run sees the batches it would have), and checksums: a flipped bit in the latest
step makes the restore fall back (naming the array), and reading that step's params fails naming it."""
from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax import sharding as shd
from m3_jax.checkpoint import identity, workdir

from checkpoint_testlib import flip_bit_of, random_bits

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_params_of_a_step(tmp_path):
  params = {"llm": {"w": jnp.arange(32.0).reshape(8, 4)}, "projector": {"b": jnp.ones(3)}}
  ckpts = workdir.Checkpoints(tmp_path / "run")
  for step in (3, 5):
    ckpts.save(step, {"params": jax.tree_util.tree_map(lambda x: x * step, params), "opt_state": {"mu": jnp.zeros(3)},
                      "step": jnp.int32(step)})
  ckpts.close()
  assert workdir.steps(tmp_path / "run") == [3, 5] and workdir.latest_step(tmp_path / "run") == 5
  np.testing.assert_array_equal(np.asarray(workdir.load_params(tmp_path / "run")["projector"]["b"]), [5, 5, 5])
  np.testing.assert_array_equal(np.asarray(workdir.load_params(tmp_path / "run", step=3)["projector"]["b"]), [3, 3, 3])
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 4"):
    workdir.load_params(tmp_path / "run", step=4)
  mesh = shd.make_mesh((1, -1, 1))
  shardings = {"llm": {"w": jax.sharding.NamedSharding(mesh, shd.P("fsdp"))}, "projector": {"b": shd.replicated(mesh)}}
  loaded = workdir.load_params(tmp_path / "run", step=3, target_shardings=shardings)
  np.testing.assert_array_equal(np.asarray(loaded["llm"]["w"]), np.arange(32.0).reshape(8, 4) * 3)
  assert loaded["llm"]["w"].addressable_shards[0].data.shape == (1, 4)
  meta = workdir.read_meta(tmp_path / "run", 5)
  assert meta["step"] == 5 and meta["checksum_algorithm"] == identity.ALGORITHM
  assert sorted(meta["checksums"]) == ["['opt_state']['mu']", "['params']['llm']['w']", "['params']['projector']['b']",
                                       "['step']"]


def test_a_flipped_bit_in_the_latest_step_falls_back_naming_the_array(tmp_path, caplog):
  def state(step):
    return {"params": {"w": jnp.asarray(random_bits(step, 512)), "b": jnp.zeros(2)}, "step": jnp.int32(step)}

  ckpts = workdir.Checkpoints(tmp_path, keep=5)
  for step in (1, 2):
    ckpts.save(step, state(step), {"index": step})
  ckpts.close()
  flip_bit_of(tmp_path / "checkpoints" / "2" / "state", random_bits(2, 512))
  with pytest.raises(identity.ChecksumError, match=r"\['params'\]\['w'\]: checksum [0-9a-f]{16}, saved"):
    workdir.load_params(tmp_path, step=2)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(1))
  with caplog.at_level(logging.WARNING):
    step, restored, data = workdir.Checkpoints(tmp_path, keep=5).restore(abstract)
  assert step == 1 and data == {"index": 1}
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]).view(np.uint32),
                                random_bits(1, 512).view(np.uint32))
  assert "step 2" in caplog.text and "ChecksumError" in caplog.text and "['params']['w']" in caplog.text
  assert [p.name for p in (tmp_path / "corrupt_checkpoints").iterdir()] == ["2"]


def test_probe_pipeline_state_resumes_through_a_checkpoint(tmp_path):
  from m3_jax.configs import base as m3_config
  from m3_jax.data import pipeline
  config = m3_config.load(str(REPO / "configs/tiny.py"), ["train.batch_size=4"])
  config.data.path, config.data.probe_size = str(tmp_path / "probe"), 40
  it = pipeline.train_iterator(config, tmp_path / "work")
  next(it), next(it)
  ckpts = workdir.Checkpoints(tmp_path / "work")
  ckpts.save(2, {"step": jnp.int32(2)}, workdir.iterator_state(it))
  ckpts.wait()
  expected = [next(it) for _ in range(2)]
  fresh = pipeline.train_iterator(config, tmp_path / "work")
  step, _, data_state = workdir.Checkpoints(tmp_path / "work").restore({"step": jax.ShapeDtypeStruct((), jnp.int32)})
  assert step == 2
  workdir.set_iterator_state(fresh, data_state)
  for want in expected:
    got = next(fresh)
    for key in ("input_ids", "labels", "pixels"):
      np.testing.assert_array_equal(got[key], want[key])


def _two_steps(tmp_path, size: int = 4096):
  """Steps 2 and 4 of {"params": {"w": float32[size] full of the step}, "step"} with data {"index": step} -> the
  state's abstract tree."""
  def state(step):
    return {"params": {"w": jnp.full((size,), float(step))}, "step": jnp.int32(step)}

  ckpts = workdir.Checkpoints(tmp_path, keep=5)
  for step in (2, 4):
    ckpts.save(step, state(step), {"index": step})
  ckpts.close()
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(0))


def _cut_in_half(tmp_path, step: int):
  """Truncates the largest data file of `step`'s state (a disk that lost part of it)."""
  data = max((tmp_path / "checkpoints" / str(step) / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])


def test_when_no_step_restores_nothing_is_moved_aside_and_the_error_names_each_step(tmp_path):
  """A run resumed with a different state tree (say train.freeze changed) fails on every step alike: that is not
  corruption, so no step is moved aside (training would silently start over from step 0); the error names the
  steps, and the run resumed as it was saved still restores the latest step."""
  same = _two_steps(tmp_path, size=4)
  f32 = jnp.float32
  changed = {"params": {"w": jax.ShapeDtypeStruct((4,), f32), "extra": jax.ShapeDtypeStruct((2,), f32)},
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
  with pytest.raises(workdir.CheckpointsUnreadable, match=r"step 4: .*; step 2: .*resume it as it was saved"):
    workdir.Checkpoints(tmp_path, keep=5).restore(changed)
  assert not (tmp_path / "corrupt_checkpoints").exists()
  step, restored, data = workdir.Checkpoints(tmp_path, keep=5).restore(same)
  assert step == 4 and data == {"index": 4} and float(restored["params"]["w"][0]) == 4.0


class _TwoProcesses:
  """This process as process 0 of two, the other one's outcome of each restore phase given by `other`: {(step,
  "read" | "checks"): "ok" | "fails" | "transient"} (the all-gather of `Checkpoints._agreed` answered here, the
  barriers recorded)."""

  def __init__(self, monkeypatch, other: dict[tuple[int, str], str]):
    self.other, self.gathered, self.barriers = other, [], []
    codes = {"ok": 0, "fails": 1, "transient": 2}

    def gather(code):
      self.gathered.append((*self.at, code))
      return np.asarray([code, codes[self.other.get(self.at, "ok")]], np.int32)

    monkeypatch.setattr(workdir.shd, "per_process", gather)
    monkeypatch.setattr(workdir, "_sync_hosts", lambda name: self.barriers.append(name))
    monkeypatch.setattr(workdir, "_join_restore_barrier", lambda manager: self.barriers.append("restore"))
    agreed = workdir.Checkpoints._agreed

    def tracking(ckpts, step, error):
      self.at = (step, "checks" if [g[:1] for g in self.gathered].count((step,)) else "read")
      return agreed(ckpts, step, error)

    monkeypatch.setattr(workdir.Checkpoints, "_agreed", tracking)


def test_a_step_another_process_cannot_restore_makes_every_process_fall_back(tmp_path, monkeypatch, caplog):
  """Multi-process: a shard only another process reads is damaged. This process reads step 4 fine, but resuming
  from it alone would leave the processes at different steps (and the other one waiting in a collective): both
  fall back to step 2, and step 4 is moved aside."""
  abstract = _two_steps(tmp_path)
  hosts = _TwoProcesses(monkeypatch, {(4, "read"): "fails"})
  with caplog.at_level(logging.WARNING):
    step, restored, data = workdir.Checkpoints(tmp_path, keep=5).restore(abstract)
  assert step == 2 and data == {"index": 2} and float(restored["params"]["w"][0]) == 2.0
  assert "OtherProcessFailed" in caplog.text and "process 1 of 2 could not restore it" in caplog.text
  assert [p.name for p in (tmp_path / "corrupt_checkpoints").iterdir()] == ["4"]
  # step 4: the read agreed (this one ok, the other failed), so no checksum was computed alone; step 2: read
  # and checksums agreed; then the barrier around the move
  assert hosts.gathered == [(4, "read", 0), (2, "read", 0), (2, "checks", 0)]
  assert hosts.barriers == ["quarantine_4"]


def test_a_step_this_process_cannot_read_joins_orbaxs_barrier_and_falls_back_with_the_others(tmp_path, monkeypatch,
                                                                                             caplog):
  abstract = _two_steps(tmp_path)
  _cut_in_half(tmp_path, 4)
  hosts = _TwoProcesses(monkeypatch, {})
  with caplog.at_level(logging.WARNING):
    step, restored, _ = workdir.Checkpoints(tmp_path, keep=5).restore(abstract)
  assert step == 2 and float(restored["params"]["w"][0]) == 2.0
  assert "checkpoint step 4" in caplog.text and "OtherProcessFailed" not in caplog.text
  assert hosts.gathered == [(4, "read", 1), (2, "read", 0), (2, "checks", 0)]
  assert hosts.barriers == ["restore", "quarantine_4"]   # the skipped end of orbax's restore, then the move


def test_a_step_another_process_fails_to_verify_makes_every_process_fall_back(tmp_path, monkeypatch):
  abstract = _two_steps(tmp_path)
  hosts = _TwoProcesses(monkeypatch, {(4, "checks"): "fails"})
  assert workdir.Checkpoints(tmp_path, keep=5).restore(abstract)[0] == 2
  assert hosts.gathered == [(4, "read", 0), (4, "checks", 0), (2, "read", 0), (2, "checks", 0)]


def test_a_transient_failure_on_another_process_stops_every_process_and_moves_nothing(tmp_path, monkeypatch):
  """This process's own failure of the step (a damaged shard) is not transient, the other's is: both raise, and
  this one's error stays named as the cause."""
  abstract = _two_steps(tmp_path)
  _cut_in_half(tmp_path, 4)
  _TwoProcesses(monkeypatch, {(4, "read"): "transient"})
  with pytest.raises(workdir.OtherProcessFailed, match=r"step 4 .*process 1 of 2 could not restore it \(a transient"
                     ) as raised:
    workdir.Checkpoints(tmp_path, keep=5).restore(abstract)
  assert raised.value.__cause__ is not None and not workdir.transient(raised.value.__cause__)
  assert not (tmp_path / "corrupt_checkpoints").exists()
  assert workdir.steps(tmp_path) == [2, 4]


def test_processes_that_all_restore_a_step_resume_from_it(tmp_path, monkeypatch):
  abstract = _two_steps(tmp_path)
  hosts = _TwoProcesses(monkeypatch, {})
  step, _, data = workdir.Checkpoints(tmp_path, keep=5).restore(abstract)
  assert step == 4 and data == {"index": 4}
  assert hosts.gathered == [(4, "read", 0), (4, "checks", 0)] and hosts.barriers == []


def test_the_barrier_a_failed_read_joins_has_the_name_orbaxs_restore_gives_it(tmp_path, monkeypatch):
  """A device-collective barrier checks that every process passed the same name: the one Checkpointer.restore
  passes, recorded here."""
  from orbax.checkpoint._src.checkpointers import checkpointer as orbax_checkpointer
  abstract = _two_steps(tmp_path)
  names = []
  monkeypatch.setattr(orbax_checkpointer.multihost, "sync_global_processes", lambda name, **kw: names.append(name))
  ckpts = workdir.Checkpoints(tmp_path, keep=5)
  assert ckpts.restore(abstract)[0] == 4
  assert workdir._restore_barrier_key(ckpts.manager) in names
