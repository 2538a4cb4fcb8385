"""LLaVA-NeXT anyres: preprocessing against transformers' PIL processor, each reference's pinpoint reading and
unpad rounding, the tokens-per-grid composition against transformers' LlavaNext (full scale and pooled), grid
overrides and their errors, and the 7B NeXT parameter count."""
from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next import modeling_llava_next as hf_next
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from m3_jax.checkpoint import m3dir
from m3_jax import geometry
from m3_jax.data.anyres import anyres_crops
from m3_jax.data.image import ImageProcessorConfig
from m3_jax.geometry import AnyresError, grid_shape, select_best_resolution
from m3_jax.models import anyres
from m3_jax.models.config import AnyresConfig, ModelConfig, VisionConfig
from m3_jax.models.llava import LlavaM3

from next_testlib import PINS, PROC, S, tiny_next_pair


def rand_image(h, w, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("hw", [(30, 130), (30, 40), (100, 37), (96, 96), (47, 200), (150, 60)])
def test_crops_match_transformers_pil_processor(hw):
  img = rand_image(*hw)
  ref = LlavaNextImageProcessorPil(**PROC)(img, return_tensors="np")
  ours, size = anyres_crops(img, ImageProcessorConfig.for_size(S), PINS, "hw")
  assert size == tuple(ref["image_sizes"][0])
  np.testing.assert_allclose(ours, ref["pixel_values"][0].transpose(0, 2, 3, 1), atol=1e-6, rtol=0)


def llava_select_best_resolution(original_size, possible_resolutions):
  """LLaVA's llava/mm_utils.py, verbatim logic: original_size is PIL's (w, h), resolutions are (w, h)."""
  original_width, original_height = original_size
  best_fit, max_eff, min_waste = None, 0, float("inf")
  for width, height in possible_resolutions:
    scale = min(width / original_width, height / original_height)
    dw, dh = int(original_width * scale), int(original_height * scale)
    eff = min(dw * dh, original_width * original_height)
    waste = width * height - eff
    if eff > max_eff or (eff == max_eff and waste < min_waste):
      max_eff, min_waste, best_fit = eff, waste, (width, height)
  return best_fit


def test_pinpoint_orders_follow_each_reference_and_transpose_small_images():
  from transformers.image_processing_utils import select_best_resolution as hf_select
  for hw in [(30, 40), (40, 30), (30, 130), (200, 47), (96, 96), (20, 20)]:
    assert grid_shape(hw, PINS, "hw", S) == tuple(x // S for x in hf_select(hw, PINS))
    w, h = llava_select_best_resolution((hw[1], hw[0]), PINS)  # the same numbers read as (w, h)
    assert grid_shape(hw, PINS, "wh", S) == (h // S, w // S)
  # Both sides <= the crop: every candidate keeps the whole image, the least waste ties between the first two
  # and the first wins: (h, w) = (48, 96) for llava-hf, (w, h) = (48, 96) for LLaVA -> transposed grids.
  assert grid_shape((30, 40), PINS, "hw", S) == (1, 2)
  assert grid_shape((30, 40), PINS, "wh", S) == (2, 1)


def llava_unpad_rows_cols(original_size, current_hw):
  """LLaVA's unpad_image (original_size = (w, h)... as image.size), returning the kept index ranges."""
  original_width, original_height = original_size
  current_height, current_width = current_hw
  if original_width / original_height > current_width / current_height:
    new_height = int(original_height * (current_width / original_width))
    padding = (current_height - new_height) // 2
    return padding, current_height - padding, 0, current_width
  new_width = int(original_width * (current_height / original_height))
  padding = (current_width - new_width) // 2
  return 0, current_height, padding, current_width - padding


def test_unpad_rounding_follows_each_reference():
  # 55 * (48 / 176) = 14.999999999999998: transformers rounds to 15 (keeps rows 4:20), LLaVA truncates to 14 (5:19).
  assert geometry.unpad_shape((55, 176), (24, 48), "hw") == (4, 20, 0, 48)
  assert geometry.unpad_shape((55, 176), (24, 48), "wh") == (5, 19, 0, 48)
  for hw in [(55, 176), (88, 55), (88, 99), (30, 130), (130, 30)]:
    kept = hf_next.unpad_image(torch.zeros(1, 24, 48), list(hw)).shape[1:]
    top, bottom, left, right = geometry.unpad_shape(hw, (24, 48), "hw")
    assert (bottom - top, right - left) == tuple(kept)
    assert geometry.unpad_shape(hw, (24, 48), "wh") == llava_unpad_rows_cols((hw[1], hw[0]), (24, 48))


def tiny_next(**kw) -> ModelConfig:
  return ModelConfig(type="llava_next", vision=VisionConfig(image_size=48, patch_size=4, width=32, depth=2, heads=4,
                                                            mlp_dim=64),
                     anyres=AnyresConfig(grid_pinpoints=tuple(map(tuple, PINS)), pinpoint_order="hw"),
                     m3=dataclasses.replace(ModelConfig().m3, scales=(144, 36, 9, 4, 1)), **kw)


def test_pack_indices_hand_worked():
  cfg = tiny_next()
  # (48, 96) -> a 1x2 grid. scale 1: base, crop 1, crop 2, newline (index C * scale = 3).
  assert anyres.pack_indices(cfg, (48, 96), 1).tolist() == [0, 1, 2, 3]
  # scale 4 (2x2 per crop): base 0..3; row 0 = crop 1's top row, crop 2's top row, newline (12); row 1 likewise.
  assert anyres.pack_indices(cfg, (48, 96), 4).tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 12, 6, 7, 10, 11, 12]
  # (30, 130) -> 1x3 crops; at 36 per crop the 6x18 map keeps rows 1:5 (30 * 18 / 130 = 4.15 -> 4).
  assert anyres.visual_tokens(cfg, (30, 130), 36) == 36 + 4 * 19
  # LLaVA-1.5 images occupy `scale` positions.
  assert anyres.visual_tokens(ModelConfig(), (30, 130), 144) == 144


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
  src, out = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("m3") / "ckpt"
  hf = tiny_next_pair(src, out)
  cfg, params, extras = m3dir.load(out)
  img = rand_image(30, 130, seed=1)  # non-square: base + 1x3 crops, unpadded rows
  return hf, cfg, params, extras, img


def _ids(n_image, text=(9, 10, 11, 12)):
  return [1] + [4] * n_image + list(text)


def next_logits(cfg, params, ids, crops, size, scale, grid=None):
  """The full NeXT forward of one sample: ids with one placeholder, crops float32[C, S, S, 3] -> logits[1, L, V]."""
  index = anyres.pack_indices(cfg, size, scale, grid, n_crops=len(crops))
  return LlavaM3(cfg).apply({"params": params}, jnp.asarray([ids], jnp.int32), jnp.asarray(crops)[None], scale,
                            anyres_index=index[None])


def test_live_parity_with_transformers_llava_next_full_scale(next_pair):
  hf, cfg, params, extras, img = next_pair
  assert extras["preprocessor_config"]["image_grid_pinpoints"] == PINS
  proc = LlavaNextImageProcessorPil(**PROC)(img, return_tensors="pt")
  n = anyres.visual_tokens(cfg, (30, 130), 144)
  assert n == 144 + 8 * 37  # 12x36 map, rows 2:10 kept (30 * 36 / 130 = 8.3 -> 8), a newline per row
  with torch.no_grad():  # transformers checks that the placeholder count equals its own token count
    ref = hf(input_ids=torch.tensor([_ids(n)]), pixel_values=proc["pixel_values"],
             image_sizes=proc["image_sizes"]).logits.numpy()
  crops, size = anyres_crops(img, ImageProcessorConfig.for_size(S), cfg.anyres.grid_pinpoints, "hw")
  ours = next_logits(cfg, params, _ids(1), crops, size, 144)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_live_parity_at_pooled_scale_against_transformers_pooled_per_crop(next_pair):
  hf, cfg, params, _, img = next_pair
  proc = LlavaNextImageProcessorPil(**PROC)(img, return_tensors="pt")
  pixels, sizes = proc["pixel_values"][0], proc["image_sizes"][0]
  with torch.no_grad():
    feats = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    proj = hf.model.multi_modal_projector(feats)                                  # [C, 144, D] per crop
    c, _, d = proj.shape
    pooled = torch.nn.functional.avg_pool2d(proj.transpose(1, 2).reshape(c, d, 12, 12), 2)   # [C, D, 6, 6]
    rows, cols = hf_next.get_anyres_image_grid_shape(sizes.tolist(), PINS, S)
    grid = pooled[1:].reshape(rows, cols, d, 6, 6).permute(2, 0, 3, 1, 4).reshape(d, rows * 6, cols * 6)
    grid = hf_next.unpad_image(grid, sizes)                                        # transformers' own unpad
    grid = torch.cat([grid, hf.model.image_newline[:, None, None].expand(d, grid.shape[1], 1)], dim=-1)
    image = torch.cat([pooled[0].reshape(d, 36).T, grid.flatten(1).T], dim=0)   # base first
    ids = torch.tensor([_ids(image.shape[0])])
    emb = hf.get_input_embeddings()(ids)
    emb[0, 1:1 + image.shape[0]] = image
    ref = hf(inputs_embeds=emb).logits.numpy()
  crops, size = anyres_crops(img, ImageProcessorConfig.for_size(S), cfg.anyres.grid_pinpoints, "hw")
  ours = next_logits(cfg, params, _ids(1), crops, size, 36)
  assert ours.shape[1] == ids.shape[1] == 5 + 36 + 4 * 19
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_grid_override_3x3_at_pooled_scale(next_pair):
  _, cfg, params, _, img = next_pair
  crops, size = anyres_crops(img, ImageProcessorConfig.for_size(S), cfg.anyres.grid_pinpoints, "hw", grid=(3, 3))
  assert crops.shape == (10, S, S, 3)
  # 3x3 crops at 36 per grid: an 18x18 map; 30 * 18 / 130 = 4.15 -> 4 rows kept.
  assert anyres.visual_tokens(cfg, size, 36, grid=(3, 3)) == 36 + 4 * 19
  out = next_logits(cfg, params, _ids(1), crops, size, 36, grid=(3, 3))
  assert out.shape == (1, 5 + 36 + 4 * 19, 40) and np.isfinite(np.asarray(out)).all()


def test_bad_anyres_inputs_are_clear_errors(next_pair):
  _, cfg, params, _, img = next_pair
  crops, size = anyres_crops(img, ImageProcessorConfig.for_size(S), cfg.anyres.grid_pinpoints, "hw")
  with pytest.raises(AnyresError, match=r"image size \(h, w\) = \(96, 96\) selects a 2x2 crop grid .* 5 crops .* "
                                        r"but 4 crops were given: the image sizes do not fit these pinpoints"):
    anyres.pack_indices(cfg, (96, 96), 144, n_crops=len(crops))
  with pytest.raises(AnyresError, match=r"a grid override needs a LLaVA-NeXT checkpoint .* 'llava15'"):
    anyres.visual_tokens(ModelConfig(), size, 144, grid=(3, 3))
  with pytest.raises(AnyresError, match=r"grid override \(0, 2\): rows and cols must be positive integers"):
    anyres.visual_tokens(cfg, size, 36, grid=(0, 2))
  short = cfg.replace(llm=dataclasses.replace(cfg.llm, max_len=1024))
  with pytest.raises(AnyresError, match=r"grid override 3x3 at 144 tokens per grid takes up to 1476 visual tokens, "
                                        r"more than this checkpoint's LLM context \(model.llm.max_len = 1024\); "
                                        r"scales that fit a 3x3 grid: \[36, 9, 1\]"):
    anyres.pack_indices(short, size, 144, grid=(3, 3), n_crops=len(crops))
  with pytest.raises(ValueError, match=r"scale 16 is not one of 1, 9, 36, 144"):
    anyres.visual_tokens(cfg, size, 16)
  with pytest.raises(AnyresError, match=r"image size \(h, w\) = \(0, 5\)"):
    select_best_resolution((0, 5), PINS)


def test_llava_next_7b_m3_parameter_count(fixtures_dir):
  from m3_jax.configs import base as m3_config
  from m3_jax.models.llava import param_count
  cfg = ModelConfig.from_config(m3_config.load("configs/llava_next_7b_m3.py").model)
  counts = json.loads((fixtures_dir / "real-7b-configs/parameter_counts.json").read_text())
  assert param_count(cfg) == counts["llava-v1.6-vicuna-7b-hf"]["total"] == 7_063_431_168


def reference_packing(tokens, newline, hw, scale, order, grid=None):
  """The packed sequence by reassembling the crop maps and unpadding with each reference's own unpad:
  tokens float[1 + rows*cols, scale, D] -> float[n, D]."""
  k = int(np.sqrt(scale))
  rows, cols = grid_shape(hw, PINS, order, S, grid)
  d = tokens.shape[-1]
  m = tokens[1:].reshape(rows, cols, k, k, d).transpose(0, 2, 1, 3, 4).reshape(rows * k, cols * k, d)
  if order == "hw":
    m = hf_next.unpad_image(torch.from_numpy(m).permute(2, 0, 1), list(hw)).permute(1, 2, 0).numpy()
  else:
    top, bottom, left, right = llava_unpad_rows_cols((hw[1], hw[0]), (rows * k, cols * k))
    m = m[top:bottom, left:right]
  m = np.concatenate([m, np.broadcast_to(newline, (m.shape[0], 1, d))], axis=1)
  return np.concatenate([tokens[0], m.reshape(-1, d)])


@pytest.mark.parametrize("order", ["hw", "wh"])
def test_geometry_token_count_is_the_length_anyres_embeds_packs(order):
  rng = np.random.default_rng(0)
  newline = rng.normal(size=(3,)).astype(np.float32)
  for hw in [(30, 130), (40, 90), (96, 96), (100, 37), (47, 200), (20, 20), (55, 176)]:
    for grid in [None, (3, 3), (1, 2)]:
      for scale in [1, 4, 9, 36, 144]:
        n = geometry.visual_tokens(hw, scale, PINS, order, S, grid)
        rows, cols = grid_shape(hw, PINS, order, S, grid)
        tokens = rng.normal(size=(1, 1 + rows * cols, scale, 3)).astype(np.float32)
        index = geometry.pack_indices(hw, scale, PINS, order, S, grid)
        out = np.asarray(anyres.anyres_embeds(tokens, newline, index[None]))
        assert out.shape == (1, n, 3), (hw, grid, scale)
        np.testing.assert_array_equal(out[0], reference_packing(tokens[0], newline, hw, scale, order, grid))


def test_anyres_embeds_packs_a_batch_of_different_grids_with_padding_crops():
  cfg = tiny_next()
  rng = np.random.default_rng(1)
  sizes, scale = [(30, 130), (96, 96), (100, 37)], 9       # 1x3, 2x2 and 3x1 crop grids: 4, 5 and 4 crops
  own = [rng.normal(size=(1 + r * c, scale, 3)).astype(np.float32)
         for r, c in (grid_shape(hw, PINS, "hw", S) for hw in sizes)]
  assert [len(t) for t in own] == [4, 5, 4]
  newline = rng.normal(size=(3,)).astype(np.float32)
  crops = np.zeros((3, 5, scale, 3), np.float32)
  for b, t in enumerate(own):
    crops[b, :len(t)] = t
  counts = [geometry.visual_tokens(hw, scale, PINS, "hw", S) for hw in sizes]
  index = np.zeros((3, max(counts)), np.int32)
  for b, hw in enumerate(sizes):
    index[b, :counts[b]] = geometry.pack_indices(hw, scale, PINS, "hw", S, crops=5)
  out = np.asarray(anyres.anyres_embeds(crops, newline, index))
  for b, hw in enumerate(sizes):
    alone = anyres.anyres_embeds(own[b][None], newline, anyres.pack_indices(cfg, hw, scale, n_crops=len(own[b]))[None])
    np.testing.assert_array_equal(out[b, :counts[b]], np.asarray(alone)[0])
  with pytest.raises(AnyresError, match=r"image size \(h, w\) = \(96, 96\) needs 5 crops, the batch holds 4 per image"):
    geometry.pack_indices((96, 96), scale, PINS, "hw", S, crops=4)
