"""Conversion as LLaVA's own loader (llava/model/builder.py, clip_encoder.py) builds the model: the CLIP directory's
vision weights unless the checkpoint's config says unfreeze_mm_vision_tower, and CLIP's image-processor settings."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from m3_jax.checkpoint import m3dir
from m3_jax.convert.convert import convert
from m3_jax.convert.hf import ConversionError

V15 = "original/llava-v1.5-m3-original"       # no vision weights; CLIP (with weights) in clip/
NEXT = "original/llava-next-m3-original"      # vision weights inside; clip/ holds only the vision config
POS = "embeddings.position_embedding.weight"  # identity-mapped to vision/pos_embed: easy to compare


def _own_tower(fixtures_dir) -> dict:
  """The fixture CLIP's weights under the original layout's names, shifted by 1 so they are told apart."""
  clip = load_file(fixtures_dir / V15 / "clip" / "model.safetensors")
  return {"model.vision_tower.vision_tower." + k: v + 1.0 for k, v in clip.items()}


@pytest.mark.parametrize("unfreeze, shift", [(None, 0.0), (False, 0.0), (True, 1.0)])
def test_own_vision_weights_are_used_only_with_unfreeze(fixtures_dir, tmp_path, variant, capfd, unfreeze, shift):
  config = {} if unfreeze is None else {"unfreeze_mm_vision_tower": unfreeze}
  src = variant(fixtures_dir / V15, tmp_path / "src", config, _own_tower(fixtures_dir))
  convert(src, tmp_path / "out", vision_from=fixtures_dir / V15 / "clip", progress=False)
  _, params, _ = m3dir.load(tmp_path / "out")
  clip_pos = load_file(fixtures_dir / V15 / "clip" / "model.safetensors")["vision_model." + POS]
  np.testing.assert_array_equal(np.asarray(params["vision"]["pos_embed"]), clip_pos + shift)
  noted = "own vision weights are not used" in capfd.readouterr().out
  assert noted is (shift == 0.0)


def test_own_vision_weights_without_unfreeze_need_a_clip_with_weights(fixtures_dir, tmp_path, variant):
  src = variant(fixtures_dir / V15, tmp_path / "src", None, _own_tower(fixtures_dir))
  with pytest.raises(ConversionError, match=r"holds vision weights, but its config.json does not set "
                                            r"unfreeze_mm_vision_tower: true, so LLaVA's loader ignores them and "
                                            r"loads its CLIP tower 'clip' separately: pass --vision-from DIR"):
    convert(src, tmp_path / "out", progress=False)
  # NeXT's clip/ is a config without weights: the tower would have to come from there
  with pytest.raises(ConversionError, match=r"--vision-from .*clip holds no CLIP vision weights .* has its own, but "
                                            r"its config.json does not set unfreeze_mm_vision_tower: true"):
    convert(fixtures_dir / NEXT, tmp_path / "out", vision_from=fixtures_dir / NEXT / "clip", progress=False)


CLIP_PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 48},
                  "crop_size": {"height": 48, "width": 48}, "do_resize": True, "do_center_crop": True,
                  "do_rescale": True, "rescale_factor": 0.5 / 255, "do_normalize": True, "image_mean": [0.5, 0.25, 0.125],
                  "image_std": [0.2, 0.3, 0.4], "do_convert_rgb": True, "resample": 2}


def _clip_with_processor(fixtures_dir, tmp_path, name):
  clip = tmp_path / "clip"
  clip.mkdir(parents=True)
  for f in (fixtures_dir / name / "clip").iterdir():
    (clip / f.name).symlink_to(f)
  (clip / "preprocessor_config.json").write_text(json.dumps(CLIP_PROCESSOR))
  return clip


def test_image_processor_comes_from_the_clip_directory(fixtures_dir, tmp_path, variant):
  clip = _clip_with_processor(fixtures_dir, tmp_path, V15)
  convert(fixtures_dir / V15, tmp_path / "out", vision_from=clip, progress=False)
  assert m3dir.load(tmp_path / "out")[2]["preprocessor_config"] == CLIP_PROCESSOR
  # LLaVA-NeXT: CLIP's settings plus the anyres pinpoints, written (h, w) (the original config has them (w, h))
  src = variant(fixtures_dir / NEXT, tmp_path / "next", {"unfreeze_mm_vision_tower": True})
  convert(src, tmp_path / "out_next", vision_from=_clip_with_processor(fixtures_dir, tmp_path / "n", NEXT),
          progress=False)
  got = m3dir.load(tmp_path / "out_next")[2]["preprocessor_config"]
  assert got == {**CLIP_PROCESSOR, "image_processor_type": "LlavaNextImageProcessor", "do_pad": True,
                 "image_grid_pinpoints": [[48, 96], [96, 48], [96, 96]]}
  # no preprocessor_config.json in the CLIP directory: CLIP's defaults at the tower's size
  convert(fixtures_dir / V15, tmp_path / "out_default", vision_from=fixtures_dir / V15 / "clip", progress=False)
  default = m3dir.load(tmp_path / "out_default")[2]["preprocessor_config"]
  assert default["image_mean"] == [0.48145466, 0.4578275, 0.40821073] and default["crop_size"] == {"height": 48,
                                                                                                   "width": 48}
