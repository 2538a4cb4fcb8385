"""Every checkpoint fixture converts with `m3 convert` and reproduces its reference logits (transformers, float32,
eager), and converts back with `m3 export` into a directory transformers loads with unchanged logits."""
from __future__ import annotations

import json

import numpy as np
import pytest

from m3_jax.cli import main

# (fixture, tolerance, convert flags). The half-precision fixtures' references come from float32 weights (fp16) or
# from the float16 model itself (the new-layout ones: the generator cast the model in place before saving them).
HALF = 3e-2
CASES = [
    ("transformers-4.51.3/llava-1.5", 1e-4, []),
    ("transformers-4.51.3/llava-1.5-fp16", HALF, []),
    ("transformers-4.51.3/llava-next", 1e-4, []),
    ("transformers-4.57.1/llava-1.5", 1e-4, []),
    ("transformers-4.57.1/llava-1.5-fp16", HALF, []),
    ("transformers-4.57.1/llava-1.5-new-layout", HALF, []),
    ("transformers-4.57.1/llava-next", 1e-4, []),
    ("transformers-5.23.0/llava-1.5", 1e-4, []),
    ("transformers-5.23.0/llava-1.5-fp16", HALF, []),
    ("transformers-5.23.0/llava-1.5-new-layout", HALF, []),
    ("transformers-5.23.0/llava-next", 1e-4, []),
    ("original/llava-v1.5-m3-original", 1e-4, ["--vision-from", "{src}/clip"]),
    ("original/llava-next-m3-original", 1e-4, ["--vision-from", "{src}/clip"]),
]


def convert(fixtures_dir, name, flags, out, variant):
  src = fixtures_dir / name
  if name == "original/llava-next-m3-original":
    # as LLaVA-NeXT saves it: its trained tower is inside, and only unfreeze_mm_vision_tower makes LLaVA's loader
    # use it (the fixture's clip/ holds no weights)
    src = variant(src, out.parent / "src", {"unfreeze_mm_vision_tower": True})
  assert main(["convert", str(src), str(out), "--no-progress"] + [f.format(src=src) for f in flags]) == 0
  return src


@pytest.mark.parametrize("name,tol,flags", CASES, ids=[c[0] for c in CASES])
def test_fixture_converts_to_reference_logits(fixtures_dir, tmp_path, logits_of, variant, name, tol, flags):
  src = convert(fixtures_dir, name, flags, tmp_path / "m3", variant)
  ref = np.load(src / "reference.npz")
  got = logits_of(tmp_path / "m3", ref)
  assert got.shape == ref["logits"].shape
  np.testing.assert_allclose(got, ref["logits"], atol=tol, rtol=0)
  meta = json.loads((tmp_path / "m3" / "m3_config.json").read_text())
  assert meta["template"] == ("vicuna_v1" if name.startswith("original/") else "llava_hf")
  assert meta["model"]["type"] == ("llava_next" if "next" in name else "llava15")


def test_original_layout_reads_m3_fields(fixtures_dir, tmp_path, variant):
  convert(fixtures_dir, "original/llava-next-m3-original", ["--vision-from", "{src}/clip"], tmp_path / "m3", variant)
  model = json.loads((tmp_path / "m3" / "m3_config.json").read_text())["model"]
  assert model["m3"]["scales"] == [576, 144, 36, 9, 1]           # matryoshka_vis_token_scale
  assert model["anyres"]["pinpoint_order"] == "wh"               # original LLaVA reads (w, h)
  assert model["anyres"]["grid_pinpoints"] == [[96, 48], [48, 96], [96, 96]]
  assert model["image_token_id"] == 4                            # the tokenizer's <image>


ROUND_TRIPS = [
    ("transformers-4.57.1/llava-1.5", []),
    ("transformers-5.23.0/llava-next", []),
    ("original/llava-v1.5-m3-original", ["--vision-from", "{src}/clip"]),
    ("original/llava-next-m3-original", ["--vision-from", "{src}/clip"]),
]


@pytest.mark.parametrize("name,flags", ROUND_TRIPS, ids=[c[0] for c in ROUND_TRIPS])
def test_export_round_trip_reloads_in_transformers(fixtures_dir, tmp_path, variant, name, flags):
  import torch
  from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
  src = convert(fixtures_dir, name, flags, tmp_path / "m3", variant)
  assert main(["export", str(tmp_path / "m3"), str(tmp_path / "hf")]) == 0
  cls = LlavaNextForConditionalGeneration if "next" in name else LlavaForConditionalGeneration
  model = cls.from_pretrained(tmp_path / "hf", attn_implementation="eager", dtype=torch.float32).eval()
  ref = np.load(src / "reference.npz")
  inputs = {k: torch.tensor(ref[k]) for k in ("input_ids", "pixel_values", "image_sizes") if k in ref}
  with torch.no_grad():
    out = model(**inputs).logits.numpy()
  np.testing.assert_allclose(out, ref["logits"], atol=1e-4, rtol=0)
  from transformers import AutoTokenizer
  assert AutoTokenizer.from_pretrained(tmp_path / "hf").convert_tokens_to_ids("<image>") == 4


def test_export_then_convert_keeps_the_template_and_image_aspect(fixtures_dir, tmp_path, variant):
  """An original M3 checkpoint (vicuna_v1, padded images) exported to llava-hf and converted back is vicuna_v1 and
  pad again (m3_template / m3_image_aspect in the exported config.json), not llava-hf's defaults."""
  from m3_jax.checkpoint import reader
  convert(fixtures_dir, "original/llava-v1.5-m3-original", ["--vision-from", "{src}/clip"], tmp_path / "m3", variant)
  first = reader.read_checkpoint(tmp_path / "m3")
  assert (first.template, first.aspect) == ("vicuna_v1", "pad")
  assert main(["export", str(tmp_path / "m3"), str(tmp_path / "hf")]) == 0
  assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
  back = reader.read_checkpoint(tmp_path / "back")
  assert (back.template, back.aspect) == ("vicuna_v1", "pad")
  assert reader.identity(tmp_path / "back") == reader.identity(tmp_path / "m3")
