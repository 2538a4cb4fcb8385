"""Vicuna / LLaMA decoder: float32 RMSNorm, RoPE (rotate_half, cat(freqs, freqs): HF weights need no
permutation), SwiGLU, grouped-query attention, causal + padding masks, a KV cache, untied head.

The KV cache is explicit state, not a Flax collection: `{"k", "v"}: float[L, B, K, S, D]`. A call writes its T
new keys at slots [cache_index, cache_index + T) and attends to every slot j <= its own slot where
`kv_mask[b, j]`; without a cache, slots are the T positions themselves. Positions (for RoPE) are per token, so
left padding works: pass cumsum(mask) - 1.

The layers only read the cache: each attends over [its cached slots < cache_index ; its T new keys] and returns
the new keys, and `Llama` writes all layers' new slots with one dynamic_update_slice, in place inside a decode
loop. (Writing each layer's slice inside the layer scan made XLA copy the whole cache every decode step.)
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
  cache_dtype: Dtype | None = None  # the dtype of the KV cache this call's keys go to; None: no cache

  @nn.compact
  def __call__(self, x, positions, kv_mask, cache, cache_index):
    """x float[B, T, D]; cache: this layer's earlier slots {"k", "v"}: float[B, K, S, D] (read only), or None (no
    cache, or a prefill) -> (float[B, T, D], this call's keys and values {"k", "v"}: cache_dtype[B, T, K, D], or
    None without a cache_dtype)."""
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
    # kv_mask bool[B, S] (a key slot's validity), or bool[B, T, S] per query (a packed pass's block-diagonal mask)
    keys = (kv_mask[:, None, :] if kv_mask.ndim == 2 else kv_mask).astype(bool)
    causal = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None]  # new key i' <= new query i: bool[1, T, T]
    past, new = None, None
    if self.cache_dtype is not None:
      # Rounded as the cache stores them, so this call sees its own keys as later calls will read them.
      k, v = k.astype(self.cache_dtype), v.astype(self.cache_dtype)
      new = {"k": k, "v": v}
      k, v = k.astype(self.dtype), v.astype(self.dtype)
      if cache is not None:  # slots before cache_index hold earlier calls' keys; the rest are not written yet
        older = jnp.arange(cache["k"].shape[2]) < cache_index
        past = (cache["k"].astype(self.dtype), cache["v"].astype(self.dtype), keys & older)
      keys = jax.lax.dynamic_slice_in_dim(keys, cache_index, t, axis=2)  # the new tokens' own slots
    o = constrain(attention(q, k, v, causal & keys, self.dtype, past), (BATCH, LENGTH, HEADS, None))
    o = dense(c.width, (HEADS, EMBED), bias=False, dtype=self.dtype, name="o")(
        einops.rearrange(o, "b t h d -> b t (h d)"))
    return o, new


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
  cache_dtype: Dtype | None = None  # as LlamaAttention's

  @nn.compact
  def __call__(self, carry, cache):
    """carry = (x float[B,T,D], positions int[B,T], kv_mask bool[B,S], cache_index); cache: this layer's
    {"k", "v"}: float[B, K, S, D] (read only) or None -> (carry, this layer's T new {"k", "v"} as LlamaAttention's)."""
    x, positions, kv_mask, cache_index = carry
    c = self.config
    x = constrain(x, (BATCH, LENGTH, EMBED))  # the residual stream
    h, new = LlamaAttention(c, self.dtype, self.cache_dtype, name="attn")(
        RMSNorm(c.rms_eps, name="attn_norm")(x), positions, kv_mask, cache, cache_index)
    x = constrain(x + h, (BATCH, LENGTH, EMBED))
    x = x + LlamaMLP(c, self.dtype, name="mlp")(RMSNorm(c.rms_eps, name="mlp_norm")(x))
    return (constrain(x, (BATCH, LENGTH, EMBED)), positions, kv_mask, cache_index), new


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
    """float[B, T, D] -> (final-normed hidden float[B, T, D], updated cache or None).
    cache {"k", "v"}: float[L, B, K, S, D] or None; kv_mask bool[B, S] (or [B, T, S]); cache_index: int or int32[],
    the slot of the first of the T new tokens (a Python 0 is a prefill: no cached slot is read)."""
    c = self.config
    # Decided here, not in the layers, where cache_index is a traced scan carry: a prefill reads no cached slot.
    past = None if cache is None or (isinstance(cache_index, int) and cache_index == 0) else cache
    block = dict(config=c, dtype=self.dtype, cache_dtype=None if cache is None else cache["k"].dtype)
    (x, *_), new = run_stack(self, LlamaBlock, block, depth=c.depth, used=c.depth, remat=self.remat,
                             carry=(x, positions, kv_mask, cache_index), xs=past, layers=self.layers)
    if cache is not None:
      # new {"k", "v"}: float[L, B, T, K, D]; one write of T slots per array, in place in a decode loop's state.
      cache = {n: jax.lax.dynamic_update_slice(cache[n], jnp.swapaxes(new[n], 2, 3), (0, 0, 0, cache_index, 0))
               for n in ("k", "v")}
    return self.norm(x), cache

  def logits(self, hidden):
    """float[..., D] -> float32[..., V]."""
    return self.lm_head(hidden).astype(jnp.float32)


def init_cache(config: LLMConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
  """{"k", "v"}: zeros[L, B, K, S, D]: key/value heads before slots, the layout the attention dots read as it is (a
  slot-major [B, S, K, D] cache made XLA transpose-copy all of it twice per layer on every decode step)."""
  shape = (config.depth, batch, config.kv_heads, length, config.dim_per_head)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
