"""LLaVA-NeXT anyres packing with Matryoshka tokens per grid (paper Sec. 4.2, Tables 2 and 5).

Every crop (the base crop first, then the grid crops) is encoded, projected and pooled to `scale` tokens on its
own (pooling after the projector: the released M3 order); `anyres_embeds` then lays the pooled crop tokens out as
the sequence the LLM reads: the base crop's tokens, then the unpadded (rows*k) x (cols*k) map with an
`image_newline` closing every row. Which token goes where is a host-side index plan (`pack_indices`, numpy: it
depends on the image size; the geometry is `m3_jax.geometry`), applied with one gather, so the jitted parts see
only static shapes. Inference (`Engine.anyres_tokens`), the full forward (`LlavaM3.__call__` with
`anyres_index`) and training all go through `anyres_embeds`.

This module adds the checkpoint's constraints to the geometry: a llava_next model, a scale of its chain, a grid
override whose tokens fit the LLM context, crops that match the grid the image size selects.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from m3_jax import geometry
from m3_jax.geometry import AnyresError
from m3_jax.models.config import ModelConfig


def geometry_args(cfg: ModelConfig, grid: tuple[int, int] | None = None) -> dict:
  """The checkpoint's anyres fields as `m3_jax.geometry` takes them."""
  return dict(grid_pinpoints=cfg.anyres.grid_pinpoints, order=cfg.anyres.pinpoint_order, crop=cfg.vision.image_size,
              grid=grid)


def check_grid(cfg: ModelConfig, grid, scale: int | None = None):
  """A grid override must be a positive (rows, cols) for a llava_next checkpoint whose LLM can hold the visual
  tokens of a full grid at `scale` (the largest configured scale when None)."""
  if cfg.type != "llava_next":
    raise AnyresError(f"a grid override needs a LLaVA-NeXT checkpoint (anyres crops, image_newline); this one is "
                      f"{cfg.type!r}, which sees one {cfg.vision.image_size}px crop per image")
  rows, cols = geometry.check_grid_shape(grid)
  if scale is not None:
    cfg.check_scale(scale)
    most = geometry.most_visual_tokens((rows, cols), scale)
    if most > cfg.llm.max_len:
      fits = [s for s in cfg.m3.scales if geometry.most_visual_tokens((rows, cols), s) <= cfg.llm.max_len]
      raise AnyresError(
          f"grid override {rows}x{cols} at {scale} tokens per grid takes up to {most} visual tokens, more than this "
          f"checkpoint's LLM context (model.llm.max_len = {cfg.llm.max_len}); scales that fit a {rows}x{cols} grid: "
          f"{fits or 'none'}")


def _check(cfg: ModelConfig, scale: int, grid):
  cfg.check_scale(scale)
  if grid is not None:
    check_grid(cfg, grid, scale)
  if cfg.type != "llava_next":
    raise AnyresError(f"anyres packing needs a llava_next model (with image_newline); this one is {cfg.type!r}")


def visual_tokens(cfg: ModelConfig, image_hw, scale: int, grid: tuple[int, int] | None = None) -> int:
  """The sequence positions one image occupies (base, unpadded grid and newline tokens) at `scale` per crop;
  `scale` for a LLaVA-1.5 checkpoint."""
  if cfg.type != "llava_next":
    if grid is not None:
      check_grid(cfg, grid, scale)
    return cfg.check_scale(scale)
  _check(cfg, scale, grid)
  return geometry.visual_tokens(image_hw, scale, **geometry_args(cfg, grid))


def pack_indices(cfg: ModelConfig, image_hw, scale: int, grid: tuple[int, int] | None = None,
                 n_crops: int | None = None) -> np.ndarray:
  """int32[visual_tokens]: `geometry.pack_indices` for this checkpoint; the newline is index C * scale with C the
  image's own 1 + rows * cols crops. `n_crops`, when given, is checked against that C (crops made with other
  pinpoints, order or grid would be packed wrongly)."""
  _check(cfg, scale, grid)
  args = geometry_args(cfg, grid)
  rows, cols = geometry.grid_shape(image_hw, **args)
  want = 1 + rows * cols
  if n_crops is not None and n_crops != want:
    raise AnyresError(
        f"image size (h, w) = {tuple(int(x) for x in image_hw)} selects a {rows}x{cols} crop grid "
        f"(pinpoints {[list(p) for p in cfg.anyres.grid_pinpoints]} read as {cfg.anyres.pinpoint_order}) = "
        f"{want} crops with the base, but {n_crops} crops were given: the image sizes do not fit these pinpoints "
        "(preprocess with m3_jax.data.anyres using the same pinpoints, order and grid)")
  return geometry.pack_indices(image_hw, scale, **args)


def anyres_embeds(crop_tokens, image_newline, indices):
  """Pooled crop tokens -> each image's packed visual tokens (base, unpadded grid, a newline per row).

  crop_tokens float[B, C, scale, D]: image b's base crop, its grid crops in row-major order, then padding crops
  (images with fewer crops than C); image_newline float[D]; indices int32[B, N]: row b indexes
  concat(crop_tokens[b].reshape(C * scale, D), [image_newline]), i.e. `geometry.pack_indices(..., crops=C)` of
  image b, padded to N (the positions past an image's own count are padding its caller masks).
  Returns float[B, N, D] in crop_tokens' dtype.
  """
  b, c, s, d = crop_tokens.shape
  newline = jnp.broadcast_to(image_newline.astype(crop_tokens.dtype), (b, 1, d))
  flat = jnp.concatenate([crop_tokens.reshape(b, c * s, d), newline], axis=1)
  return jnp.take_along_axis(flat, jnp.asarray(indices, jnp.int32)[:, :, None], axis=1)
