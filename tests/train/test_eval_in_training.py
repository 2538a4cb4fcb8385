"""Evaluation during training (train.eval_every): the probe's held-out split at every trained scale on the current
params, in-process, logged as eval/probe/scale_N to metrics.jsonl and TensorBoard; its scores equal an `m3 eval`
style evaluation of the step's checkpoint."""
from __future__ import annotations

import jax
import numpy as np

from m3_jax import sharding as shd
from m3_jax.checkpoint import reader, workdir as workdir_lib
from m3_jax.data import probe
from m3_jax.data.tokenizer import probe_tokenizer
from m3_jax.eval import evaluator, training
from m3_jax.eval.loader import M3Model
from m3_jax.eval.tasks import get_task
from m3_jax.train import loop
from m3_jax.train.metrics import read_metrics
from m3_jax.train.state import TrainStep

from test_pod_paths import tensorboard_tags
from train_testlib import FAST_COMPILE, small_config


def test_eval_every_logs_per_scale_scores_equal_to_evaluating_the_checkpoint(tmp_path):
  data = tmp_path / "probe"
  probe.build(str(data), sizes={"train": 4, "validation": 4, "test": 4})
  config = small_config(**{"train.num_steps": 3, "checkpoint.every": 1, "train.eval_every": 2,
                           "train.eval_data": repr(str(data)), "train.eval_limit": 3,
                           "train.eval_max_new_tokens": 2})
  wd = tmp_path / "run"
  trainer = TrainStep(config, mesh=shd.make_mesh((1, 1, 1), jax.devices()[:1]), compiler_options=FAST_COMPILE)
  real = training.callback(config, wd)
  calls = []

  def on_eval(step, params):
    calls.append((step, jax.tree.map(np.asarray, params)))
    return real(step, params)

  loop.fit(trainer, wd, progress=False, on_eval=on_eval)
  assert [step for step, _ in calls] == [2, 3]   # every eval_every steps and at the last step
  # The params evaluated are the step's own (no checkpoint round trip, but the same numbers).
  for a, b in zip(jax.tree_util.tree_leaves(calls[1][1]), jax.tree_util.tree_leaves(workdir_lib.load_params(wd, 3))):
    np.testing.assert_array_equal(a, np.asarray(b))
  records = read_metrics(wd)
  logged = {s: records[3][f"eval/probe/scale_{s}"] for s in (9, 1)}
  assert set(records[2]) >= {"eval/probe/scale_9", "eval/probe/scale_1", "loss"}
  assert "eval/probe/scale_9" not in records[1]
  tags = tensorboard_tags(wd / "tb")
  assert tags["eval/probe/scale_9"] == [2, 3] and tags["eval/probe/scale_1"] == [2, 3]

  # The same samples evaluated from the step-3 checkpoint, as `m3 eval` would.
  workdir_lib.write_processor(wd, probe_tokenizer(), {})
  ckpt = reader.read_checkpoint(wd, 3)
  ckpt.preprocessor = None
  task = get_task("probe", split="validation")
  samples = list(task.samples(str(data)))[:3]
  generate, _ = evaluator.model_functions(M3Model(ckpt), max_new_tokens=2, batch_size=3)
  summary = evaluator.evaluate(generate, task, samples, [9, 1], tmp_path / "eval", batch_size=3, progress=False)
  assert logged == {s: summary["scales"][str(s)]["accuracy"] for s in (9, 1)}


def test_eval_options_are_key_value_pairs():
  assert training.options("split=validation, config=binding_s0_4_4_4") == {"split": "validation",
                                                                            "config": "binding_s0_4_4_4"}
  assert training.options("") == {}
  try:
    training.options("split")
  except ValueError as e:
    assert "train.eval_options='split': 'split' is not KEY=VALUE" in str(e)
  else:
    raise AssertionError("no error")
