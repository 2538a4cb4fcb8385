"""grain pipeline: host sharding covers every record once, resume replays the same batches, bad records,
bucketed padding, global arrays on a mesh, and the trainer's entry point on the probe."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from m3_jax.data import image as image_lib
from m3_jax.data import pipeline, sources
from m3_jax.data.errors import BadRecord

WORDS = ["red", "green", "blue", "two", "cats"]


def _records(n, image=False):
  return [{"id": f"r{i}", "conversations": [
      {"from": "human", "value": ("<image>\n" if image else "") + "what colour " * (1 + i % 5) + "?"},
      {"from": "gpt", "value": WORDS[i % 5]}], **({"image": f"{i % 3}.png"} if image else {})}
      for i in range(n)]


@pytest.fixture
def llava_json(tmp_path):
  for k in range(3):
    Image.new("RGB", (30 + 10 * k, 20), (40 * k, 100, 200)).save(tmp_path / f"{k}.png")
  path = tmp_path / "data.json"
  path.write_text(json.dumps(_records(21, image=True)))
  return path


def _pre(tok, max_length=64):
  return pipeline.Preprocess(tokenizer=tok, image_cfg=image_lib.ImageProcessorConfig.for_size(48), image_token_id=4,
                             template="llava_hf", max_length=max_length, max_scale=9)


def test_host_shards_cover_every_record_once(word_tokenizer, llava_json):
  src = sources.LlavaJson(llava_json)
  seen = []
  for pi in range(3):
    ds = pipeline.make_dataset(src, _pre(word_tokenizer), batch_size=2, seed=1, num_epochs=1, process_index=pi,
                               process_count=3, pad_id=3, drop_remainder=False, prefetch=0, keep_ids=True)
    ids = [i for b in ds for i in b["id"].tolist()]
    assert len(ids) == 7  # 21 records over 3 processes
    seen += ids
  assert sorted(seen) == sorted(f"r{i}" for i in range(21))


def test_batches_are_padded_to_buckets_and_labelled(word_tokenizer, llava_json):
  ds = pipeline.make_dataset(sources.LlavaJson(llava_json), _pre(word_tokenizer), batch_size=4, seed=0,
                             buckets=(16, 24, 32), pad_id=3, prefetch=0, keep_ids=True)
  b = next(iter(ds))
  assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape[1] in (16, 24, 32)
  assert b["pixels"].shape == (4, 48, 48, 3) and b["pixels"].dtype == np.float32 and b["has_image"].all()
  assert ((b["input_ids"] == 4).sum(1) == 1).all()
  lengths = b["attention_mask"].sum(1)
  assert b["input_ids"].shape[1] == min(x for x in (16, 24, 32) if x >= lengths.max())
  for row, rid in enumerate(b["id"]):
    i = int(rid[1:])
    trained = b["labels"][row][b["labels"][row] != -100]
    assert word_tokenizer.convert_ids_to_tokens(trained.tolist()) == [WORDS[i % 5], "</s>"]
    assert (b["input_ids"][row, lengths[row]:] == 3).all()
  # Pixels are what preprocessing gives for the record's image (LLaVA pad, CLIP normalisation).
  i = int(b["id"][0][1:])
  ref = image_lib.load_and_preprocess(llava_json.parent / f"{i % 3}.png", image_lib.ImageProcessorConfig.for_size(48))
  np.testing.assert_array_equal(b["pixels"][0], ref)


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_yields_the_same_batches(word_tokenizer, llava_json, workers):
  def make():
    return iter(pipeline.make_dataset(sources.LlavaJson(llava_json), _pre(word_tokenizer), batch_size=4, seed=3,
                                      pad_id=3, num_workers=workers, keep_ids=True))
  it = make()
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]   # crosses an epoch boundary (21 records, 4 per batch)
  again = make()
  again.set_state(state)
  for want in expected:
    got = next(again)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_bad_records_raise_or_skip(word_tokenizer, tmp_path, caplog):
  Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
  recs = _records(6, image=True)
  for r in recs:
    r["image"] = "ok.png"
  recs[1]["image"] = "missing.png"
  recs[3]["conversations"][1]["value"] = ""
  recs[4]["image"] = "../escape.png"
  path = tmp_path / "d.json"
  path.write_text(json.dumps(recs))
  src = sources.LlavaJson(path)
  with pytest.raises(BadRecord, match=r"record r\d: "):
    list(pipeline.make_dataset(src, _pre(word_tokenizer), batch_size=1, num_epochs=1, pad_id=3, prefetch=0))
  bad = pipeline.BadRecords("skip")
  ds = pipeline.make_dataset(src, _pre(word_tokenizer), batch_size=1, num_epochs=2, pad_id=3, prefetch=0,
                             keep_ids=True, bad_records=bad)
  with caplog.at_level("WARNING"):
    ids = [b["id"][0] for b in ds]
  assert sorted(ids) == ["r0", "r0", "r2", "r2", "r5", "r5"]
  assert bad.skipped == 6 and sorted(bad.seen) == ["r1", "r3", "r4"]
  assert "missing.png: file not found" in bad.seen["r1"] and "empty answer" in bad.seen["r3"]
  assert "escapes the image folder" in bad.seen["r4"]
  assert sum("skipping bad record" in m for m in caplog.messages) == 3  # each id logged once
  # With a report file (m3 train's WORKDIR/bad_records.jsonl): each id once, also across a resumed run.
  report = tmp_path / "bad_records.jsonl"
  for _ in range(2):
    list(pipeline.make_dataset(src, _pre(word_tokenizer), batch_size=1, num_epochs=2, pad_id=3, prefetch=0,
                               bad_records=pipeline.BadRecords("skip", report=report)))
  rows = [json.loads(line) for line in report.read_text().splitlines()]
  assert sorted(r["id"] for r in rows) == ["r1", "r3", "r4"]
  assert "empty answer" in next(r["problem"] for r in rows if r["id"] == "r3")
  # A run killed in the middle of appending left a blank line and a cut last line: the next run resumes, passes
  # over them, and reports the record whose entry was cut again.
  lines = report.read_text().splitlines()
  report.write_text("\n".join(lines[:2]) + "\n\n" + lines[2][:15])
  with caplog.at_level("WARNING"):
    list(pipeline.make_dataset(src, _pre(word_tokenizer), batch_size=1, num_epochs=1, pad_id=3, prefetch=0,
                               bad_records=pipeline.BadRecords("skip", report=report)))
  assert any("not a whole report entry" in m for m in caplog.messages)
  assert sorted(json.loads(line)["id"] for line in report.read_text().splitlines()) == ["r1", "r3", "r4"]


def test_a_record_whose_image_would_pad_past_the_limit_is_bad_by_its_id(word_tokenizer, tmp_path):
  import dataclasses
  Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
  Image.new("RGB", (101, 1)).save(tmp_path / "thin.png")   # 101 pixels, padded to 101 x 101 = 10201
  recs = _records(2, image=True)
  recs[0]["image"], recs[1]["image"] = "ok.png", "thin.png"
  (tmp_path / "d.json").write_text(json.dumps(recs))
  bad = pipeline.BadRecords("skip")
  ds = pipeline.make_dataset(sources.LlavaJson(tmp_path / "d.json"),
                             dataclasses.replace(_pre(word_tokenizer), max_pixels=10_000), batch_size=1,
                             num_epochs=1, pad_id=3, prefetch=0, keep_ids=True, bad_records=bad)
  assert [b["id"][0] for b in ds] == ["r0"]
  assert list(bad.seen) == ["r1"] and "101x1: LLaVA-1.5's preprocessing pads it to a 101x101 square" in bad.seen["r1"]


def test_a_pipeline_batch_shards_over_the_mesh(word_tokenizer, llava_json):
  from m3_jax import sharding
  mesh = sharding.make_mesh((4, 2, 1), jax.devices()[:8])
  b = next(iter(pipeline.make_dataset(sources.LlavaJson(llava_json), _pre(word_tokenizer), batch_size=8,
                                      pad_id=3, prefetch=0)))
  g = sharding.shard_batch(b, mesh)
  assert g["pixels"].shape == (8, 48, 48, 3) and g["input_ids"].sharding.spec[0] == ("data", "fsdp")
  assert len(g["labels"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(g["labels"]), b["labels"])


def test_train_iterator_on_the_probe(tmp_path):
  from m3_jax.configs import base as cfg_lib
  config = cfg_lib.load("configs/tiny.py")
  config.data.source, config.data.path = "probe", str(tmp_path / "probe")
  config.train.batch_size = 8
  config.data.probe_size = 40
  it = pipeline.train_iterator(config, tmp_path / "work")
  b = next(it)
  assert b["input_ids"].shape[0] == 8 and b["pixels"].shape == (8, 48, 48, 3)
  # tiny config: 256 max length, 144 visual tokens -> 113 text ids; the vicuna prompt needs ~40.
  # Binding families reply "{key} {value}": three labelled tokens with </s>.
  assert b["input_ids"].shape[1] <= 113 and (b["labels"] != -100).sum(1).tolist() == [3] * 8
  assert (tmp_path / "work" / "preprocessor_config.json").exists()
  assert (tmp_path / "work" / "tokenizer" / "tokenizer.json").exists()
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(str(tmp_path / "work" / "tokenizer"))
  replies = [tok.convert_ids_to_tokens(row[row != -100].tolist()) for row in b["labels"]]
  from m3_jax.data import probe
  assert {r[0] for r in replies} <= set(probe.KEYS) and {r[1] for r in replies} <= set(probe.answers())
  assert {r[2] for r in replies} == {"</s>"} and len(tok) <= 256


def test_a_record_cut_at_max_length_is_said_by_id(word_tokenizer, tmp_path, caplog):
  """A record longer than max_length is trained on with its end cut (its first answer survives): not silently."""
  recs = _records(2)
  recs[1]["conversations"] += [{"from": "human", "value": "what colour " * 40 + "?"},
                               {"from": "gpt", "value": "red"}]   # a second exchange of 80+ words: cut at 64
  path = tmp_path / "d.json"
  path.write_text(json.dumps(recs))
  bad = pipeline.BadRecords("raise")
  with caplog.at_level("WARNING"):
    batches = list(pipeline.make_dataset(sources.LlavaJson(path), _pre(word_tokenizer), batch_size=1, num_epochs=2,
                                         pad_id=3, prefetch=0, keep_ids=True, bad_records=bad))
  assert sorted(b["id"][0] for b in batches) == ["r0", "r0", "r1", "r1"]   # both trained on
  assert bad.truncated == {"r1"}
  assert sum("record r1 is longer than data.max_length" in m for m in caplog.messages) == 1   # once per id


def test_a_record_over_max_label_tokens_is_a_bad_record_named_by_id(word_tokenizer, tmp_path):
  """train.max_label_tokens fixes the labelled positions per row: a record with more is refused by its id before
  batching (and skippable), instead of stopping the run mid-training naming a batch row."""
  recs = _records(2)
  recs[1]["conversations"][1]["value"] = "red green blue two cats red green"   # 7 words + EOS labelled
  path = tmp_path / "d.json"
  path.write_text(json.dumps(recs))
  pre = pipeline.Preprocess(tokenizer=word_tokenizer, image_cfg=image_lib.ImageProcessorConfig.for_size(48),
                            image_token_id=4, template="llava_hf", max_length=64, max_scale=9, max_label_tokens=4)
  with pytest.raises(BadRecord, match=r"record r1: 8 labelled tokens, more than train.max_label_tokens=4"):
    list(pipeline.make_dataset(sources.LlavaJson(path), pre, batch_size=1, num_epochs=1, pad_id=3, prefetch=0))
  bad = pipeline.BadRecords("skip")
  kept = list(pipeline.make_dataset(sources.LlavaJson(path), pre, batch_size=1, num_epochs=1, pad_id=3, prefetch=0,
                                    keep_ids=True, bad_records=bad))
  assert [b["id"][0] for b in kept] == ["r0"] and list(bad.seen) == ["r1"]
