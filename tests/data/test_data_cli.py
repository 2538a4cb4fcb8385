"""`m3 data check` on every bad-record case, and `m3 data probe`."""
from __future__ import annotations

import json

from PIL import Image

from m3_jax import cli


def _turns(q="<image>\nwhat colour?", a="red"):
  return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_check_names_every_bad_record(tmp_path, capsys, word_tokenizer):
  imgs = tmp_path / "imgs"
  imgs.mkdir()
  Image.new("RGB", (10, 10)).save(imgs / "ok.png")
  (imgs / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  (tmp_path / "secret.png").write_bytes(b"")
  recs = [
      {"id": "good", "image": "ok.png", "conversations": _turns()},
      {"id": "text", "conversations": _turns(q="what colour?")},
      {"id": "missing", "image": "nope.png", "conversations": _turns()},
      {"id": "unreadable", "image": "broken.jpg", "conversations": _turns()},
      {"id": "escape", "image": "../secret.png", "conversations": _turns()},
      {"id": "absolute", "image": str(tmp_path / "secret.png"), "conversations": _turns()},
      {"id": "noturns", "image": "ok.png"},
      {"id": "malformed", "image": "ok.png", "conversations": ["hi", {"from": "gpt", "value": "x"}]},
      {"id": "gptfirst", "image": "ok.png", "conversations": _turns()[::-1]},
      {"id": "noimagetoken", "image": "ok.png", "conversations": _turns(q="what colour?")},
      {"id": "twoimages", "image": "ok.png", "conversations": _turns(q="<image> <image> what?")},
      {"id": "imagetokennoimage", "conversations": _turns()},
      {"id": "emptyanswer", "image": "ok.png", "conversations": _turns(a=" ")},
      {"id": "long", "image": "ok.png", "conversations": _turns(q="<image>\n" + "what colour " * 30 + "?")},
      {"id": "good", "image": "ok.png", "conversations": _turns()},
  ]
  path = tmp_path / "data.json"
  path.write_text(json.dumps(recs))
  tok_dir = tmp_path / "tok"
  word_tokenizer.save_pretrained(str(tok_dir))
  # 72 visual tokens + ~15 prompt tokens fit 100; the long question (~70 tokens) pushes the answer out.
  code = cli.main(["data", "check", str(path), "--image-folder", str(imgs), "--tokenizer", str(tok_dir),
                   "--max-length", "100", "--max-scale", "72", "--template", "llava_hf", "--json"])
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert code == 1
  assert (report["records"], report["with_image"], report["text_only"]) == (15, 13, 2)
  problems = {}
  for b in report["bad_records"]:
    problems.setdefault(b["id"], []).extend(b["problems"])
  expected = {
      "missing": "missing image", "unreadable": "unreadable image", "escape": "escapes the image folder",
      "absolute": "escapes the image folder", "noturns": "no turns", "malformed": "turn 0 is malformed",
      "gptfirst": "the first turn is from 'gpt'", "noimagetoken": "missing <image>", "twoimages": "extra <image>",
      "imagetokennoimage": "extra <image>", "emptyanswer": "empty answer", "long": "answer cut away by truncation",
      "good": "duplicate id",
  }
  assert set(problems) == set(expected)
  for rid, words in expected.items():
    assert any(words in p for p in problems[rid]), (rid, problems[rid])
  # Text output names the same records; a clean file exits 0.
  assert cli.main(["data", "check", str(path), "--image-folder", str(imgs)]) == 1
  out = capsys.readouterr().out
  assert "15 records: 13 with an image, 2 text-only" in out and "  escape: image path '../secret.png'" in out
  clean = tmp_path / "clean.json"
  clean.write_text(json.dumps(recs[:2]))
  assert cli.main(["data", "check", str(clean), "--image-folder", str(imgs)]) == 0


def test_probe_command(tmp_path, capsys):
  code = cli.main(["data", "probe", "--out", str(tmp_path), "--train", "8", "--validation", "4", "--test", "4"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert code == 0 and out["splits"] == {"train": 8, "validation": 4, "test": 4}


def test_check_counts_a_next_images_own_visual_tokens(tmp_path, word_tokenizer):
  """LLaVA-NeXT (llava-v1.6 pinpoints, 336-pixel crops): a 672x336 (w x h) image is a 1x2 grid, so at 576 tokens
  per crop it takes 576 (base) + 24 rows x (48 + 1 newline) = 1752 positions; at 9, 9 + 3 x (6 + 1) = 30."""
  from m3_jax.cli.data import check
  Image.new("RGB", (672, 336)).save(tmp_path / "wide.png")
  path = tmp_path / "data.json"
  path.write_text(json.dumps([{"id": "wide", "image": "wide.png", "conversations": _turns()}]))
  anyres = dict(grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)), order="hw", crop=336)
  report = check(str(path), str(tmp_path), tokenizer=word_tokenizer, max_length=1000, max_scale=576, anyres=anyres)
  assert report["bad_records"] == [{"id": "wide", "problems": [
      "image (h, w) = (336, 672) takes 1752 visual tokens at scale 576, more than --max-length 1000 before any text"]}]
  # The short llava_hf prompt (about 10 tokens) fits 32 with LLaVA-1.5's count of 9 visual tokens, not with the
  # image's own 30.
  kw = dict(tokenizer=word_tokenizer, max_length=32, max_scale=9, template="llava_hf")
  assert check(str(path), str(tmp_path), **kw)["bad"] == 0
  cut = check(str(path), str(tmp_path), anyres=anyres, **kw)
  assert cut["bad"] == 1 and "30 visual tokens" in cut["bad_records"][0]["problems"][0]
