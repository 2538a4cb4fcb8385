"""LLaVA-NeXT anyres preprocessing: best resolution, resize-and-pad, crops + base image, image sizes.

For an RGB image of (h, w) pixels and crop size S (the vision tower's image_size):
  1. pick the best pinpoint resolution (H, W) (`m3_jax.geometry`, which the model's packing reads too);
  2. resize the image to fit (H, W) keeping its aspect (bicubic; the fitted side exactly, the other
     ceil(side * scale)) and pad it centred with black to (H, W);
  3. cut (H / S) x (W / S) crops in row-major order;
  4. the base image is the whole image squashed to S x S; it goes first;
  5. every crop then goes through the CLIP preprocessing of `m3_jax.data.image` (a no-op resize and crop at S x S,
     x / 255, normalise).
This is transformers' LlavaNextImageProcessor (PIL backend) and LLaVA's `process_anyres_image` alike; they differ
only in how the pinpoint list is read: (h, w) by llava-hf, (w, h) by the original code
(`model.anyres.pinpoint_order`). Each reading keeps its list order, so ties go to the first candidate of each.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from m3_jax import geometry
from m3_jax.data.image import ImageProcessorConfig, preprocess, to_rgb


def fit_size(image_hw, target_hw) -> tuple[int, int]:
  """(h, w) of the image resized to fit target_hw keeping its aspect (HF `get_patch_output_size`)."""
  oh, ow = image_hw
  th, tw = target_hw
  sw, sh = tw / ow, th / oh
  if sw < sh:
    return min(math.ceil(oh * sw), th), tw
  return th, min(math.ceil(ow * sh), tw)


def resize_and_pad(img: Image.Image, target_hw, resample: int = 3) -> np.ndarray:
  """RGB image -> uint8[H, W, 3]: resized to fit (bicubic) and pasted centred on black."""
  th, tw = target_hw
  nh, nw = fit_size((img.height, img.width), target_hw)
  resized = np.asarray(img.resize((nw, nh), resample=Image.Resampling(resample)))
  out = np.zeros((th, tw, 3), np.uint8)
  top, left = (th - nh) // 2, (tw - nw) // 2
  out[top:top + nh, left:left + nw] = resized
  return out


def anyres_crops(img: Image.Image, pcfg: ImageProcessorConfig, grid_pinpoints, order: str,
                 grid: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
  """RGB image -> (float32[1 + rows*cols, S, S, 3] CLIP-normalised crops, base first; image size (h, w)).

  S is the processor's crop size. `order` is the pinpoint reading ("hw" llava-hf, "wh" original); `grid`
  (rows, cols) overrides the pinpoints (paper Table 5: 3x3 grids).
  """
  if pcfg.do_convert_rgb:
    img = to_rgb(img)
  crop_h, crop_w = pcfg.output_size
  if crop_h != crop_w:
    raise geometry.AnyresError(f"anyres needs square crops, the processor's crop size is {crop_h}x{crop_w}")
  crop = crop_h
  image_hw = (img.height, img.width)
  best = geometry.best_resolution(image_hw, grid_pinpoints, order, crop, grid)
  padded = resize_and_pad(img, best, pcfg.resample)
  tiles = [padded[i:i + crop, j:j + crop] for i in range(0, best[0], crop) for j in range(0, best[1], crop)]
  base = img.resize((crop, crop), resample=Image.Resampling(pcfg.resample))
  crops = [preprocess(base, pcfg, aspect="crop")]
  crops += [preprocess(Image.fromarray(t), pcfg, aspect="crop") for t in tiles]
  return np.stack(crops), image_hw



def training_index(image_hw, scale: int, crops: int, length: int, grid_pinpoints, order: str, crop: int
                   ) -> np.ndarray:
  """int32[length]: one training row's packing plan at `scale` for `models.anyres.anyres_embeds`, its padding
  first (-1, masked out): the image's own `geometry.pack_indices` (crops = the batch's crop bucket) right-aligned,
  so its last visual token sits just before the text that follows, as at inference. `image_hw` None (a text-only
  row): all padding."""
  out = np.full((length,), -1, np.int32)
  if image_hw is None:
    return out
  idx = geometry.pack_indices(image_hw, scale, grid_pinpoints, order, crop, crops=crops)
  if len(idx) > length:
    raise geometry.AnyresError(f"image size (h, w) = {tuple(image_hw)} takes {len(idx)} visual tokens at scale "
                               f"{scale}, the batch reserves {length}")
  out[length - len(idx):] = idx
  return out
