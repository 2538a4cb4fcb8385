"""The probe task reads the probe it is pointed at, as built (seed and sizes), or refuses; it never builds one. The
router's calibration (validation) and test splits of another seed depend on it."""
from __future__ import annotations

import pytest

from m3_jax.data import probe
from m3_jax.eval.tasks import get_task
from m3_jax.eval.tasks.common import TaskDataError


def test_probe_task_reads_the_built_seed_and_sizes(tmp_path):
  probe.build(str(tmp_path), seed=7, sizes=dict(train=4, validation=6, test=5))
  got = list(get_task("probe", split="validation").samples(str(tmp_path)))
  assert [s.question_id for s in got] == [f"validation-{i}" for i in range(6)]
  assert [s.answers for s in got] == [probe.example(7, "validation", i)["answer"] for i in range(6)]
  assert [s.category for s in got] == ["whole", "blocks", "tiles", "patches", "whole", "blocks"]
  assert len(list(get_task("probe").samples(str(tmp_path)))) == 5
  assert probe.built(str(tmp_path)).keys() == {"binding_s7_4_6_5"}  # nothing else was generated


def test_probe_task_refuses_an_empty_folder_and_an_ambiguous_one(tmp_path):
  with pytest.raises(TaskDataError, match=f"{tmp_path}: no granularity probe built there .*m3 data probe --out"):
    list(get_task("probe").samples(str(tmp_path)))
  assert not (tmp_path / "probe").exists()
  probe.build(str(tmp_path), seed=1, sizes=dict(train=1, validation=1, test=2))
  probe.build(str(tmp_path), seed=2, sizes=dict(train=1, validation=1, test=3))
  with pytest.raises(TaskDataError, match=r"holds 2 probes \(binding_s1_1_1_2, binding_s2_1_1_3\); choose one with "
                                          r"--task-option config=NAME"):
    list(get_task("probe").samples(str(tmp_path)))
  assert len(list(get_task("probe", config="binding_s2_1_1_3").samples(str(tmp_path)))) == 3
  with pytest.raises(TaskDataError, match="no probe 'nope' built there; it holds binding_s1_1_1_2, binding_s2_1_1_3"):
    list(get_task("probe", config="nope").samples(str(tmp_path)))
  with pytest.raises(ValueError, match="probe split 'dev' is not one of train, validation, test"):
    get_task("probe", split="dev")
