"""Granularity probe: determinism, balance, the designed pooled values, the TFDS build and the pooled-pixel table."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from m3_jax.data import probe


def test_deterministic_and_seeded():
  a, b = probe.example(0, "train", 17), probe.example(0, "train", 17)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["question"] == b["question"] and a["answer"] == b["answer"]
  other = [probe.example(1, "train", i)["image"] for i in range(8)]
  assert any((o != probe.example(0, "train", i)["image"]).any() for i, o in enumerate(other))
  assert probe.example(0, "test", 17)["id"] == "test-17"


@pytest.mark.parametrize("family_set", ["binding", "presence"])
def test_family_balance_and_answers(family_set):
  exs = [probe.example(0, "train", i, family_set) for i in range(600)]
  fams = collections.Counter(e["family"] for e in exs)
  assert fams == {f: 150 for f in probe.FAMILY_SETS[family_set]}
  answers = collections.Counter(e["answer"] for e in exs)
  assert set(answers) == set(probe.answers(family_set)) and min(answers.values()) > 600 / 6 * 0.6
  for e in exs[:8]:
    assert e["scale"] == probe.needed_scale(e["family"]) and e["image"].dtype == np.uint8
  from m3_jax.data.tokenizer import probe_tokenizer
  tok = probe_tokenizer()
  for e in exs[:8]:   # every probe word is in the tiny tokenizer's vocabulary
    assert tok.unk_token_id not in tok(e["question"] + " " + e["answer"])["input_ids"]


def test_reply_restates_the_key_for_binding():
  e = probe.example(0, "train", 1)
  key = e["question"].removeprefix("what colour is next to the ").removesuffix("?")
  assert e["reply"] == f"{key} {e['answer']}" and probe.conversation(e)[1]["value"] == e["reply"]
  p = probe.example(0, "train", 1, "presence")
  assert p["reply"] == p["answer"]


def test_binding_layout_hand_worked():
  # 'patches': four 4 px objects fill one 8 px cell; each is 1 px stripes key, value, key, value.
  for i in range(3, 40, 4):
    e = probe.example(2, "validation", i)
    assert e["family"] == "patches"
    img = e["image"].astype(int)
    obj = np.argwhere((img != 255).any(-1))
    (y0, x0), (y1, x1) = obj.min(0), obj.max(0)
    assert (y1 - y0, x1 - x0) == (7, 7) and y0 % 8 == 0 and x0 % 8 == 0
    key = e["question"].removeprefix("what colour is next to the ").removesuffix("?")
    # The object with the asked key: its even columns are the key, its odd columns the answer.
    hits = [(y, x) for y in (y0, y0 + 4) for x in (x0, x0 + 4) if tuple(img[y, x]) == probe.KEYS[key]]
    assert len(hits) == 1
    y, x = hits[0]
    assert (img[y:y + 4, x + 1:x + 4:2] == probe.VALUES[e["answer"]]).all()
    # Pooled to 36 tokens, the four objects share one token: its mean is the same whichever key is asked.
    cell = probe.pooled(e["image"][None], 36)[0, (y0 // 8) * 6 + x0 // 8]
    keys_mean = np.mean([probe.KEYS[k] for k in probe.KEYS], 0)
    np.testing.assert_allclose(cell[0], keys_mean[0] / 2, atol=1e-4)


def test_non_square_binding_layout_hand_worked():
  # aspects 1:1, 2:1, 1:2 (W:H): example i has family i % 4 and aspect (i // 4) % 3, on a (48 H) x (48 W) canvas.
  shapes = {(1, 1): (48, 48), (2, 1): (48, 96), (1, 2): (96, 48)}
  seen_right_or_low = collections.Counter()
  for i in range(96):
    e = probe.example(4, "train", i, aspects="1:1,2:1,1:2")
    aspect = [(1, 1), (2, 1), (1, 2)][(i // 4) % 3]
    assert e["family"] == ["whole", "blocks", "tiles", "patches"][i % 4]
    assert e["image"].shape == (*shapes[aspect], 3)
    img = e["image"].astype(int)
    side = probe.BINDING[e["family"]][1]
    painted = (img != 255).any(-1)
    if e["family"] == "whole":  # one object fills the whole canvas
      assert painted.all()
      continue
    # Every object is a side x side square on the side grid; blocks: 4 of the 3W x 3H cells, anywhere on the
    # canvas; tiles / patches: the 4 quadrants of one cell of twice the side.
    cells = {(y // side, x // side) for y, x in np.argwhere(painted)}
    assert len(cells) == 4 and painted.sum() == 4 * side * side, (i, cells)
    if e["family"] != "blocks":
      ys, xs = zip(*cells)
      assert max(ys) - min(ys) == 1 and max(xs) - min(xs) == 1 and min(ys) % 2 == 0 and min(xs) % 2 == 0
    if max(max(c) for c in cells) * side >= 48:
      seen_right_or_low[e["family"]] += 1
    key = e["question"].removeprefix("what colour is next to the ").removesuffix("?")
    hits = [(y, x) for y, x in cells if tuple(img[y * side, x * side]) == probe.KEYS[key]]
    assert len(hits) == 1
    y, x = hits[0]
    assert (img[y * side:(y + 1) * side, x * side + 1:(x + 1) * side:2] == probe.VALUES[e["answer"]]).all()
  # the families are laid over the whole canvas, not only its first 48 px square
  assert set(seen_right_or_low) == {"blocks", "tiles", "patches"}, seen_right_or_low
  with pytest.raises(ValueError, match="presence families are square only"):
    probe.example(0, "train", 4, "presence", aspects="1:1,2:1")


def test_presence_answer_is_gone_below_the_family_scale():
  # Hand-worked pooled values: a pair (c, 255 - c) sharing a coarser cell averages to (255 + 2 * 128) / 4 = 127.75
  # (small in a 16 px cell, tiny in an 8 px cell); 'big' pooled to one token: (16*16*255 + 7*256*128) / 2304.
  for i in range(40):
    e = probe.example(3, "validation", i, "presence")
    fam, c = e["family"], np.array(probe.COLOURS[e["answer"]], np.float32)
    img = e["image"][None]
    need = probe.needed_scale(fam)
    if fam == "colour":
      np.testing.assert_array_equal(probe.pooled(img, 1)[0, 0], c)
      continue
    below = {9: 1, 36: 9, 144: 36}[need]
    values = np.unique(probe.pooled(img, below)[0])
    expected = {1: [(256 * 255 + 7 * 256 * 128) / 2304], 9: [127.75, 128.0], 36: [127.75, 128.0]}[below]
    np.testing.assert_allclose(values, expected, atol=1e-4)
    at = probe.pooled(img, need)[0]
    hits = at[(at != 128).any(-1)]
    np.testing.assert_array_equal(np.sort(hits, axis=0), np.sort(np.stack([c, 255 - c]), axis=0))


def test_tfds_build_and_data_source(tmp_path):
  b = probe.build(str(tmp_path), seed=5, sizes=dict(train=12, validation=4, test=4))
  ds = b.as_data_source("train")
  assert len(ds) == 12 and len(b.as_data_source("test")) == 4
  rec = ds[0]
  i = int(rec["id"].decode().split("-")[1])
  ref = probe.example(5, "train", i)
  np.testing.assert_array_equal(rec["image"], ref["image"])
  assert rec["answer"].decode() == ref["answer"] and rec["family"].decode() == ref["family"]


@pytest.mark.parametrize("family_set", ["binding", "presence"])
def test_pooled_pixel_table_shows_the_designed_staircase(family_set):
  from benchmarks.probe_pooled_pixels import table
  t = table(n_train=400, n_test=60, seed=0, family_set=family_set)
  for fam, accs in t.items():
    need = probe.needed_scale(fam)
    for s, acc in accs.items():
      if s >= need:
        assert acc >= 0.95, (fam, s, acc)
      else:
        assert acc < 0.45, (fam, s, acc)  # chance 1/6; 1/4 when the four values are known but not bound


def test_training_reads_the_probe_built_there_instead_of_building_the_default_beside_it(tmp_path):
  """`m3 data probe --out DIR --train N` then `m3 train --config.data.path=DIR`: with data.probe_size unset the
  pipeline reads that probe (it used to build a 4000-example default probe beside it, silently); two probes of the
  same seed, families and aspects are refused by name; probe_size still chooses explicitly."""
  import ml_collections
  from m3_jax.data import pipeline
  probe.build(str(tmp_path), sizes={"train": 24, "validation": 8, "test": 8})
  config = ml_collections.ConfigDict({"data": {"source": "probe", "path": str(tmp_path), "seed": 0}})
  assert len(pipeline.source_for(config, split="train")) == 24
  assert len(pipeline.source_for(config, split="test")) == 8
  assert probe.built_sizes(str(tmp_path), aspects="1:1") == {"train": 24, "validation": 8, "test": 8}
  assert probe.built_sizes(str(tmp_path), aspects="1:1,2:1") is None  # other aspects: not this probe
  probe.build(str(tmp_path), sizes={"train": 16, "validation": 8, "test": 8})
  with pytest.raises(ValueError, match="binding_s0_16_8_8.*binding_s0_24_8_8|binding_s0_24_8_8.*binding_s0_16_8_8"):
    pipeline.source_for(config, split="train")
  config.data.probe_size = 40  # explicit: that size (validation and test a tenth), built on first use
  assert len(pipeline.source_for(config, split="train")) == 40
