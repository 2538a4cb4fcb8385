"""A pod run's workdir on an object store (gs://...): the trainer, its checkpoints, config.json, metrics.jsonl and
TensorBoard events, a resume, the probe data and an eval --out folder all go through etils.epath, and nothing
creates a local folder named `gs:`.

There is no bucket here: `gs://` is served by a local folder through the same code a pod runs: etils.epath's fsspec
backend (an fsspec "gcs" filesystem over a temporary folder), orbax's GCS code path (commit_success.txt, no rename)
and tensorstore (its kvstore spec for a gs:// path points into that folder)."""
from __future__ import annotations

import os
import struct

import fsspec
import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

from m3_jax import sharding as shd
from m3_jax.checkpoint import workdir as workdir_lib
from m3_jax.train import loop
from m3_jax.train.metrics import read_metrics
from m3_jax.train.state import TrainStep

from train_testlib import FAST_COMPILE, small_config

RUN = "gs://bucket/runs/m3"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket/... served from tmp_path/store/bucket/...; the test runs in tmp_path/cwd."""
  root = tmp_path / "store"
  root.mkdir()

  class LocalGCS(DirFileSystem):
    protocol = ("gs", "gcs")
    cachable = False

    def __init__(self, *args, **kwargs):
      super().__init__(path=str(root), fs=LocalFileSystem())

  for name in ("gcs", "gs"):
    fsspec.register_implementation(name, LocalGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # needs google-cloud
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda path: {"driver": "file", "path": str(root / path.removeprefix("gs://"))})
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  assert os.listdir(cwd) == [], f"files written relative to the working folder: {os.listdir(cwd)}"


def tensorboard_tags(folder) -> dict[str, list[int]]:
  """{tag: steps} of every event file in `folder` (the TFRecord framing read by hand: no TensorFlow here)."""
  from tensorboardX.proto import event_pb2
  tags: dict[str, list[int]] = {}
  for f in sorted(os.listdir(folder)):
    data = open(os.path.join(folder, f), "rb").read()
    at = 0
    while at < len(data):
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      at += 12 + n + 4
      for v in event.summary.value:
        tags.setdefault(v.tag, []).append(int(event.step))
  return tags


def test_training_run_in_an_object_store_workdir(bucket):
  config = small_config(**{"train.num_steps": 4, "checkpoint.every": 2})
  trainer = TrainStep(config, mesh=shd.make_mesh((1, 1, 1), jax.devices()[:1]), compiler_options=FAST_COMPILE)
  summary = loop.fit(trainer, RUN, progress=False)
  assert summary["step"] == 4
  local = bucket / "bucket" / "runs" / "m3"
  assert workdir_lib.steps(RUN) == [2, 4]
  assert (local / "checkpoints" / "4" / "commit_success.txt").exists()   # orbax took its object-store path
  assert workdir_lib.read_config(RUN)["train"]["num_steps"] == 4
  assert sorted(read_metrics(RUN)) == [1, 2, 3, 4]
  tags = tensorboard_tags(local / "tb")
  assert tags["loss"] == [1, 2, 3, 4] and tags["loss/scale_9"] == [1, 2, 3, 4]
  assert "config/text_summary" in tags

  # A resume reads the checkpoint back from the bucket and appends to its metrics.jsonl.
  config.train.num_steps = 6
  assert loop.fit(trainer, RUN, progress=False)["step"] == 6
  assert workdir_lib.steps(RUN) == [2, 4, 6]
  assert sorted(read_metrics(RUN)) == [1, 2, 3, 4, 5, 6]
  assert tensorboard_tags(local / "tb")["loss"] == [1, 2, 3, 4, 5, 6]
  params = workdir_lib.load_params(RUN, 6)
  _, state, _ = workdir_lib.Checkpoints(RUN).restore(trainer.abstract_state(), step=6)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_probe_data_and_eval_out_folder_in_an_object_store(bucket, monkeypatch):
  from m3_jax.data import probe
  from m3_jax.eval import evaluator, predictions
  from m3_jax.eval.tasks.base import Sample, Task
  probe.build("gs://bucket/data", sizes={"train": 3, "validation": 2, "test": 2})
  found = probe.built("gs://bucket/data")
  assert list(found) == ["binding_s0_3_2_2"] and found["binding_s0_3_2_2"].startswith("gs://bucket/data/probe/")
  assert (bucket / "bucket" / "data" / "probe" / "binding_s0_3_2_2").is_dir()
  source = probe.open_built("gs://bucket/data").as_data_source("validation")   # read from a local copy
  assert len(source) == 2 and source[0]["image"].shape == (probe.IMAGE_SIZE, probe.IMAGE_SIZE, 3)
  # Training with data.probe_size unset reads that probe, as for a local path (not the default sizes beside it).
  from m3_jax.configs import base as m3_config
  from m3_jax.data import pipeline, sources
  config = m3_config.load("tiny")
  config.data.path, config.data.probe_size = "gs://bucket/data", 0
  made = {}
  monkeypatch.setattr(sources, "Probe", lambda path, split, **kw: made.update(kw, path=path))
  pipeline.source_for(config)
  assert made["path"] == "gs://bucket/data" and made["sizes"] == {"train": 3, "validation": 2, "test": 2}

  class Echo(Task):
    name = "echo"

    def samples(self, path):
      return iter(())

    def score(self, sample, prediction):
      return float(prediction == sample.answers)

  samples = [Sample(question_id=str(i), prompt=f"q{i}", answers=str(i)) for i in range(3)]
  out = "gs://bucket/evals/echo"
  summary = evaluator.evaluate(lambda chunk, scale: [s.answers if scale == 9 else "x" for s in chunk], Echo(),
                               samples, [9, 1], out, batch_size=2, progress=False)
  assert summary["scales"]["9"]["accuracy"] == 1.0 and summary["scales"]["1"]["accuracy"] == 0.0
  lines = predictions.read(predictions.predictions_file(out), predictions.EVAL_FIELDS)
  assert sorted((r["question_id"], r["scale"]) for r in lines) == sorted((str(i), s) for s in (9, 1) for i in range(3))
  assert predictions.read_summary(out)["num_samples"] == 3
  # A resume answers nothing again: every (question, scale) is in the bucket's predictions.jsonl.
  evaluator.evaluate(lambda chunk, scale: pytest.fail("answered again"), Echo(), samples, [9, 1], out,
                     progress=False)

