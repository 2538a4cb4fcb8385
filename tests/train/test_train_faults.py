"""Faults: SIGKILL / SIGTERM and resume reproduce an uninterrupted run's losses; a partial or corrupt latest
checkpoint falls back to the previous one; non-finite steps stop (naming the step) or are skipped and never reach a
checkpoint; `checkpoint.init_from` checks the model config."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax.checkpoint import m3dir, workdir as workdir_lib
from m3_jax import sharding as shd
from m3_jax.train.metrics import read_metrics
from m3_jax.data.synthetic import SyntheticBatches
from m3_jax.train import loop
from m3_jax.train.loop import NonFiniteError
from m3_jax.train.state import TrainStep, model_config_of

from train_testlib import FAST_COMPILE, small_config, small_overrides, subprocess_env, train_command

STEPS = 16


def wait_for_step(workdir, step: int, proc: subprocess.Popen, timeout: float = 240.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early with {proc.returncode} (log beside {workdir})")
    path = workdir / "metrics.jsonl"
    if path.exists() and any(json.loads(l)["step"] >= step for l in path.read_text().splitlines() if l.strip()):
      return
    time.sleep(0.05)
  raise AssertionError(f"no step {step} in {workdir}/metrics.jsonl after {timeout}s")


def test_sigkill_and_sigterm_then_resume_match_an_uninterrupted_run(tmp_path, compile_cache):
  env = subprocess_env(compile_cache, devices=2)
  overrides = small_overrides(**{"train.num_steps": STEPS, "checkpoint.every": 4, "train.lr": 3e-3})
  straight, broken = tmp_path / "straight", tmp_path / "broken"

  def start(workdir):
    log = open(tmp_path / f"{workdir.name}.log", "a")   # a file, not a pipe nobody drains while waiting
    return subprocess.Popen(train_command(workdir, overrides), env=env, stdout=subprocess.DEVNULL, stderr=log)

  # XLA:CPU compiles on one core: the reference run and the first broken run compile side by side.
  reference = start(straight)
  proc = start(broken)
  wait_for_step(broken, 5, proc)
  proc.send_signal(signal.SIGKILL)         # mid-run, possibly mid-save
  proc.wait(timeout=60)
  proc = start(broken)                     # resumes from the last finalised checkpoint
  wait_for_step(broken, 10, proc)
  proc.send_signal(signal.SIGTERM)         # preemption: save and exit 0
  assert proc.wait(timeout=120) == 0, (tmp_path / "broken.log").read_text()[-3000:]
  stopped_at = max(read_metrics(broken))
  assert stopped_at < STEPS
  assert workdir_lib.Checkpoints(broken).latest_step() == stopped_at   # the SIGTERM checkpoint
  run = subprocess.run(train_command(broken, overrides), env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert reference.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]

  a, b = read_metrics(straight), read_metrics(broken)
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  for step in a:
    assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6, (step, a[step]["loss"], b[step]["loss"])
    assert "loss/scale_9" in b[step] and "loss/scale_1" in b[step]
  assert a[STEPS]["loss"] < 0.7 * a[1]["loss"]   # and it learned something
  assert (straight / "config.json").exists() and any((straight / "tb").iterdir())
  assert workdir_lib.Checkpoints(straight).steps() == [8, 12, 16]   # checkpoint.keep=3


def toy_state(scale: float):
  mesh = shd.make_mesh((1, -1, 1))
  w = jax.device_put(jnp.arange(64.0).reshape(16, 4) * scale, jax.sharding.NamedSharding(mesh, shd.P("fsdp")))
  return {"params": {"w": w}, "step": jnp.int32(scale), "rng": jax.random.PRNGKey(0)}


def test_partial_and_corrupt_latest_checkpoints_fall_back(tmp_path):
  ckpts = workdir_lib.Checkpoints(tmp_path, keep=5)
  for step in (2, 4, 6):
    ckpts.save(step, toy_state(step), {"index": step})
  ckpts.wait()
  # A save cut short: orbax's temporary directory is never listed as a step.
  (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1234").mkdir()
  # Step 6: a data file lost; step 4: finalised but its array bytes truncated.
  for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.unlink()
  for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                    toy_state(1))
  ckpts = workdir_lib.Checkpoints(tmp_path, keep=5)
  assert ckpts.steps() == [2, 4, 6]
  step, state, data = ckpts.restore(abstract)
  assert step == 2 and data == {"index": 2}
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.arange(64.0).reshape(16, 4) * 2)
  assert state["params"]["w"].sharding == abstract["params"]["w"].sharding
  assert sorted(p.name for p in (tmp_path / "corrupt_checkpoints").iterdir()) == ["4", "6"]
  ckpts.save(4, toy_state(4), {"index": 4})   # the moved-aside step can be written again
  ckpts.wait()
  assert ckpts.restore(abstract)[0] == 4


class PoisonedBatches(SyntheticBatches):
  """Synthetic batches whose pixels are NaN at one index."""

  def __init__(self, config, poison_index: int):
    mc = config.model
    super().__init__(batch_size=int(config.train.batch_size), seq_len=int(config.data.max_length),
                     image_size=int(mc.vision.image_size), vocab_size=int(mc.llm.vocab_size),
                     image_token_id=int(mc.image_token_id))
    self.poison_index = poison_index

  def __next__(self):
    index = self.index
    batch = super().__next__()
    if index == self.poison_index:
      batch["pixels"] = np.full_like(batch["pixels"], np.nan)
    return batch


def test_nonfinite_step_stops_or_skips_and_never_reaches_a_checkpoint(tmp_path):
  config = small_config(**{"train.num_steps": 4, "checkpoint.every": 1, "train.freeze": "('vision',)",
                           "train.on_nonfinite": "'raise'"})
  trainer = TrainStep(config, mesh=shd.make_mesh((1, 1, 1), jax.devices()[:1]), compiler_options=FAST_COMPILE)
  with pytest.raises(NonFiniteError, match="at step 3"):
    loop.fit(trainer, tmp_path / "raise", PoisonedBatches(config, poison_index=2), progress=False)
  assert workdir_lib.Checkpoints(tmp_path / "raise").steps() == [1, 2]
  assert max(read_metrics(tmp_path / "raise")) == 2

  config.train.on_nonfinite = "skip"         # read by the host loop: the compiled step is reused
  summary = loop.fit(trainer, tmp_path / "skip", PoisonedBatches(config, poison_index=2), progress=False)
  assert summary["step"] == 4 and math.isfinite(summary["loss"])
  records = read_metrics(tmp_path / "skip")
  assert records[3]["skipped"] == 1 and records[3]["loss"] == "nan"
  assert records[2]["skipped"] == records[4]["skipped"] == 0
  step, state, _ = workdir_lib.Checkpoints(tmp_path / "skip").restore(trainer.abstract_state())
  assert step == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))
  # The skipped step still counts for the LR schedule: the optimiser's counts are the step, so the LR applied is
  # schedule(step), the one logged.
  counts = [int(x) for x in jax.tree_util.tree_leaves(state["opt_state"]) if np.issubdtype(np.asarray(x).dtype,
                                                                                           np.integer)]
  assert counts and set(counts) == {4}
  # The frozen vision tower never moved; the LLM did.
  init = trainer.init_state()["params"]
  for a, b in zip(jax.tree_util.tree_leaves(init["vision"]), jax.tree_util.tree_leaves(state["params"]["vision"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(init["llm"]["norm"]["scale"]), np.asarray(state["params"]["llm"]["norm"]["scale"]))


def test_init_from_checks_the_model_config(tmp_path):
  config = small_config()
  mc = model_config_of(config)
  good = tmp_path / "good"
  good.mkdir()
  (good / "m3_config.json").write_text(json.dumps({"model": mc.to_dict(), "template": "vicuna_v1"}))
  m3dir.check_init_from(good, mc.replace(dtype="bfloat16"))   # compute choices may differ
  bad = tmp_path / "bad"
  bad.mkdir()
  wrong = mc.to_dict()
  wrong["llm"]["width"] = 256
  wrong["image_token_id"] = 7
  (bad / "m3_config.json").write_text(json.dumps(wrong))
  with pytest.raises(ValueError) as err:
    m3dir.check_init_from(bad, mc)
  assert "model.llm.width: checkpoint 256, run config 128" in str(err.value)
  assert "model.image_token_id: checkpoint 7, run config 4" in str(err.value)
  with pytest.raises(FileNotFoundError, match="m3_config.json"):
    m3dir.check_init_from(tmp_path, mc)


def test_init_from_loads_the_params_into_their_shards(tmp_path):
  config = small_config(**{"mesh.shape": "(1, 4, 2)"})
  mc = model_config_of(config)
  rng = np.random.default_rng(0)
  trainer = TrainStep(config)
  params = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32), trainer.abstract_params)
  m3dir.save_params(tmp_path / "init", params)
  (tmp_path / "init" / "m3_config.json").write_text(json.dumps(mc.to_dict()))
  config.checkpoint.init_from = str(tmp_path / "init")
  state = TrainStep(config).init_state()
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                               jax.tree_util.tree_leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=jax.tree_util.keystr(path))
  kernel = state["params"]["llm"]["layers"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == shd.P(None, "fsdp", "tensor")
  assert int(state["step"]) == 0
