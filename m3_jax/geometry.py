"""LLaVA-NeXT anyres geometry, pure numpy: which crop grid an image gets, what the unpadding keeps, how many visual
tokens it occupies at a scale, and where each of them comes from. `m3_jax.data.anyres` cuts the crops with it and
`m3_jax.models.anyres` packs the pooled crop tokens with it, so both read the same numbers.

An image of (h, w) pixels becomes a base crop (the whole image squashed to one crop) and a rows x cols grid of
crops (the image resized and padded to the best pinpoint resolution). Pooled to `scale` = k*k tokens per crop, the
grid crops reassemble into one (rows*k) x (cols*k) token map; the padding is cut away (unpad) and a newline closes
every kept row; the base crop's tokens go first:

  visual tokens = scale (base) + H' * (W' + 1)     (H' x W': the unpadded map)

Two references differ, and `order` (model.anyres.pinpoint_order) chooses between them:
  "hw" (llava-hf / transformers): pinpoints are (h, w); unpad rounds int(round(x, 7)).
  "wh" (original LLaVA / M3):    pinpoints are (w, h); unpad rounds int(x).
Best-resolution selection is the same formula in both; read in its own order, each list keeps its tie-breaking
(the first best candidate wins), so small images get transposed grids under the two readings.

A grid override (rows, cols) (paper Table 5: 3x3 crops) replaces the pinpoints by the one resolution
(rows * crop, cols * crop).

Every function takes the raw fields (`grid_pinpoints`, `order`, `crop` = the vision tower's image_size, `grid`),
so the data package, which must not know the model config, calls them as the model does.
"""
from __future__ import annotations

import math

import numpy as np

from m3_jax.errors import BadValue

ORDERS = ("hw", "wh")


class AnyresError(BadValue):
  """An image size, crop count or grid the anyres composition cannot take; the message says what would fit."""


def check_grid_shape(grid) -> tuple[int, int]:
  """A grid override -> (rows, cols), both positive integers."""
  try:
    rows, cols = (int(g) for g in grid)
  except (TypeError, ValueError):
    raise AnyresError(f"grid override {grid!r}: expected (rows, cols), e.g. (3, 3)") from None
  if rows < 1 or cols < 1 or (rows, cols) != tuple(grid):
    raise AnyresError(f"grid override {tuple(grid)!r}: rows and cols must be positive integers")
  return rows, cols


def pinpoints_hw(grid_pinpoints, order: str, crop: int, grid: tuple[int, int] | None = None
                 ) -> tuple[tuple[int, int], ...]:
  """The candidate resolutions as (h, w) in list order. `grid` (rows, cols) overrides them with one resolution."""
  if grid is not None:
    rows, cols = check_grid_shape(grid)
    return ((rows * crop, cols * crop),)
  if not grid_pinpoints:
    raise AnyresError("no anyres grid_pinpoints configured (model.anyres.grid_pinpoints is empty): this is not a "
                      "LLaVA-NeXT model")
  if order not in ORDERS:
    raise AnyresError(f"model.anyres.pinpoint_order={order!r}: expected 'hw' (llava-hf) or 'wh' (original LLaVA)")
  pins = tuple((int(a), int(b)) for a, b in grid_pinpoints)
  for p in pins:
    if p[0] % crop or p[1] % crop or min(p) <= 0:
      raise AnyresError(f"pinpoint {list(p)} is not a positive multiple of the crop size {crop}")
  return pins if order == "hw" else tuple((b, a) for a, b in pins)


def select_best_resolution(image_hw, candidates_hw) -> tuple[int, int]:
  """The candidate (h, w) keeping the most of the image's resolution, then wasting the least; the first wins ties
  (transformers' and LLaVA's `select_best_resolution`, each in its own reading of the list)."""
  oh, ow = (int(x) for x in image_hw)
  if oh <= 0 or ow <= 0:
    raise AnyresError(f"image size (h, w) = ({oh}, {ow}): both sides must be positive")
  best, best_eff, best_waste = None, 0, float("inf")
  for h, w in candidates_hw:
    scale = min(w / ow, h / oh)
    eff = min(int(ow * scale) * int(oh * scale), ow * oh)
    waste = w * h - eff
    if eff > best_eff or (eff == best_eff and waste < best_waste):
      best, best_eff, best_waste = (int(h), int(w)), eff, waste
  return best


def best_resolution(image_hw, grid_pinpoints, order: str, crop: int, grid: tuple[int, int] | None = None
                    ) -> tuple[int, int]:
  """(H, W) pixels the image is resized and padded to before cutting crops."""
  return select_best_resolution(image_hw, pinpoints_hw(grid_pinpoints, order, crop, grid))


def grid_shape(image_hw, grid_pinpoints, order: str, crop: int, grid: tuple[int, int] | None = None
               ) -> tuple[int, int]:
  """(rows, cols) of crops an image of (h, w) pixels gets (the base crop not counted)."""
  h, w = best_resolution(image_hw, grid_pinpoints, order, crop, grid)
  return h // crop, w // crop


def unpad_shape(image_hw, current_hw, order: str) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) kept rows/cols of a (H, W) token map that holds an image of (h, w) pixels,
  resized to fit and centred: transformers' / LLaVA's `unpad_image`, with that reference's rounding."""
  oh, ow = (int(x) for x in image_hw)
  ch, cw = current_hw
  rnd = (lambda x: int(round(x, 7))) if order == "hw" else int
  if ow / oh > cw / ch:
    new_h = rnd(oh * (cw / ow))
    pad = (ch - new_h) // 2
    return pad, ch - pad, 0, cw
  new_w = rnd(ow * (ch / oh))
  pad = (cw - new_w) // 2
  return 0, ch, pad, cw - pad


def side(scale: int) -> int:
  """k with scale = k*k tokens per crop (a k x k pooled map)."""
  k = math.isqrt(int(scale))
  if k < 1 or k * k != scale:
    raise AnyresError(f"scale {scale}: anyres needs a square number of tokens per crop (1, 4, 9, ...)")
  return k


def visual_tokens(image_hw, scale: int, grid_pinpoints, order: str, crop: int,
                  grid: tuple[int, int] | None = None) -> int:
  """Sequence positions one image occupies at `scale` tokens per crop: scale + H' * (W' + 1)."""
  k = side(scale)
  rows, cols = grid_shape(image_hw, grid_pinpoints, order, crop, grid)
  top, bottom, left, right = unpad_shape(image_hw, (rows * k, cols * k), order)
  return scale + (bottom - top) * (right - left + 1)


def most_visual_tokens(grid, scale: int) -> int:
  """The most positions a rows x cols grid can take at `scale` (nothing unpadded): a bound for the context."""
  rows, cols = check_grid_shape(grid)
  k = side(scale)
  return scale + rows * k * (cols * k + 1)


def pack_indices(image_hw, scale: int, grid_pinpoints, order: str, crop: int, grid: tuple[int, int] | None = None,
                 crops: int | None = None) -> np.ndarray:
  """int32[visual_tokens]: where each visual token comes from in concat(crop_tokens.reshape(-1, D), [newline]).

  crop_tokens float[C, scale, D] are the pooled tokens of the base crop (index 0) and the grid crops in row-major
  order, then any padding crops; the newline is index C * scale. C = `crops`, by default the image's own
  1 + rows * cols (a batch pads every image to the same C).
  """
  k = side(scale)
  rows, cols = grid_shape(image_hw, grid_pinpoints, order, crop, grid)
  own = 1 + rows * cols
  crops = own if crops is None else int(crops)
  if crops < own:
    raise AnyresError(f"image size (h, w) = {tuple(int(x) for x in image_hw)} needs {own} crops, the batch "
                      f"holds {crops} per image")
  # Token (r, c) of the reassembled (rows*k, cols*k) map is token (r % k, c % k) of crop (r // k, c // k).
  r = np.arange(rows * k)[:, None]
  c = np.arange(cols * k)[None, :]
  idx = (1 + (r // k) * cols + (c // k)) * scale + (r % k) * k + (c % k)
  top, bottom, left, right = unpad_shape(image_hw, (rows * k, cols * k), order)
  idx = idx[top:bottom, left:right]
  idx = np.concatenate([idx, np.full((idx.shape[0], 1), crops * scale)], axis=1)
  return np.concatenate([np.arange(scale), idx.reshape(-1)]).astype(np.int32)


def crop_counts(grid_pinpoints, order: str, crop: int) -> tuple[int, ...]:
  """The distinct crop counts (base included, 1 + rows * cols) the pinpoints can give, ascending: the default
  crop buckets of a training batch (one compiled program per bucket and text length)."""
  return tuple(sorted({1 + (h // crop) * (w // crop) for h, w in pinpoints_hw(grid_pinpoints, order, crop)}))


def bucket_tokens(crops: int, scale: int, grid_pinpoints, order: str, crop: int) -> int:
  """The visual positions a training batch reserves per image at `scale` when it holds `crops` crops per image:
  the most any pinpoint grid of at most `crops` crops can take (nothing unpadded). A function of (crops, scale)
  only, so the batch's shapes, and the programs compiled for them, are few."""
  grids = [(h // crop, w // crop) for h, w in pinpoints_hw(grid_pinpoints, order, crop)]
  fits = [most_visual_tokens(g, scale) for g in grids if 1 + g[0] * g[1] <= crops]
  if not fits:
    raise AnyresError(f"{crops} crops per image hold no pinpoint grid (the smallest needs "
                      f"{min(crop_counts(grid_pinpoints, order, crop))} with the base)")
  return max(fits)
