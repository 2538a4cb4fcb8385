"""Image loading and CLIP preprocessing against transformers' PIL-backend CLIPImageProcessor."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from m3_jax.data import image as im


def _hf_processor(d):
  try:
    from transformers import CLIPImageProcessorPil as P  # transformers >= 5: the PIL ("slow") backend
  except ImportError:  # transformers 4.x: the slow processor is the default class
    from transformers import CLIPImageProcessor as P
  return P(**d)


def _random_image(rng, w, h):
  return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("wh", [(61, 40), (40, 73), (48, 48), (30, 20), (100, 100)])
def test_preprocess_matches_hf_clip_processor(wh):
  cfg_dict = dict(do_resize=True, size={"shortest_edge": 48}, resample=3, do_center_crop=True,
                  crop_size={"height": 48, "width": 48}, do_rescale=True, rescale_factor=1 / 255,
                  do_normalize=True, image_mean=list(im.OPENAI_CLIP_MEAN), image_std=list(im.OPENAI_CLIP_STD),
                  do_convert_rgb=True)
  img = _random_image(np.random.default_rng(wh[0]), *wh)
  ref = _hf_processor(cfg_dict)(images=img, return_tensors="np")["pixel_values"][0]  # [3, H, W]
  cfg = im.ImageProcessorConfig.from_dict(cfg_dict)
  ours = im.preprocess(img, cfg, aspect="crop")
  assert ours.dtype == np.float32 and ours.shape == (48, 48, 3)
  np.testing.assert_allclose(ours, ref.transpose(1, 2, 0), atol=1e-6)


def test_pad_then_preprocess_matches_llava_expand2square_plus_hf():
  cfg = im.ImageProcessorConfig.for_size(48)
  assert cfg.pad_color == (122, 116, 104)
  img = _random_image(np.random.default_rng(0), 30, 18)
  # LLaVA's expand2square by hand: a 30x30 canvas of the mean colour, image pasted at y = (30-18)//2 = 6.
  canvas = np.empty((30, 30, 3), np.uint8)
  canvas[:] = (122, 116, 104)
  canvas[6:24] = np.asarray(img)
  np.testing.assert_array_equal(np.asarray(im.expand_to_square(img, cfg.pad_color)), canvas)
  ref = _hf_processor(cfg.to_dict())(images=Image.fromarray(canvas), return_tensors="np")["pixel_values"][0]
  np.testing.assert_allclose(im.preprocess(img, cfg, aspect="pad"), ref.transpose(1, 2, 0), atol=1e-6)


def test_config_json_roundtrip_keeps_unknown_keys(tmp_path):
  d = {"crop_size": 224, "size": 224, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
       "feature_extractor_type": "CLIPFeatureExtractor", "do_center_crop": True}
  (tmp_path / "preprocessor_config.json").write_text(__import__("json").dumps(d))
  cfg = im.ImageProcessorConfig.from_json(tmp_path)
  assert cfg.size == {"shortest_edge": 224} and cfg.crop_size == {"height": 224, "width": 224}
  assert cfg.output_size == (224, 224) and cfg.pad_color == (127, 127, 127)
  out = tmp_path / "out"
  out.mkdir()
  again = im.ImageProcessorConfig.from_json(cfg.to_json(out))
  assert again == cfg and again.extra["feature_extractor_type"] == "CLIPFeatureExtractor"


def _save(img, path):
  img.save(path)
  return path


def test_modes_convert_to_rgb(tmp_path):
  grey = _save(Image.fromarray(np.full((4, 5), 77, np.uint8), "L"), tmp_path / "g.png")
  np.testing.assert_array_equal(np.asarray(im.load_image(grey)), np.full((4, 5, 3), 77))
  # RGBA: half-transparent red on white -> (255, 128, 128) (alpha 128: 255*128/255 + 255*127/255).
  rgba = np.zeros((3, 3, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 255, 128
  got = np.asarray(im.load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
  np.testing.assert_allclose(got[0, 0], (255, 127, 127), atol=1)
  # 16-bit greyscale: 65535 -> 255, 32896 -> 128 (32896 / 257), not clipped to 255.
  g16 = np.array([[65535, 32896, 0]], np.uint16)
  p16 = _save(Image.fromarray(g16), tmp_path / "g16.png")
  assert Image.open(p16).mode in ("I;16", "I")
  np.testing.assert_array_equal(np.asarray(im.load_image(p16))[0, :, 0], [255, 128, 0])
  # CMYK: (C, M, Y, K) = (255, 0, 0, 0) is cyan; (0, 0, 0, 128) is grey 127 = 255 - 128.
  cmyk = Image.new("CMYK", (2, 1))
  cmyk.putpixel((0, 0), (255, 0, 0, 0))
  cmyk.putpixel((1, 0), (0, 0, 0, 128))
  got = np.asarray(im.load_image(_save(cmyk, tmp_path / "c.tif")))
  np.testing.assert_array_equal(got[0, 0], (0, 255, 255))
  np.testing.assert_array_equal(got[0, 1], (127, 127, 127))
  # Palette with a transparent index -> white there.
  pal = Image.new("P", (2, 1))
  pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  pal.putpixel((0, 0), 0)
  pal.putpixel((1, 0), 1)
  pal.info["transparency"] = 0
  got = np.asarray(im.load_image(_save(pal, tmp_path / "p.png")))
  np.testing.assert_array_equal(got[0], [(255, 255, 255), (200, 100, 50)])


def test_decompression_bomb_guard_refuses_before_decoding(tmp_path):
  path = _save(Image.new("L", (300, 200)), tmp_path / "big.png")
  with pytest.raises(im.ImageError, match=r"big.png: 300x200 = 60000 pixels exceeds the limit of 50000"):
    im.load_image(path, max_pixels=50_000)
  assert im.load_image(path, max_pixels=60_000).size == (300, 200)


def test_an_extreme_aspect_ratio_is_refused_before_its_padded_square_is_made(tmp_path):
  """The limit bounds every image preprocessing makes, not only the decoded one: LLaVA-1.5 pads a thin image to a
  square of its longer side before resizing (a 100-byte PNG of 16384 x 1 would make a 16384 x 16384 one)."""
  cfg = im.ImageProcessorConfig()  # LLaVA's: shortest edge 336, crop 336 x 336
  # Counted by hand: the square of the longer side; the image resized to a shortest edge of 336; the larger image.
  assert im.work_pixels(16384, 1, cfg, "pad") == 16384 * 16384
  assert im.work_pixels(1, 1000, cfg, "crop") == 336 * 336000
  assert im.work_pixels(640, 480, cfg, "pad") == 640 * 640
  assert im.work_pixels(1000, 1000, cfg, "crop") == 1000 * 1000
  path = _save(Image.new("RGB", (3000, 2), (10, 20, 30)), tmp_path / "thin.png")
  with pytest.raises(im.ImageError, match=r"thin.png 3000x2: LLaVA-1.5's preprocessing pads it to a 3000x3000 square "
                     r"before resizing \(9000000 pixels\), over the limit of 4000000 pixels"):
    im.load_and_preprocess(path, cfg, aspect="pad", max_pixels=2000 * 2000)
  with pytest.raises(im.ImageError, match=r"image 2x3000: preprocessing resizes it to 336x504000"):
    im.preprocess(Image.new("RGB", (2, 3000)), cfg, aspect="crop", max_pixels=2000 * 2000)
  assert im.load_and_preprocess(path, cfg, aspect="pad", max_pixels=3000 * 3000).shape == (336, 336, 3)


def test_unreadable_and_missing(tmp_path):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(im.ImageError, match="bad.jpg: cannot be read"):
    im.load_image(bad)
  with pytest.raises(im.ImageError, match="nope.png: file not found"):
    im.load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("shape", [(48, 48, 3), (2, 7, 5, 3)])
def test_normalize_gives_the_bits_of_hfs_arithmetic(shape):
  """uint8 is looked up in a table; the values are HF's: x * rescale_factor in float64, then (x - mean) / std in
  float32, bit for bit (every uint8 value in every channel, and images and batches of them)."""
  cfg = im.ImageProcessorConfig()
  mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
  rng = np.random.default_rng(0)
  for a in (np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1), rng.integers(0, 256, shape, np.uint8)):
    want = ((a.astype(np.float64) * (1 / 255)).astype(np.float32) - mean) / std
    got = im.normalize(a, cfg)
    assert got.dtype == np.float32 and got.shape == a.shape and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  plain = im.ImageProcessorConfig(do_normalize=False)   # rescale only, and another table
  a = rng.integers(0, 256, shape, np.uint8)
  np.testing.assert_array_equal(im.normalize(a, plain), (a.astype(np.float64) * (1 / 255)).astype(np.float32))
