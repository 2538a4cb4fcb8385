"""Vicuna / LLaMA decoder: float32 RMSNorm, RoPE (rotate_half, cat(freqs, freqs): HF weights need no
permutation), SwiGLU, grouped-query attention, causal + padding masks, a KV cache, untied head.

The KV cache is explicit state, not a Flax collection: `{"k", "v"}: float[L, B, S, K, D]`. A call writes its T
new keys at slots [cache_index, cache_index + T) and attends to every slot j <= its own slot where
`kv_mask[b, j]`; without a cache, slots are the T positions themselves. Positions (for RoPE) are per token, so
left padding works: pass cumsum(mask) - 1.
"""
from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from m3_jax.models.config import LLMConfig
from m3_jax.models.layers import Dtype, RMSNorm, attention, dense, partitioned, run_stack, scanned
from m3_jax.sharding import BATCH, EMBED, HEADS, KV, LENGTH, MLP, VOCAB, constrain


def rope(x, positions, theta: float):
  """Rotary embedding as transformers' LLaMA: x float[B, T, H, D], positions int[B, T]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]           # [B, T, 1, D]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class LlamaAttention(nn.Module):
  config: LLMConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, kv_mask, cache, cache_index):
    c = self.config
    dh = c.dim_per_head
    q = dense(c.heads * dh, (EMBED, HEADS), bias=False, dtype=self.dtype, name="q")(x)
    k = dense(c.kv_heads * dh, (EMBED, KV), bias=False, dtype=self.dtype, name="k")(x)
    v = dense(c.kv_heads * dh, (EMBED, KV), bias=False, dtype=self.dtype, name="v")(x)
    q, k, v = (einops.rearrange(t, "b t (h d) -> b t h d", d=dh) for t in (q, k, v))
    q = constrain(q, (BATCH, LENGTH, HEADS, None))
    k, v = (constrain(t, (BATCH, LENGTH, KV, None)) for t in (k, v))
    q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
    t = x.shape[1]
    if cache is not None:
      ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
      cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
      cache = {"k": ck, "v": cv}
      k, v = ck.astype(self.dtype), cv.astype(self.dtype)
    q_slot = cache_index + jnp.arange(t)
    k_slot = jnp.arange(k.shape[1])
    # kv_mask bool[B, S] (a key slot's validity), or bool[B, T, S] per query (a packed pass's block-diagonal mask)
    keys = kv_mask[:, None, :] if kv_mask.ndim == 2 else kv_mask
    allowed = (k_slot[None, :] <= q_slot[:, None])[None] & keys.astype(bool)
    o = constrain(attention(q, k, v, allowed, self.dtype), (BATCH, LENGTH, HEADS, None))
    o = dense(c.width, (HEADS, EMBED), bias=False, dtype=self.dtype, name="o")(
        einops.rearrange(o, "b t h d -> b t (h d)"))
    return o, cache


class LlamaMLP(nn.Module):
  config: LLMConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = dense(c.mlp_dim, (EMBED, MLP), bias=False, dtype=self.dtype, name="gate")(x)
    up = dense(c.mlp_dim, (EMBED, MLP), bias=False, dtype=self.dtype, name="up")(x)
    hidden = constrain(jax.nn.silu(gate) * up, (BATCH, LENGTH, MLP))
    return dense(c.width, (MLP, EMBED), bias=False, dtype=self.dtype, name="down")(hidden)


class LlamaBlock(nn.Module):
  config: LLMConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, carry, cache):
    """carry = (x float[B,T,D], positions int[B,T], kv_mask bool[B,S], cache_index); cache: this layer's or None."""
    x, positions, kv_mask, cache_index = carry
    c = self.config
    x = constrain(x, (BATCH, LENGTH, EMBED))  # the residual stream
    h, cache = LlamaAttention(c, self.dtype, name="attn")(
        RMSNorm(c.rms_eps, name="attn_norm")(x), positions, kv_mask, cache, cache_index)
    x = constrain(x + h, (BATCH, LENGTH, EMBED))
    x = x + LlamaMLP(c, self.dtype, name="mlp")(RMSNorm(c.rms_eps, name="mlp_norm")(x))
    return (constrain(x, (BATCH, LENGTH, EMBED)), positions, kv_mask, cache_index), cache


class Llama(nn.Module):
  config: LLMConfig
  dtype: Dtype = jnp.float32
  remat: str = "none"

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.width, dtype=self.dtype, param_dtype=jnp.float32,
                          embedding_init=partitioned(nn.initializers.normal(0.02), VOCAB, EMBED))
    self.layers = scanned(LlamaBlock, c.depth)(c, self.dtype)
    self.norm = RMSNorm(c.rms_eps)
    self.lm_head = dense(c.vocab_size, (EMBED, VOCAB), bias=False, dtype=self.dtype)

  def embed_tokens(self, ids):
    """int32[B, T] -> float[B, T, D]."""
    return self.embed(ids)

  def __call__(self, x, positions, kv_mask, cache=None, cache_index=0):
    """float[B, T, D] -> (final-normed hidden float[B, T, D], updated cache or None)."""
    c = self.config
    (x, *_), cache = run_stack(self, LlamaBlock, dict(config=c, dtype=self.dtype), depth=c.depth, used=c.depth,
                               remat=self.remat, carry=(x, positions, kv_mask, cache_index), xs=cache,
                               layers=self.layers)
    return self.norm(x), cache

  def logits(self, hidden):
    """float[..., D] -> float32[..., V]."""
    return self.lm_head(hidden).astype(jnp.float32)


def init_cache(config: LLMConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
  shape = (config.depth, batch, length, config.kv_heads, config.dim_per_head)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
