"""LLaVA-NeXT anyres composition with Matryoshka tokens per grid (paper Sec. 4.2, Tables 2 and 5).

An image becomes a base crop (the whole image squashed to one crop) and a rows x cols grid of crops (the image
resized and padded to the best pinpoint resolution). Every crop is encoded, projected and pooled to `scale`
tokens on its own (pooling after the projector: the released M3 order). The grid crops are reassembled into one
(rows*k) x (cols*k) token map (k = sqrt(scale)), the padding is cut away (`unpad`), `image_newline` closes every
row, and the base crop's tokens go first:

  visual tokens = scale (base) + H' * (W' + 1)     (H' x W': the unpadded map)

Two references differ (DESIGN.md) and `model.anyres.pinpoint_order` chooses between them:
  "hw" (llava-hf / transformers): pinpoints are (h, w); unpad rounds int(round(x, 7)).
  "wh" (original LLaVA / M3):    pinpoints are (w, h); unpad rounds int(x).
Best-resolution selection is the same formula in both; read in its own order, each list keeps its tie-breaking
(the first best candidate wins), so small images get transposed grids under the two readings.

A grid override (e.g. 3x3 crops at 144 tokens per grid, paper Table 5) replaces the pinpoints by the one
resolution (rows * crop, cols * crop).

The packing is a host-side index plan (numpy; it depends on the image size) applied with one gather, so the
jitted parts see only static shapes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from m3_jax.data import anyres as data_anyres
from m3_jax.data.anyres import AnyresError, select_best_resolution  # noqa: F401  (re-exported)
from m3_jax.models.config import ModelConfig


def pinpoints_hw(cfg: ModelConfig, grid: tuple[int, int] | None = None) -> tuple[tuple[int, int], ...]:
  """The candidate resolutions as (h, w), in the checkpoint's list order (or the one the grid override makes)."""
  return data_anyres.pinpoints_hw(cfg.anyres.grid_pinpoints, cfg.anyres.pinpoint_order, cfg.vision.image_size, grid)


def grid_shape(cfg: ModelConfig, image_hw, grid: tuple[int, int] | None = None) -> tuple[int, int]:
  """(rows, cols) of crops for an image of (h, w) pixels."""
  h, w = select_best_resolution(image_hw, pinpoints_hw(cfg, grid))
  crop = cfg.vision.image_size
  return h // crop, w // crop


def num_crops(cfg: ModelConfig, image_hw, grid: tuple[int, int] | None = None) -> int:
  """Base + grid crops."""
  rows, cols = grid_shape(cfg, image_hw, grid)
  return 1 + rows * cols


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


def pack_indices(cfg: ModelConfig, image_hw, scale: int, grid: tuple[int, int] | None = None,
                 n_crops: int | None = None) -> np.ndarray:
  """int32[visual_tokens]: where each visual token comes from in concat(crop_tokens.reshape(-1, D), [newline]).

  crop_tokens float[C, scale, D] are the pooled tokens of the base crop (index 0) and the grid crops in row-major
  order; index C * scale is the newline. `n_crops`, when given, is checked against the grid the size selects.
  """
  cfg.check_scale(scale)
  if cfg.type != "llava_next":
    raise AnyresError(f"anyres packing needs a llava_next model (with image_newline); this one is {cfg.type!r}")
  if grid is not None:
    check_grid(cfg, grid, scale)
  rows, cols = grid_shape(cfg, image_hw, grid)
  want = 1 + rows * cols
  if n_crops is not None and n_crops != want:
    raise AnyresError(
        f"image size (h, w) = {tuple(int(x) for x in image_hw)} selects a {rows}x{cols} crop grid "
        f"(pinpoints {[list(p) for p in cfg.anyres.grid_pinpoints]} read as {cfg.anyres.pinpoint_order}) = "
        f"{want} crops with the base, but {n_crops} crops were given: the image sizes do not fit these pinpoints "
        "(preprocess with m3_jax.data.anyres using the same pinpoints, order and grid)")
  k = math.isqrt(scale)
  newline = want * scale
  # Token (r, c) of the reassembled (rows*k, cols*k) map is token (r % k, c % k) of crop (r // k, c // k).
  r = np.arange(rows * k)[:, None]
  c = np.arange(cols * k)[None, :]
  crop = 1 + (r // k) * cols + (c // k)
  idx = crop * scale + (r % k) * k + (c % k)
  top, bottom, left, right = unpad_shape(image_hw, (rows * k, cols * k), cfg.anyres.pinpoint_order)
  idx = idx[top:bottom, left:right]
  idx = np.concatenate([idx, np.full((idx.shape[0], 1), newline)], axis=1)
  return np.concatenate([np.arange(scale), idx.reshape(-1)]).astype(np.int32)


def visual_tokens(cfg: ModelConfig, image_hw, scale: int, grid: tuple[int, int] | None = None) -> int:
  """The sequence positions one image occupies (base, unpadded grid and newline tokens) at `scale` per crop."""
  if grid is not None:
    check_grid(cfg, grid, scale)
  if cfg.type != "llava_next":
    cfg.check_scale(scale)
    return int(scale)
  return int(pack_indices(cfg, image_hw, scale, grid).shape[0])


def check_grid(cfg: ModelConfig, grid, scale: int | None = None):
  """A grid override must be a positive (rows, cols) for a llava_next checkpoint whose LLM can hold the visual
  tokens of a full grid at `scale` (the largest configured scale when None)."""
  if cfg.type != "llava_next":
    raise AnyresError(f"a grid override needs a LLaVA-NeXT checkpoint (anyres crops, image_newline); this one is "
                      f"{cfg.type!r}, which sees one {cfg.vision.image_size}px crop per image")
  rows, cols = data_anyres.check_grid_shape(grid)
  if scale is not None:
    cfg.check_scale(scale)
    k = math.isqrt(scale)
    most = scale + rows * k * (cols * k + 1)  # no unpadding: the most tokens this grid can take
    if most > cfg.llm.max_len:
      fits = [s for s in cfg.m3.scales
              if s + rows * math.isqrt(s) * (cols * math.isqrt(s) + 1) <= cfg.llm.max_len]
      raise AnyresError(
          f"grid override {rows}x{cols} at {scale} tokens per grid takes up to {most} visual tokens, more than this "
          f"checkpoint's LLM context (model.llm.max_len = {cfg.llm.max_len}); scales that fit a {rows}x{cols} grid: "
          f"{fits or 'none'}")


def pack(crop_tokens, image_newline, indices):
  """crop_tokens float[C, scale, D], image_newline float[D], indices int32[n] -> float[n, D]."""
  d = crop_tokens.shape[-1]
  flat = jnp.concatenate([crop_tokens.reshape(-1, d), image_newline[None].astype(crop_tokens.dtype)], axis=0)
  return jnp.take(flat, jnp.asarray(indices), axis=0)


def image_tokens(model, params, crops, image_hw, scale: int, grid: tuple[int, int] | None = None):
  """One image's visual tokens: crops float32[C, H, W, 3] (base first, as `m3_jax.data.anyres` makes them)
  -> float[visual_tokens, D]. `model` is a `LlavaM3`; `params` its parameters."""
  if grid is not None:
    check_grid(model.config, grid, scale)
  idx = pack_indices(model.config, image_hw, scale, grid, n_crops=int(crops.shape[0]))
  v = {"params": params}
  feats = model.apply(v, crops, method=model.encode)
  per_crop = model.apply(v, feats, scale, method=model.image_embeds)
  return pack(per_crop, params["image_newline"], idx)


def forward(model, params, input_ids, crops, image_hw, scale: int, grid: tuple[int, int] | None = None):
  """Full LLaVA-NeXT forward for one sample (tests, scoring): int32[1, T] with one image placeholder,
  crops float32[C, H, W, 3] -> logits float32[1, T + n - 1, V] (n = visual tokens)."""
  from m3_jax.models.llava import expand_image_placeholders, merge_embeddings
  img = image_tokens(model, params, crops, image_hw, scale, grid)[None]
  c = model.config
  input_ids = jnp.asarray(input_ids, jnp.int32)
  ex = expand_image_placeholders(input_ids, jnp.ones_like(input_ids, bool), img.shape[1], c.image_token_id)
  v = {"params": params}
  x = merge_embeddings(model.apply(v, input_ids, method=model.embed_text), img, ex.source)
  hidden, _ = model.apply(v, x, ex.positions, ex.mask, method=model.decode)
  return model.apply(v, hidden, method=model.logits)
