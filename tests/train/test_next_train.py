"""LLaVA-NeXT training through the trainer: pipeline batches of the non-square probe (mixed crop grids), a sharded
step on 8 devices equal to one device, finest_first for NeXT, random_per_sample's drawn groups (one device and 8),
`m3 eval` of the probe at every scale, SIGKILL then resume with the same losses, and the paper's NeXT 7B recipe
(shapes only)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax import cli
from m3_jax import sharding as shd
from m3_jax.checkpoint import m3dir
from m3_jax.configs import base as m3_config
from m3_jax.data import pipeline
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.labels import IGNORE
from m3_jax.models.config import ModelConfig
from m3_jax.train import curriculum
from m3_jax.train.metrics import read_metrics
from m3_jax.train.state import TrainStep

from test_train_step import assert_trees_close
from train_testlib import FAST_COMPILE, REPO, subprocess_env

NEXT = {"model.vision.depth": "1", "model.llm.depth": "1", "data.probe_size": "64", "train.batch_size": "8",
        "train.scales": "(9, 1)", "train.num_steps": "6", "train.log_every": "1", "train.warmup_ratio": "0.0",
        "train.finest_first_steps": "0", "checkpoint.every": "2", "checkpoint.keep": "3", "mesh.shape": "(1, -1, 1)",
        "train.lr": "3e-3"}


def next_overrides(probe_dir, **kw) -> list[str]:
  return [f"{k}={v}" for k, v in {**NEXT, "data.path": repr(str(probe_dir)), **kw}.items()]


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("probe_next")


@pytest.fixture(scope="module")
def reference(probe_dir):
  config = m3_config.load("tiny:next", next_overrides(probe_dir))
  batch = next(pipeline.train_iterator(config, None))
  trainer = TrainStep(config, mesh=shd.make_mesh((1, 1, 1), jax.devices()[:1]))
  params = jax.device_get(trainer.init_state(seed=0)["params"])
  host = {k: v for k, v in batch.items() if k in trainer.batch_ndim}
  fn = jax.jit(trainer.loss_and_grads)
  b = shd.shard_batch(host, trainer.mesh)
  compiled = fn.lower(params, b, None, None, jnp.int32(0)).compile(compiler_options=FAST_COMPILE)
  return dict(config=config, batch=host, params=params, trainer=trainer, compiled=compiled)


def test_pipeline_batch_mixes_crop_grids(reference):
  batch = reference["batch"]
  assert batch["pixels"].shape[:2] == (8, 3)       # crop bucket 3: base + a 1x2 or 2x1 grid
  assert set(batch) == {"input_ids", "labels", "attention_mask", "pixels", "has_image", "anyres_index_9",
                        "anyres_index_1"}
  counts = (batch["anyres_index_9"] >= 0).sum(1)
  # 1:1 -> 1x1 grid: 9 + 3 * 4 = 21; 2:1 -> 1x2: 9 + 3 * 7 = 30; 1:2 -> 2x1: 9 + 6 * 4 = 33 (the bucket's most)
  assert set(counts.tolist()) <= {21, 30, 33} and len(set(counts.tolist())) >= 2, counts
  assert batch["anyres_index_9"].shape == (8, 33) and batch["anyres_index_1"].shape == (8, 5)


def test_sharded_next_step_matches_single_device(reference, probe_dir):
  trainer, params, host = reference["trainer"], reference["params"], reference["batch"]
  loss, aux, grads = reference["compiled"](params, shd.shard_batch(host, trainer.mesh), None, None, jnp.int32(0))
  config = m3_config.load("tiny:next", next_overrides(probe_dir, **{"mesh.shape": "(1, 4, 2)"}))
  sharded = TrainStep(config, mesh=shd.make_mesh((1, 4, 2)))
  p = jax.device_put(params, sharded.param_shardings)
  b = shd.shard_batch(host, sharded.mesh)
  s_loss, s_aux, s_grads = jax.jit(sharded.loss_and_grads).lower(p, b).compile(
      compiler_options=FAST_COMPILE)(p, b)
  assert abs(float(s_loss) - float(loss)) <= 1e-5 * abs(float(loss))
  np.testing.assert_allclose(np.asarray(s_aux["per_scale"]), np.asarray(aux["per_scale"]), rtol=1e-5)
  assert_trees_close(s_grads, grads, rtol=1e-4, atol=1e-6)
  assert "image_newline" in s_grads and float(np.abs(np.asarray(s_grads["image_newline"])).max()) > 0


def test_finest_first_trains_the_finest_scale_then_every_scale_for_next(reference, probe_dir):
  config = m3_config.load("tiny:next", next_overrides(probe_dir, **{"train.finest_first_steps": "3"}))
  trainer = TrainStep(config, mesh=shd.make_mesh((1, 1, 1), jax.devices()[:1]))
  b = shd.shard_batch(reference["batch"], trainer.mesh)
  params = reference["params"]
  fn = jax.jit(trainer.loss_and_grads).lower(params, b, None, None, jnp.int32(0)).compile(
      compiler_options=FAST_COMPILE)
  _, every, _ = reference["compiled"](params, b, None, None, jnp.int32(0))
  per_scale = np.asarray(every["per_scale"])
  early, aux, _ = fn(params, b, None, None, jnp.int32(2))
  np.testing.assert_array_equal(np.asarray(aux["trained"]), [1.0, 0.0])   # scale 9 alone
  np.testing.assert_allclose(float(early), per_scale[0], rtol=1e-5)
  late, _, _ = fn(params, b, None, None, jnp.int32(3))
  np.testing.assert_allclose(float(late), per_scale.mean(), rtol=1e-5)


def test_random_per_sample_through_the_trainer_decodes_each_drawn_group_at_its_scale(reference, probe_dir):
  """The trainer draws the row groups from the step's rng; group i's rows count at scale i only. The expected
  per-scale CE comes from the `all` step on the same batch with every other row's labels masked out."""
  trainer, params, host = reference["trainer"], reference["params"], reference["batch"]
  config = m3_config.load("tiny:next", next_overrides(probe_dir, **{"train.scale_sampling": "'random_per_sample'"}))
  single = TrainStep(config, mesh=shd.make_mesh((1, 1, 1), jax.devices()[:1]))
  b = shd.shard_batch(host, single.mesh)
  rng_a, rng_b = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  fn = jax.jit(single.loss_and_grads).lower(params, b, rng_a, None, jnp.int32(0)).compile(
      compiler_options=FAST_COMPILE)
  partitions, outputs = set(), []
  for rng in (rng_a, rng_b):
    groups = np.asarray(curriculum.groups(rng, 8, 2))
    partitions.add(tuple(map(tuple, np.sort(groups, axis=1))))
    outputs.append(fn(params, b, rng, None, jnp.int32(0)))
    loss, aux, _ = outputs[-1]
    np.testing.assert_array_equal(np.asarray(aux["trained"]), [1.0, 1.0])
    expected = []
    for i, rows in enumerate(groups):
      masked = dict(host, labels=np.where(np.isin(np.arange(8), rows)[:, None], host["labels"], IGNORE))
      _, only, _ = reference["compiled"](params, shd.shard_batch(masked, trainer.mesh), None, None, jnp.int32(0))
      # per_scale = M * (group i's summed CE at scale i) / the whole batch's target count
      expected.append(2 * float(only["per_scale"][i]) * float(only["num_targets"]) / float(aux["num_targets"]))
    np.testing.assert_allclose(np.asarray(aux["per_scale"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)
  assert len(partitions) == 2  # the two keys drew two different partitions
  loss, aux, grads = outputs[0]  # rng_a's
  config8 = m3_config.load("tiny:next", next_overrides(probe_dir, **{"train.scale_sampling": "'random_per_sample'",
                                                                     "mesh.shape": "(1, 4, 2)"}))
  sharded = TrainStep(config8, mesh=shd.make_mesh((1, 4, 2)))
  p, b8 = jax.device_put(params, sharded.param_shardings), shd.shard_batch(host, sharded.mesh)
  s_loss, s_aux, s_grads = jax.jit(sharded.loss_and_grads).lower(p, b8, rng_a, None, jnp.int32(0)).compile(
      compiler_options=FAST_COMPILE)(p, b8, rng_a, None, jnp.int32(0))
  np.testing.assert_allclose(float(s_loss), float(loss), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s_aux["per_scale"]), np.asarray(aux["per_scale"]), rtol=1e-5)
  assert_trees_close(s_grads, grads, rtol=1e-4, atol=1e-6)


def test_m3_eval_probe_on_a_next_checkpoint_reports_every_scale(reference, probe_dir, tmp_path):
  """`m3 eval --task probe` on a NeXT checkpoint and the non-square probe it trains on: every scale (tokens per
  crop) answers every family."""
  cfg = ModelConfig.from_config(reference["config"].model)
  ckpt = m3dir.save(tmp_path / "ckpt", cfg, reference["params"], tokenizer_src=probe_tokenizer(),
                    template="vicuna_v1")
  out = tmp_path / "eval"
  assert cli.main(["eval", "--ckpt", str(ckpt), "--task", "probe", "--data", str(probe_dir), "--limit", "4",
                   "--max-new-tokens", "3", "--out", str(out), "--no-progress"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  assert sorted(map(int, summary["scales"])) == [1, 9, 36, 144]
  preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
  assert len(preds) == 4 * 4  # the probe's test split is 6 here; --limit 4 takes one per family
  for scale in (144, 36, 9, 1):
    mine = [p for p in preds if int(p["scale"]) == scale]
    assert {p["category"] for p in mine} == {"whole", "blocks", "tiles", "patches"}
    assert len({p["question_id"] for p in mine}) == 4 and all(0 <= p["score"] <= 1 for p in mine)


def test_sigkill_then_resume_matches_an_uninterrupted_next_run(tmp_path, probe_dir, compile_cache, reference):
  from test_train_faults import wait_for_step
  env = subprocess_env(compile_cache, devices=2)
  overrides = next_overrides(probe_dir)

  def command(workdir):
    return [sys.executable, "-m", "m3_jax.cli.train", "--config", "tiny:next", "--workdir", str(workdir),
            "--no-progress", *[f"--config.{o}" for o in overrides]]

  def start(workdir):
    return subprocess.Popen(command(workdir), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / f"{workdir.name}.log", "a"))

  straight, broken = tmp_path / "straight", tmp_path / "broken"
  reference_run = start(straight)
  proc = start(broken)
  wait_for_step(broken, 3, proc, timeout=400)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  run = subprocess.run(command(broken), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert reference_run.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]
  a, b = read_metrics(straight), read_metrics(broken)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in a:
    assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6, (step, a[step]["loss"], b[step]["loss"])
    assert "loss/scale_9" in b[step] and "loss/scale_1" in b[step]


def test_llava_next_7b_recipe_is_the_papers_and_shards_over_fsdp_without_allocating():
  config = m3_config.load("llava_next_7b_m3", ["checkpoint.init_from=''"])
  assert config.model.type == "llava_next" and config.data.image_aspect == "anyres"
  assert tuple(map(tuple, config.model.anyres.grid_pinpoints)) == ((336, 672), (672, 336), (672, 672),
                                                                    (1008, 336), (336, 1008))
  t = config.train
  assert (t.lr_llm, t.lr_vision, t.lr_projector, t.freeze, t.batch_size) == (1e-5, 2e-5, 1e-5, (), 128)
  assert t.num_steps == 6089   # one epoch of 779,289 samples at 128 per step
  assert config.data.max_length == 4096 and tuple(config.model.m3.scales) == (576, 144, 36, 9, 1)
  released = m3_config.load("llava_next_7b_m3:released,init=ckpt/next")
  assert released.train.freeze == ("vision",) and released.checkpoint.init_from == "ckpt/next"
  trainer = TrainStep(config)   # shapes only
  assert trainer.batch_ndim["pixels"] == 5 and trainer.batch_ndim["anyres_index_576"] == 2
  state = trainer.abstract_state()
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
  assert n_params == 7_063_431_168   # llava-v1.6-vicuna-7b-hf (tests/models/test_anyres.py)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
  per_device = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree_util.tree_leaves(state))
  assert per_device < 1.01 * total / 8, (per_device, total)
