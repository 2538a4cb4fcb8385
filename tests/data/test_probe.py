"""Granularity probe: determinism, balance, the designed pooled values, the TFDS build and the pooled-pixel table."""
from __future__ import annotations

import collections

import numpy as np

from m3_jax.data import probe


def test_deterministic_and_seeded():
  a, b = probe.example(0, "train", 17), probe.example(0, "train", 17)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["question"] == b["question"] and a["answer"] == b["answer"]
  other = [probe.example(1, "train", i)["image"] for i in range(8)]
  assert any((o != probe.example(0, "train", i)["image"]).any() for i, o in enumerate(other))
  assert probe.example(0, "test", 17)["id"] == "test-17"


def test_family_balance_and_answers():
  exs = [probe.example(0, "train", i) for i in range(600)]
  fams = collections.Counter(e["family"] for e in exs)
  assert fams == {f: 150 for f in probe.FAMILY_NAMES}
  answers = collections.Counter(e["answer"] for e in exs)
  assert set(answers) == set(probe.ANSWERS) and min(answers.values()) > 600 / 6 * 0.6
  for e in exs[:8]:
    assert e["scale"] == probe.FAMILIES[e["family"]][0] and e["image"].dtype == np.uint8


def test_answer_is_gone_below_the_family_scale():
  # Hand-worked pooled values: a pair (c, 255 - c) sharing a coarser cell averages to (255 + 2 * 128) / 4 = 127.75
  # (small in a 16 px cell, tiny in an 8 px cell); 'big' pooled to one token: (16*16*255 + 7*256*128) / 2304.
  for i in range(40):
    e = probe.example(3, "validation", i)
    fam, c = e["family"], np.array(probe.COLOURS[e["answer"]], np.float32)
    img = e["image"][None]
    need = probe.FAMILIES[fam][0]
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


def test_pooled_pixel_table_shows_the_designed_staircase():
  from benchmarks.probe_pooled_pixels import table
  t = table(n_train=150, n_test=60, seed=0)
  for fam, accs in t.items():
    need = probe.FAMILIES[fam][0]
    for s, acc in accs.items():
      if s >= need:
        assert acc == 1.0, (fam, s, acc)
      else:
        assert acc < 0.4, (fam, s, acc)  # chance is 1/6
