"""CLIP ViT vision encoder (openai/clip-vit-large-patch14-336 and smaller), as LLaVA uses it.

Patch conv (no bias) + class token + learned positions, `pre_layrnorm`, pre-LN blocks with quick_gelu. LLaVA
reads the hidden state of layer `feature_layer` (-2: the second-to-last) and never applies `post_layernorm`; the
default select drops CLS. `post_norm` exists only so that converted checkpoints round-trip.
"""
from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from m3_jax.models.config import VisionConfig
from m3_jax.models.layers import Dtype, attention, dense, layer_norm, partitioned, run_stack
from m3_jax.sharding import BATCH, CONV, HEADS, LENGTH, MLP, VIT_EMBED, constrain


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """Bidirectional multi-head attention: float[B, N, W] -> float[B, N, W]."""
    c = self.config
    heads = (BATCH, LENGTH, HEADS, None)
    split = lambda t: constrain(einops.rearrange(t, "b n (h d) -> b n h d", h=c.heads), heads)
    q, k, v = (split(dense(c.width, (VIT_EMBED, HEADS), bias=True, dtype=self.dtype, name=n)(x)) for n in "qkv")
    o = constrain(attention(q, k, v, jnp.ones((1, x.shape[1], x.shape[1]), bool), self.dtype), heads)
    return dense(c.width, (HEADS, VIT_EMBED), bias=True, dtype=self.dtype, name="o")(
        einops.rearrange(o, "b n h d -> b n (h d)"))


class ClipMLP(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = quick_gelu(dense(c.mlp_dim, (VIT_EMBED, MLP), bias=True, dtype=self.dtype, name="fc1")(x))
    h = constrain(h, (BATCH, LENGTH, MLP))
    return dense(c.width, (MLP, VIT_EMBED), bias=True, dtype=self.dtype, name="fc2")(h)


class ClipBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  config: VisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, _=None):
    """float[B, N, W] -> (float[B, N, W], None)."""
    c = self.config
    x = constrain(x, (BATCH, LENGTH, VIT_EMBED))  # the residual stream
    x = x + ClipAttention(c, self.dtype, name="attn")(layer_norm(c.eps, self.dtype, "ln1")(x))
    x = constrain(x, (BATCH, LENGTH, VIT_EMBED))
    x = x + ClipMLP(c, self.dtype, name="mlp")(layer_norm(c.eps, self.dtype, "ln2")(x))
    return constrain(x, (BATCH, LENGTH, VIT_EMBED)), None


class ClipVision(nn.Module):
  config: VisionConfig
  dtype: Dtype = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, pixels):
    """float32[B, H, W, 3] (CLIP-normalised) -> float[B, N, W]: hidden state `feature_layer`, select applied.

    N = grid**2 ("patch") or grid**2 + 1 ("cls_patch").
    """
    c = self.config
    x = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID", use_bias=False,
                dtype=self.dtype, param_dtype=jnp.float32, name="patch_embed",
                kernel_init=partitioned(nn.initializers.lecun_normal(), CONV, CONV, CONV, VIT_EMBED))(
                    pixels.astype(self.dtype))
    x = einops.rearrange(x, "b h w c -> b (h w) c")
    cls = self.param("cls_token", partitioned(nn.initializers.normal(0.02), VIT_EMBED), (c.width,))
    pos = self.param("pos_embed", partitioned(nn.initializers.normal(0.02), None, VIT_EMBED),
                     (c.num_patches + 1, c.width))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, c.width)), x], axis=1)
    x = x + pos.astype(x.dtype)
    x = layer_norm(c.eps, self.dtype, "pre_norm")(x)  # CLIP's `pre_layrnorm`
    x, _ = run_stack(self, ClipBlock, dict(config=c, dtype=self.dtype), depth=c.depth, used=c.layers_used,
                     remat=self.remat, carry=x)
    if self.is_initializing():  # declare `post_layernorm` (unused by LLaVA) so checkpoints round-trip
      layer_norm(c.eps, self.dtype, "post_norm")(x[:, 0])
    return x[:, 1:] if c.select == "patch" else x
