"""LLaVA with Matryoshka visual tokens: encode -> project -> nested pool -> merge with text -> decode.

One placeholder token per image in `input_ids` is expanded to the image's visual tokens (as LLaVA's
`tokenizer_image_token` + `prepare_inputs_labels_for_multimodal`): `scale` of them for LLaVA-1.5, the base crop
plus the unpadded crop grid and newlines for LLaVA-NeXT (`anyres.py`). Expansion is a static gather, so the
sequence length is T + n - 1 for every row and `scale` is a static Python int.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m3_jax.labels import IGNORE
from m3_jax.models.anyres import anyres_embeds
from m3_jax.models.clip_vit import ClipVision
from m3_jax.models.config import ModelConfig
from m3_jax.models.layers import partitioned
from m3_jax.models.llama import Llama
from m3_jax.models.matryoshka import nested_pool
from m3_jax.models.projector import Projector
from m3_jax.sharding import EMBED


class LlavaM3(nn.Module):
  config: ModelConfig

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    self.vision = ClipVision(c.vision, dtype, c.remat)
    self.projector = Projector(c.projector.type, c.llm.width, dtype)
    self.llm = Llama(c.llm, dtype, c.remat)
    if c.type == "llava_next":
      self.image_newline = self.param("image_newline", partitioned(nn.initializers.normal(1.0), EMBED),
                                      (c.llm.width,))

  def encode(self, pixels):
    """float32[B, H, W, 3] -> the full token grid in pooling space, float[B, N, C].

    C is the LLM width when pooling after the projector (the released M3 checkpoints), the CLIP width when
    pooling before it. The encoder runs once; every scale is pooled from this output.
    """
    feats = self.vision(pixels)
    return self.projector(feats) if self.config.m3.pool_position == "after_projector" else feats

  def image_embeds(self, feats, scale: int, pool: str | None = None):
    """float[B, N, C] -> float[B, scale, D]: the scale's visual tokens in the LLM's embedding space."""
    c = self.config
    c.check_scale(scale)
    tokens = feats if c.vision.select == "patch" else feats[:, 1:]
    pooled = nested_pool(tokens, scale, pool or c.m3.pool)
    return self.projector(pooled) if c.m3.pool_position == "before_projector" else pooled

  def embed_text(self, input_ids):
    """int32[B, T] -> float[B, T, D]; placeholder ids (which may lie outside the vocabulary) embed as id 0."""
    ids = jnp.where(input_ids == self.config.image_token_id, 0, input_ids)
    return self.llm.embed_tokens(jnp.clip(ids, 0, self.config.llm.vocab_size - 1))

  def decode(self, x, positions, kv_mask, cache=None, cache_index=0):
    """float[B, T, D] -> (hidden float[B, T, D], cache). See `llama.Llama`."""
    return self.llm(x, positions, kv_mask, cache, cache_index)

  def logits(self, hidden):
    return self.llm.logits(hidden)

  def visual(self, pixels, scale: int, anyres_index=None):
    """One image per row -> its visual tokens float[B, n, D].

    LLaVA-1.5: pixels float32[B, H, W, 3] -> n = scale. LLaVA-NeXT: crops float32[B, C, H, W, 3] (base first,
    then the grid crops, then padding crops) and anyres_index int32[B, n] (`anyres.pack_indices`): every crop is
    pooled to `scale` tokens and packed by `anyres.anyres_embeds`.
    """
    if anyres_index is None:
      return self.image_embeds(self.encode(pixels), scale)
    if self.config.type != "llava_next":
      raise ValueError(f"anyres_index needs a llava_next model (with image_newline); this one is "
                       f"{self.config.type!r}")
    b, n_crops = pixels.shape[:2]
    per_crop = self.image_embeds(self.encode(pixels.reshape(b * n_crops, *pixels.shape[2:])), scale)
    return anyres_embeds(per_crop.reshape(b, n_crops, scale, -1), self.image_newline, anyres_index)

  def __call__(self, input_ids, pixels, scale: int | None = None, attention_mask=None, anyres_index=None):
    """Full forward, one image per row: int32[B, T] and the `visual` inputs -> float32[B, T + n - 1, V] (n visual
    tokens: `scale` for LLaVA-1.5, the packed count for LLaVA-NeXT; every row's n tokens are real)."""
    c = self.config
    scale = c.full_scale if scale is None else scale
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids, dtype=bool)
    img = self.visual(pixels, scale, anyres_index)
    ex = expand_image_placeholders(input_ids, attention_mask, img.shape[1], c.image_token_id)
    x = merge_embeddings(self.embed_text(input_ids), img, ex.source)
    hidden, _ = self.decode(x, ex.positions, ex.mask)
    return self.logits(hidden)


class Expanded(NamedTuple):
  """Placeholder expansion for one scale; every array is [B, T + scale - 1]."""
  source: jax.Array     # int32: index into concat(text [T], image [scale]) along the sequence
  mask: jax.Array       # bool: a real token (text or visual)
  positions: jax.Array  # int32: RoPE positions, cumsum(mask) - 1
  is_image: jax.Array   # bool: a visual token
  labels: jax.Array | None


def expand_image_placeholders(input_ids, attention_mask, scale: int, image_token_id: int, labels=None,
                              pad_side: str = "right") -> Expanded:
  """Expands each row's image placeholder to `scale` visual tokens (a static-shape gather plan).

  input_ids int32[B, T] hold at most one placeholder per row (see `check_placeholders`). A row without one
  (text-only) gains scale - 1 padding slots on `pad_side`. Labels (int32[B, T], -100 = ignore) are carried
  over; visual and padding slots are ignored.
  """
  b, t = input_ids.shape
  n = t + scale - 1
  is_ph = input_ids == image_token_id
  has = is_ph.any(axis=1, keepdims=True)
  p = jnp.argmax(is_ph, axis=1)[:, None]
  j = jnp.arange(n)[None, :]
  with_image = jnp.where(j < p, j, jnp.where(j < p + scale, t + (j - p), j - scale + 1))
  if pad_side == "right":
    text_only, text_valid = jnp.minimum(j, t - 1), j < t
  else:
    text_only, text_valid = jnp.maximum(j - (scale - 1), 0), j >= scale - 1
  source = jnp.where(has, with_image, text_only).astype(jnp.int32)
  is_image = has & (source >= t)
  text_src = jnp.minimum(source, t - 1)
  mask = jnp.take_along_axis(attention_mask.astype(bool), text_src, axis=1)
  mask = jnp.where(has, mask | is_image, mask & text_valid)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  if labels is not None:
    labels = jnp.take_along_axis(labels, text_src, axis=1)
    labels = jnp.where(is_image | ~mask | (~has & ~text_valid), IGNORE, labels)
  return Expanded(source, mask, positions, is_image, labels)


def merge_embeddings(text, image, source):
  """text float[B, T, D], image float[B, S, D], source int32[B, T'] -> float[B, T', D]."""
  both = jnp.concatenate([text, image.astype(text.dtype)], axis=1)
  return jnp.take_along_axis(both, source[:, :, None], axis=1)


def check_placeholders(input_ids, num_images, image_token_id: int):
  """Host-side check before jit: row b of input_ids (an array or a list of ragged rows) must hold exactly
  num_images[b] (0 or 1) placeholders."""
  counts = [int((np.asarray(row) == image_token_id).sum()) for row in input_ids]
  num_images = np.broadcast_to(np.asarray(num_images), (len(counts),))
  for row, (got, want) in enumerate(zip(counts, num_images)):
    if got != want:
      raise ValueError(f"row {row}: {got} image placeholders (id {image_token_id}) for {want} image(s); each "
                       "image needs exactly one placeholder in the prompt (one `<image>` per image) and LLaVA-1.5 "
                       "takes at most one image per sample")


def dummy_inputs(config: ModelConfig, batch: int = 1):
  v = config.vision
  ids = jnp.array([[config.bos_token_id, config.image_token_id, 5, 6]] * batch, jnp.int32)
  return ids, jnp.zeros((batch, v.image_size, v.image_size, 3), jnp.float32)


def abstract_params(config: ModelConfig):
  """Parameter shapes with logical-axis metadata (nn.Partitioned boxes), without allocating anything."""
  model = LlavaM3(config)
  ids, pixels = dummy_inputs(config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, pixels, config.full_scale))["params"]


def init_params(config: ModelConfig, rng) -> dict:
  """Random float32 parameters (plain arrays; `nn.get_partition_spec(abstract_params(...))` gives specs)."""
  model = LlavaM3(config)
  ids, pixels = dummy_inputs(config)
  return nn.unbox(jax.jit(lambda r: model.init(r, ids, pixels, config.full_scale))(rng)["params"])


def param_count(config: ModelConfig) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract_params(config))))


def with_overrides(config: ModelConfig, **m3) -> ModelConfig:
  """The config with model.m3 fields replaced (e.g. pool="spatial" at inference)."""
  return dataclasses.replace(config, m3=dataclasses.replace(config.m3, **m3))
