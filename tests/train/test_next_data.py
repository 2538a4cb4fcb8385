"""LLaVA-NeXT training data: truncation counts the sample's own largest-scale visual tokens, bad input (crops over the
largest bucket, a pinpoint that is not a multiple of the crop, visual tokens over data.max_length) is a clear error
naming the record and the value, or a counted skip reported by id; a run compiles few programs."""
from __future__ import annotations

import numpy as np
import pytest

from m3_jax import geometry
from m3_jax.configs import base as m3_config
from m3_jax.data import pipeline, probe
from m3_jax.data.errors import BadRecord
from m3_jax.data.tokenizer import probe_tokenizer


def preprocess(**overrides):
  config = m3_config.load("tiny:next", [f"{k}={v}" for k, v in overrides.items()])
  return pipeline.preprocess_for(config, probe_tokenizer())


def record(rid: str, hw, words: int = 0):
  ex = probe.example(0, "train", 1)
  turns = [{"from": "human", "value": "<image>\n" + ex["question"]}, {"from": "gpt", "value": ex["reply"]}]
  if words:   # a second, long turn that truncation may cut
    turns += [{"from": "human", "value": "what colour" * words}, {"from": "gpt", "value": ex["reply"]}]
  return {"id": rid, "image": np.zeros((*hw, 3), np.uint8), "conversations": turns}


def test_truncation_counts_the_samples_own_visual_tokens():
  pre = preprocess()
  assert pre.crop_buckets == (2, 3, 5) and pre.max_length == 512
  wide = pre.example(record("wide", (48, 96), words=200))        # 1x2 grid: 144 + 12 * 25 = 444 visual tokens
  square = pre.example(record("square", (48, 48), words=200))    # 1x1 grid: 144 + 12 * 13 = 300
  assert len(wide["input_ids"]) == 512 - 443 and len(square["input_ids"]) == len(wide["input_ids"]) + 144
  assert len(pre.example(record("whole", (48, 96)))["input_ids"]) < 512 - 443   # short: nothing cut
  assert geometry.visual_tokens((48, 96), 144, pre.grid_pinpoints, "hw", 48) == 444
  assert wide["crops"].shape == (3, 48, 48, 3) and tuple(wide["image_hw"]) == (48, 96)


def test_bad_next_inputs_name_the_record_and_the_value():
  pre = preprocess(**{"data.crop_buckets": "(2, 3)"})
  with pytest.raises(BadRecord, match=r"big.*image \(h, w\) = \(96, 96\) gives 5 crops \(a 2x2 grid and the base\), "
                                      r"more than the largest crop bucket 3 \(data.crop_buckets=\[2, 3\]\)"):
    pre.example(record("big", (96, 96)))
  pre = preprocess(**{"data.max_length": 256})
  with pytest.raises(BadRecord, match=r"wide.*image \(h, w\) = \(48, 96\) \(1x2 crops\) takes 444 visual tokens at "
                                      r"scale 144, more than data.max_length 256 before any text"):
    pre.example(record("wide", (48, 96)))
  with pytest.raises(geometry.AnyresError, match=r"model.anyres.grid_pinpoints=\[\[48, 48\], \[48, 100\]\]: "
                                                 r"pinpoint \[48, 100\] is not a positive multiple of the crop size 48"):
    preprocess(**{"model.anyres.grid_pinpoints": "((48, 48), (48, 100))"})


def test_skipped_next_records_are_counted_by_id_and_batches_use_few_programs():
  pre = preprocess(**{"data.max_length": 400})   # 48x96 and 96x48 (444 and 456 visual tokens) do not fit
  records = [record(f"r{i}", hw, words=i % 5) for i, hw in
             enumerate([(48, 48), (48, 96), (48, 48), (96, 48), (48, 48), (48, 48), (96, 96), (48, 48)])]
  bad = pipeline.BadRecords("skip")
  ds = pipeline.make_dataset(records, pre, batch_size=2, shuffle=False, num_epochs=1, process_index=0,
                             process_count=1, bad_records=bad, prefetch=0, drop_remainder=False)
  batches = list(ds)
  assert bad.skipped == 3 and sorted(bad.seen) == ["r1", "r3", "r6"]
  assert "takes 444 visual tokens at scale 144" in bad.seen["r1"]
  assert [b["pixels"].shape[1] for b in batches] == [2, 2, 2]           # every kept image is 1x1: bucket 2
  # Programs: one per (text bucket, crop bucket); text buckets halve from max_length (5 of them for NeXT).
  shapes = {(b["input_ids"].shape[1], b["pixels"].shape[1]) for b in batches}
  assert pipeline.default_buckets(400, n=5) == (32, 56, 104, 200, 400)
  assert shapes == {(56, 2), (104, 2)}, shapes
  assert {k: v.shape for k, v in batches[0].items() if k.startswith("anyres")} == {
      "anyres_index_144": (2, 300), "anyres_index_36": (2, 78), "anyres_index_9": (2, 21), "anyres_index_1": (2, 3)}
  # Several processes: every host pads to the largest text and crop bucket, so the hosts' arrays are one global
  # batch of one shape (per-host buckets would differ between hosts).
  for pi in range(2):
    hosts = list(pipeline.make_dataset(records, pre, batch_size=1, shuffle=False, num_epochs=1, process_index=pi,
                                       process_count=2, bad_records=pipeline.BadRecords("skip"), prefetch=0))
    assert {(b["input_ids"].shape[1], b["pixels"].shape[1]) for b in hosts} == {(400, 5)}
    assert len({tuple(v.shape for k, v in sorted(b.items())) for b in hosts}) == 1
